"""The CLIBD paper's retrieval metric as a Hugging Face `evaluate` module: micro and macro top-k
accuracy at each taxonomic rank, and for seen and unseen species their harmonic mean (H.M.).

One implementation: the functions are in `retrieval_metrics.py` beside this file, which
`clibd.evaluation` runs directly and this module imports (`evaluate.load` copies it along).
Neither imports anything from clibd, so the folder can be copied and loaded on its own.

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

from collections.abc import Mapping, Sequence

import datasets
import evaluate

from .retrieval_metrics import DEFAULT_K, RANKS, rank_metrics, with_harmonic_mean

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
