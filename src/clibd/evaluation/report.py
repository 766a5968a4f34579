"""The paper's evaluation of a saved model in one call: every query/key pair on val and test,
IS+DU with its threshold chosen on val, `metrics.json` and a markdown table.

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
from .retrieval import EmbeddingCache, evaluate_is_du, evaluate_retrieval, evaluation_pairs, format_table


def run_evaluation(model_dir: str | os.PathLike, data: DataSection | datasets.DatasetDict,
                   out_dir: str | os.PathLike, batch_size: int = 256, progress: bool = True) -> dict:
    """Evaluate `model_dir` on `data` (an experiment's `data` section, loaded and split as it says,
    or splits already loaded); write metrics.json (test), metrics_val.json and metrics.md.
    Returns `{"val": metrics, "test": metrics}`.

    Usage:
        run_evaluation("runs/demo/best", ExperimentConfig.from_yaml("configs/demo.yaml").data, "runs/demo/eval")
    """
    model = CLIBDModel.from_pretrained(model_dir).eval()
    processor = CLIBDProcessor.from_pretrained(model_dir)
    splits = load_splits(data) if isinstance(data, DataSection) else data
    pairs = evaluation_pairs(model.config.modalities)
    embed = EmbeddingCache(model, processor, batch_size, progress)
    metrics = {stage: evaluate_retrieval(model, processor, splits, stage, pairs, embed=embed)
               for stage in ("val", "test")}
    if {"image", "dna"} <= set(model.config.modalities):
        val = evaluate_is_du(model, processor, splits, embed, stage="val")
        test = evaluate_is_du(model, processor, splits, embed, threshold=val["threshold"], stage="test")
        metrics["val"]["image"]["is_du"], metrics["test"]["image"]["is_du"] = val, test
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics["test"], indent=2))
    atomic_write_text(out / "metrics_val.json", json.dumps(metrics["val"], indent=2))
    lines = [f"# Retrieval accuracy of {model_dir}", ""]
    for stage in ("test", "val"):
        for metric in ("micro_top1", "macro_top1"):
            lines += [f"## {stage}, {metric.replace('_', ' ')} (%)", "", format_table(metrics[stage], metric), ""]
        if "is_du" in metrics[stage].get("image", {}):
            d = metrics[stage]["image"]["is_du"]
            lines += [f"IS+DU ({stage}, species micro top-1, threshold {d['threshold']:.3f}): seen "
                      f"{100 * d['seen']:.1f}, unseen {100 * d['unseen']:.1f}, H.M. {100 * d['hm']:.1f}", ""]
    atomic_write_text(out / "metrics.md", "\n".join(lines))
    return metrics
