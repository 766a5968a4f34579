"""The functions of the CLIBD retrieval metric (see `clibd_retrieval.py`, the Hugging Face
`evaluate` module that wraps them): micro and macro top-k accuracy per rank, seen / unseen /
harmonic mean. No `evaluate` import here, so that clibd's evaluation runs them without loading
`evaluate` (whose import pulls in transformers' pipelines); the module imports them from here
(`evaluate.load` copies this file beside it).

Usage:
    topk_accuracies(["A", "B"], [["A", "B"], ["A", "C"]], k_list=[1, 2])  # {1: (0.5, 0.5), 2: (0.5, 0.5)}
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

RANKS = ("order", "family", "genus", "species")
DEFAULT_K = (1, 3, 5)


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when either is 0 (as the authors' `harmonic_mean`).

    Usage:
        harmonic_mean(0.8, 0.4)   # 0.533...
    """
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
    ({rank: true labels}) and `predictions` ({rank: per query, labels best first}).

    Usage:
        rank_metrics({"species": ["A", "B"]}, {"species": [["A", "B"], ["A", "C"]]})   # {"species": {"micro_top1": 0.5, ...}}
    """
    metrics: dict[str, dict[str, float]] = {}
    for rank, true in references.items():
        metrics[rank] = {}
        for k, (micro, macro) in topk_accuracies(true, predictions[rank], k_list, drop_empty).items():
            metrics[rank][f"micro_top{k}"] = micro
            metrics[rank][f"macro_top{k}"] = macro
    return metrics


def with_harmonic_mean(seen: dict[str, dict[str, float]], unseen: dict[str, dict[str, float]]) -> dict:
    """{"seen": seen, "unseen": unseen, "hm": their harmonic mean, metric by metric}.

    Usage:
        with_harmonic_mean(rank_metrics(seen_true, seen_pred), rank_metrics(unseen_true, unseen_pred))["hm"]
    """
    hm = {rank: {m: harmonic_mean(seen[rank][m], unseen[rank][m]) for m in seen[rank]} for rank in seen}
    return {"seen": seen, "unseen": unseen, "hm": hm}
