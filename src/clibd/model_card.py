"""Model cards generated from a training run (the template is `templates/model_card.md`).

Usage:
    text = render_model_card("runs/demo", repo_id="me/clibd-bold-demo")
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from string import Template

import yaml


def _tower_rows(model: dict, config: dict) -> str:
    rows = []
    modalities = model.get("modalities", ["image", "dna", "text"])
    if "image" in modalities:
        image = model.get("image", {})
        rows.append(f"| image | timm `{image.get('timm_model_name', 'vit_base_patch16_224')}` | "
                    f"{'timm ImageNet weights' if image.get('pretrained', True) else 'random'} |")
    if "dna" in modalities:
        dna = model.get("dna", {})
        if dna.get("encoder") == "kmer_profile":
            sketch = dna.get("profile_sketch_dim", 0)
            rows.append(f"| DNA | MLP over overlapping {dna.get('profile_kmer_size', 6)}-mer counts (hidden "
                        f"{dna.get('profile_hidden_size', 1024)})"
                        + (f" + a fixed {sketch}-d random projection of the counts" if sketch else "")
                        + (" + an MLP and a positional model over the barcode aligned to the COI-5P region (one "
                           "loss per branch; the k-mer parts alone judge novelty in `clibd identify`)"
                           if dna.get("profile_aligned") else "") + " | random |")
        else:
            size = f"{dna.get('num_hidden_layers', 12)} layers, width {dna.get('hidden_size', 768)}"
            rows.append(f"| DNA | BERT over {dna.get('kmer_size', 5)}-mers ({size}) | "
                        f"{dna.get('pretrained_model_name_or_path') or 'random'} |")
    if "text" in modalities:
        text = model.get("text", {})
        rows.append(f"| taxonomy text | BERT | {text.get('pretrained_model_name_or_path') or 'prajjwal1/bert-small'} |")
    return "\n".join(rows)


def render_model_card(run_dir: str | os.PathLike, repo_id: str | None = None) -> str:
    """The model card of a run folder written by `train.py` (config.yaml, splits.md, metrics.md)."""
    run = Path(run_dir)
    config_path = run / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{run}: no config.yaml (is this a clibd run folder?)")
    config = yaml.safe_load(config_path.read_text())
    model, data, train = config["model"], config["data"], config["train"]
    saved = run / "best" / "config.json"  # the resolved sizes, where the YAML names a preset
    if saved.exists():
        resolved = json.loads(saved.read_text())
        for tower in ("image", "dna", "text"):
            model[tower] = {**resolved.get(f"{tower}_config", {}), **(model.get(tower) or {})}
    dna = model.get("dna") or {}
    profile_tower = dna.get("encoder") == "kmer_profile"
    metrics = (run / "metrics.md").read_text().strip() if (run / "metrics.md").exists() else "Not evaluated yet."
    splits = (run / "splits.md").read_text().strip() if (run / "splits.md").exists() else ""
    template = Template(resources.files("clibd").joinpath("templates/model_card.md").read_text())
    return template.substitute(
        title=repo_id or f"CLIBD model ({run.name})",
        repo_hint=repo_id or "path/to/model",
        towers=_tower_rows(model, config),
        modalities=", ".join(model.get("modalities", [])),
        projection_dim=model.get("projection_dim") or 768,
        dna_flavour="none (k-mer count profiles)" if profile_tower else dna.get("tokenizer_flavour", "compat"),
        dna_pooling="none" if profile_tower else dna.get("pooling", "compat"),
        text_pooling=model.get("text", {}).get("pooling", "compat"),
        data_path=data.get("path", ""), data_source=data.get("source", ""), data_split=data.get("split", ""),
        split_seed=data.get("split_seed", ""), splits=splits,
        objective=(f"supervised contrastive loss on the DNA embeddings (rank weights {train.get('supcon_weights')})"
                   if train.get("objective") == "supcon" else "CLIP-style contrastive loss over every pair of modalities"),
        epochs=train.get("epochs"), batch_size=train.get("batch_size"), weight_decay=train.get("weight_decay"),
        max_lr=train.get("max_lr"), mixed_precision=train.get("mixed_precision"),
        frozen=", ".join(train.get("freeze") or []) or "none", lora="yes" if train.get("lora") else "no",
        metrics=metrics, max_bp=model.get("dna", {}).get("max_sequence_length", 660),
    )
