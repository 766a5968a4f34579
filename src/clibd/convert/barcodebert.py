"""Convert the authors' BarcodeBERT checkpoints into a folder the DNA tower starts from.

What it reads (facts from bioscan-ml/clibd and bioscan-ml/BarcodeBERT, see the project's checkpoint
notes): the paper's `model_41.pth` and BarcodeBERT v1 (a bare `BertForMaskedLM` state dict saved
from DistributedDataParallel, keys `module.bert.*` / `module.cls.predictions.*`, no config: BERT-base
sizes); the newer training checkpoints (`{"model": BertForTokenClassification state dict,
"bert_config": ..., "optimizer": ..., "config": Namespace, ...}`, k-mer vocabulary [MASK]=0, [UNK]=1,
k-mers from 2). Always with `torch.load(weights_only=True)`. The reading itself
(`load_barcodebert_checkpoint`, the name table `BARCODEBERT_RELEASES`) lives with the tower in
`clibd.towers.barcodebert`, so `dna_config.pretrained_model_name_or_path` accepts a released name
or a `.pth` as well as the folder written here.

The folder: `model.safetensors` (the checkpoint's tensors under `bert.*` / `cls.predictions.*`),
`config.json` (its BertConfig: `BertForMaskedLM` when the MLM head is complete, else `BertModel`,
so plain transformers reads it too) and `clibd_barcodebert.json` (source, SHA-256 of the file read,
the `dna_config` that fits).

Usage:
    settings = convert_barcodebert("barcodebert-canada-1.5m-5mer", "barcodebert-5mer")
    CLIBDConfig(dna_config=settings)          # settings["pretrained_model_name_or_path"] == "barcodebert-5mer"
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig

from ..atomic import atomic_directory
from ..towers.barcodebert import (
    BARCODEBERT_RELEASES,
    CLIBDBarcodeBERTConfig,
    CLIBDBarcodeBERTTower,
    barcodebert_dna_settings,
    load_barcodebert_weights,
    read_barcodebert_checkpoint,
    resolve_barcodebert_source,
)

MLM_HEAD = ("cls.predictions.transform.dense.weight", "cls.predictions.decoder.weight", "cls.predictions.bias")

__all__ = ["BARCODEBERT_RELEASES", "convert_barcodebert", "load_barcodebert_checkpoint"]


def load_barcodebert_checkpoint(path_or_name: str | os.PathLike, cache_dir: str | None = None,
                                ) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with `bert.*` / `cls.predictions.*` keys, BertConfig fields) of a BarcodeBERT
    checkpoint: a released name (`BARCODEBERT_RELEASES`), a `.pth` / `.pt` file, a folder, a URL.

    Usage:
        state, bert_config = load_barcodebert_checkpoint("model_41.pth")
    """
    return read_barcodebert_checkpoint(path_or_name, cache_dir)


def convert_barcodebert(source: str | os.PathLike, out: str | os.PathLike, cache_dir: str | None = None) -> dict:
    """Write the folder `out` (see the module doc) from a BarcodeBERT checkpoint, after checking that
    it loads into the DNA tower it describes; returns that tower's `dna_config` settings, with
    `pretrained_model_name_or_path` pointing at `out`.

    Usage:
        settings = convert_barcodebert("model_41.pth", "barcodebert-5mer")
    """
    path = resolve_barcodebert_source(source, cache_dir)
    state, bert_config = read_barcodebert_checkpoint(path)
    settings = barcodebert_dna_settings(bert_config)
    # a checkpoint without a config does not say its head count: the settings' (BERT's convention) is written
    config = BertConfig.from_dict({"num_attention_heads": settings["num_attention_heads"], **bert_config})
    # Load it once into the tower it is meant for: missing tensors fail here, before anything is written.
    tower_config = CLIBDBarcodeBERTConfig(**{k: v for k, v in settings.items() if k != "model_type"})
    load_barcodebert_weights(CLIBDBarcodeBERTTower(tower_config, projection_dim=config.hidden_size),
                             state, config.to_dict(), str(source))
    config.architectures = ["BertForMaskedLM" if all(k in state for k in MLM_HEAD) else "BertModel"]
    out = Path(out)
    settings["pretrained_model_name_or_path"] = str(out)
    with atomic_directory(out) as tmp:
        # clone: a tied MLM decoder shares storage with the word embeddings, which safetensors refuses
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        info = {"source": str(source), "file": str(path), "sha256": _sha256(path),
                "released": BARCODEBERT_RELEASES[str(source)].description if str(source) in BARCODEBERT_RELEASES
                else None, "dna_config": settings}
        (tmp / "clibd_barcodebert.json").write_text(json.dumps(info, indent=2) + "\n")
    return settings


def _sha256(path: Path) -> str | None:
    """SHA-256 of the file read (None for a folder), so a converted folder says which bytes it came from."""
    if path.is_dir():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
