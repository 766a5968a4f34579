"""The CLIBD paper's retrieval metric as a Hugging Face `evaluate` module: micro and macro top-k
accuracy at each taxonomic rank, and for seen and unseen species their harmonic mean (H.M.).

This file is the one implementation: `clibd.evaluation` imports its functions, and
`evaluate.load` runs the same code. It imports nothing from clibd, so the folder can be copied
and loaded on its own.

Usage:
    import evaluate
    metric = evaluate.load("src/clibd/evaluation/clibd_retrieval")   # a local path: no network
    metric.compute(predictions=[{"order": ["O1", "O2"], "family": [...], "genus": [...], "species": [...]}],
                   references=[{"order": "O1", "family": "F1", "genus": "G1", "species": "s1"}],
                   seen=[True], k_list=[1, 3, 5])
    # {"seen": {"species": {"micro_top1": ..., "macro_top1": ...}, ...}, "unseen": {...}, "hm": {...}}

Definitions (the authors' `top_k_micro_accuracy` / `top_k_macro_accuracy`): a query is right at
top-k when its true label is among its first k predicted labels; micro is the share of queries
right, macro the mean over the true classes present among the queries of each class's share.
Queries whose true label is "" are left out (`drop_empty`; pass `drop_empty=False` to count ""
as a class of its own).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import datasets
import evaluate

RANKS = ("order", "family", "genus", "species")
DEFAULT_K = (1, 3, 5)

_DESCRIPTION = "Micro/macro top-k accuracy per taxonomic rank, seen/unseen/harmonic mean (CLIBD, ICLR 2025)."
_CITATION = """@inproceedings{gong2025clibd, title={CLIBD: Bridging Vision and Genomics for Biodiversity
Monitoring at Scale}, author={Gong, ZeMing and Wang, Austin T. and Huo, Xiaoliang and Haurum, Joakim Bruslund
and Lowe, Scott C. and Taylor, Graham W. and Chang, Angel X.}, booktitle={ICLR}, year={2025}}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: per query, the predicted labels best first: a dict {rank: [labels]} (or a plain
        list of labels: one rank, reported under "label").
    references: per query, the true label: {rank: label} (or a plain label).
    seen: optional, per query True for a seen-species query, False for an unseen one; then the
        result is {"seen": ..., "unseen": ..., "hm": ...}.
    k_list: the k of top-k (default 1, 3, 5).
    drop_empty: leave out queries whose true label is "" (default True).
Returns:
    {rank: {"micro_top1": float, "macro_top1": float, ...}} (NaN where no query counts).
"""


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when either is 0 (as the authors' `harmonic_mean`)."""
    return 0.0 if a + b == 0 or a * b == 0 else 2 * a * b / (a + b)


def topk_accuracies(true: Sequence[str], predicted: Sequence[Sequence[str]], k_list: Sequence[int] = DEFAULT_K,
                    drop_empty: bool = True) -> dict[int, tuple[float, float]]:
    """{k: (micro, macro)} top-k accuracy of `predicted` (per query, labels best first) against `true`.

    Usage:
        topk_accuracies(["A", "B"], [["A", "B"], ["A", "C"]], k_list=[1, 2])  # {1: (0.5, 0.5), 2: (0.5, 0.5)}
    """
    # each query's first right position (inf: none), so that every k is one comparison
    per_class: dict[str, list[float]] = defaultdict(list)
    for label, guesses in zip(true, predicted, strict=True):
        if label or not drop_empty:
            guesses = list(guesses)
            per_class[label].append(guesses.index(label) if label in guesses else math.inf)
    if not per_class:
        return {k: (math.nan, math.nan) for k in k_list}
    total = sum(len(v) for v in per_class.values())
    result = {}
    for k in k_list:
        right = {label: sum(p < k for p in positions) for label, positions in per_class.items()}
        micro = sum(right.values()) / total
        macro = sum(right[label] / len(positions) for label, positions in per_class.items()) / len(per_class)
        result[k] = (micro, macro)
    return result


def topk_accuracy(true: Sequence[str], predicted: Sequence[Sequence[str]], k: int,
                  drop_empty: bool = True) -> tuple[float, float]:
    """(micro, macro) top-k accuracy; see `topk_accuracies`.

    Usage:
        micro, macro = topk_accuracy(["A", "A", "B"], [["A"], ["B"], ["B"]], 1)  # (2/3, 0.75)
    """
    return topk_accuracies(true, predicted, (k,), drop_empty)[k]


def rank_metrics(references: Mapping[str, Sequence[str]], predictions: Mapping[str, Sequence[Sequence[str]]],
                 k_list: Sequence[int] = DEFAULT_K, drop_empty: bool = True) -> dict[str, dict[str, float]]:
    """{rank: {"micro_top{k}": ..., "macro_top{k}": ...}} for every rank of `references`
    ({rank: true labels}) and `predictions` ({rank: per query, labels best first})."""
    metrics: dict[str, dict[str, float]] = {}
    for rank, true in references.items():
        metrics[rank] = {}
        for k, (micro, macro) in topk_accuracies(true, predictions[rank], k_list, drop_empty).items():
            metrics[rank][f"micro_top{k}"] = micro
            metrics[rank][f"macro_top{k}"] = macro
    return metrics


def with_harmonic_mean(seen: dict[str, dict[str, float]], unseen: dict[str, dict[str, float]]) -> dict:
    """{"seen": seen, "unseen": unseen, "hm": their harmonic mean, metric by metric}."""
    hm = {rank: {m: harmonic_mean(seen[rank][m], unseen[rank][m]) for m in seen[rank]} for rank in seen}
    return {"seen": seen, "unseen": unseen, "hm": hm}


def _columns(rows: Sequence, field_names: Sequence[str]) -> dict[str, list]:
    """A list of per-query dicts as {rank: column}; plain values as one rank, "label"."""
    if rows and not isinstance(rows[0], Mapping):
        return {"label": list(rows)}
    return {rank: [row[rank] for row in rows] for rank in field_names}


class ClibdRetrieval(evaluate.Metric):
    """`evaluate.load(<this folder>)`: see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        string = datasets.Value("string")
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": {rank: datasets.Sequence(string) for rank in RANKS},
                                   "references": {rank: string for rank in RANKS}}),
                datasets.Features({"predictions": datasets.Sequence(string), "references": string}),
            ],
        )

    def _compute(self, predictions, references, seen: Sequence[bool] | None = None,
                 k_list: Sequence[int] = DEFAULT_K, drop_empty: bool = True) -> dict:
        true, guessed = _columns(references, RANKS), _columns(predictions, RANKS)
        if seen is None:
            return rank_metrics(true, guessed, k_list, drop_empty)
        if len(seen) != len(references):
            raise ValueError(f"seen has {len(seen)} values for {len(references)} references")
        parts = {}
        for name, wanted in (("seen", True), ("unseen", False)):
            rows = [i for i, s in enumerate(seen) if bool(s) == wanted]
            parts[name] = rank_metrics({r: [v[i] for i in rows] for r, v in true.items()},
                                       {r: [v[i] for i in rows] for r, v in guessed.items()}, k_list, drop_empty)
        return with_harmonic_mean(parts["seen"], parts["unseen"])
