"""Model cards generated from a training run (the template is `templates/model_card.md`).

Everything on the card comes from resolved config objects: the saved model's `CLIBDConfig` (the
sizes a preset gave, the DNA tower kind) and the run's `ExperimentConfig` (data, objective,
optimisation), never from raw YAML.

Usage:
    text = render_model_card("runs/demo", repo_id="me/clibd-bold-demo")
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from string import Template

from .configuration_clibd import CLIBDConfig
from .training.config import ExperimentConfig


def run_model_config(run: Path, experiment: ExperimentConfig) -> CLIBDConfig:
    """The config of the run's saved model (best, else final), or the one its YAML would build."""
    for name in ("best", "final"):
        if (run / name / "config.json").exists():
            return CLIBDConfig.from_pretrained(run / name)
    return experiment.model_config()


def tower_rows(config: CLIBDConfig, sources: dict[str, str | None] | None = None) -> str:
    """One markdown table row per tower: architecture and where its weights started (`sources`:
    a tower's source as the experiment names it, e.g. `pkg://...`, rather than this machine's path)."""
    sources = sources or {}
    rows = []
    if "image" in config.modalities:
        image = config.image_config
        rows.append(f"| image | timm `{image.timm_model_name}` | "
                    f"{'timm ImageNet weights' if image.pretrained else 'random'} |")
    if "dna" in config.modalities:
        dna = config.dna_config
        source = sources.get("dna") or getattr(dna, "pretrained_model_name_or_path", None)
        rows.append(f"| DNA | {dna.describe()} | {source or 'random'} |")
    if "text" in config.modalities:
        text = config.text_config
        rows.append(f"| taxonomy text | BERT ({text.num_hidden_layers} layers, width {text.hidden_size}; "
                    f"{text.pooling} pooling) | {sources.get('text') or text.pretrained_model_name_or_path or 'random'} |")
    return "\n".join(rows)


def _objective(experiment: ExperimentConfig) -> str:
    train = experiment.train
    if train.objective == "supcon":
        return f"supervised contrastive loss on the DNA embeddings (rank weights {train.supcon_weights})"
    return "CLIP-style contrastive loss over every pair of modalities"


def _trained_species(config: CLIBDConfig) -> str:
    """What the card says of the species the model trained on (`CLIBDConfig.trained_species`)."""
    if config.trained_species is None:
        return ("The model's config does not list the species it was trained on: indexes built with it calibrate "
                "their thresholds on any of their species.")
    return (f"The model's config lists the {len(config.trained_species)} species it was trained on "
            "(`trained_species`): an index built with it calibrates its thresholds on the species of the library "
            "the model never saw, where there are enough of them.")


def render_model_card(run_dir: str | os.PathLike, repo_id: str | None = None) -> str:
    """The model card of a run folder written by `train.py` (config.yaml, splits.md, metrics.md)."""
    run = Path(run_dir)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: no config.yaml (is this a clibd run folder?)")
    experiment = ExperimentConfig.from_yaml(run / "config.yaml")
    config = run_model_config(run, experiment)
    data, train = experiment.data, experiment.train
    max_bp = getattr(config.dna_config, "max_sequence_length", None)
    metrics = (run / "metrics.md").read_text().strip() if (run / "metrics.md").exists() else "Not evaluated yet."
    splits = (run / "splits.md").read_text().strip() if (run / "splits.md").exists() else ""
    template = Template(resources.files("clibd").joinpath("templates/model_card.md").read_text())
    return template.substitute(
        title=repo_id or f"CLIBD model ({run.name})", repo_hint=repo_id or "path/to/model",
        towers=tower_rows(config, {tower: getattr(experiment.model, tower).get("pretrained_model_name_or_path")
                                   for tower in ("dna", "text")}), modalities=", ".join(config.modalities), projection_dim=config.projection_dim,
        dna_dim=config.dna_config.embedding_dim(config.projection_dim),
        dna_limit=f", truncated to {max_bp} bp" if max_bp else " (read whole, as k-mer counts)",
        data_path=data.path, data_source=data.source, data_split=data.split, split_seed=data.split_seed, splits=splits,
        trained_species=_trained_species(config),
        objective=_objective(experiment), epochs=train.epochs, batch_size=train.batch_size,
        weight_decay=train.weight_decay, max_lr=train.max_lr, mixed_precision=train.mixed_precision,
        frozen=", ".join(train.freeze) or "none", lora="yes" if train.lora else "no", metrics=metrics,
    )
