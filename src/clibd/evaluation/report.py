"""The paper's evaluation of a saved model in one call: every query/key pair on val and test,
IS+DU (nearest-neighbour and linear classifier, thresholds chosen on val), Table 9, and
metrics.json, metrics_val.json, evaluation.json and metrics.md (the paper's table layout).

Usage:
    metrics = run_evaluation("runs/demo/best", ExperimentConfig.from_yaml("configs/demo.yaml").data, "runs/demo/eval")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from ..atomic import atomic_write_text
from ..data import DataSection, load_splits
from ..modeling_clibd import CLIBDModel
from ..processing import CLIBDProcessor
from .is_du import dna_oracle, evaluate_is_du, fine_tune_linear_classifier, train_linear_classifier
from .pairs import evaluation_pairs
from .retrieval import EmbeddingCache, evaluate_retrieval, labels
from .tables import render_folder

LINEAR_IS_DU = ("head", "fine-tune", "none")


def _is_du(model: CLIBDModel, processor: CLIBDProcessor, splits: datasets.DatasetDict, embed: EmbeddingCache,
           metrics: dict, linear: str, compat: bool) -> None:
    """IS+DU with the NN classifier, and the linear one (`linear`: "head" on the frozen image
    embeddings, "fine-tune" with the image encoder as the authors, "none") when there are
    `train_seen` records to train it on; thresholds chosen on val and applied to test; the DNA
    oracle of Table 9."""
    classifiers = {"nn": None}
    train = splits.get("train_seen")
    if linear != "none" and train is not None and len(train):
        classifiers["linear"] = (
            train_linear_classifier(embed("train_seen", train, "image"), labels(train, compat)) if linear == "head"
            else fine_tune_linear_classifier(model, processor, train, labels(train, compat)))
    for stage in ("val", "test"):
        metrics[stage]["image"]["is_du"] = {"dna_oracle": dna_oracle(splits, embed, stage, compat)}
    for method, classifier in classifiers.items():
        val = evaluate_is_du(model, processor, splits, embed, stage="val", method=method, classifier=classifier,
                             compat=compat)
        test = evaluate_is_du(model, processor, splits, embed, threshold=val["threshold"], stage="test",
                              method=method, classifier=classifier, compat=compat)
        metrics["val"]["image"]["is_du"][method], metrics["test"]["image"]["is_du"][method] = val, test


def run_evaluation(model_dir: str | os.PathLike | CLIBDModel, data: DataSection | datasets.DatasetDict,
                   out_dir: str | os.PathLike, batch_size: int = 256, progress: bool = True,
                   processor: CLIBDProcessor | None = None, compat: bool = False, linear_is_du: str = "head",
                   aligned: bool = True) -> dict:
    """Evaluate `model_dir` (a saved model folder, or a model with its `processor`) on `data` (an
    experiment's `data` section, loaded and split as it says, or splits already loaded); write
    metrics.json (test), metrics_val.json, evaluation.json and metrics.md.
    Returns `{"val": metrics, "test": metrics}`. `compat`: the authors' counting
    (`clibd.evaluation.retrieval`); `linear_is_du`: IS+DU's linear classifier trained on the
    `train_seen` records, "head" (on their frozen image embeddings), "fine-tune" (with a copy of
    the image encoder, the authors' recipe) or "none"; `aligned=False` marks the unaligned
    baseline in the tables.

    Usage:
        run_evaluation("runs/demo/best", ExperimentConfig.from_yaml("configs/demo.yaml").data, "runs/demo/eval")
    """
    if linear_is_du not in LINEAR_IS_DU:
        raise ValueError(f"linear_is_du must be one of {LINEAR_IS_DU}, got {linear_is_du!r}")
    if isinstance(model_dir, CLIBDModel):
        if processor is None:
            raise ValueError("run_evaluation: pass the processor that feeds the model given")
        model = model_dir.eval()
    else:
        model = CLIBDModel.from_pretrained(model_dir).eval()
        processor = processor or CLIBDProcessor.from_pretrained(model_dir)
    splits = load_splits(data) if isinstance(data, DataSection) else data
    pairs = evaluation_pairs(model.config.modalities,
                             {m: model.embedding_dim(m) for m in model.config.modalities})
    embed = EmbeddingCache(model, processor, batch_size, progress)
    metrics = {stage: evaluate_retrieval(model, processor, splits, stage, pairs, embed=embed, compat=compat)
               for stage in ("val", "test")}
    if {"image", "dna"} <= set(model.config.modalities):
        _is_du(model, processor, splits, embed, metrics, linear_is_du, compat)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics["test"], indent=2))
    atomic_write_text(out / "metrics_val.json", json.dumps(metrics["val"], indent=2))
    about = {"model": str(model_dir) if not isinstance(model_dir, CLIBDModel) else "a model in memory",
             "modalities": list(model.config.modalities), "aligned": aligned, "compat": compat,
             "linear_is_du": linear_is_du}
    atomic_write_text(out / "evaluation.json", json.dumps(about, indent=2))
    render_folder(out)
    return metrics
