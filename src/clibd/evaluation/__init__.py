"""Retrieval evaluation: exact cosine top-k, micro/macro accuracy per rank, seen/unseen/H.M."""

from .retrieval import (
    evaluate_retrieval,
    format_table,
    harmonic_mean,
    selection_score,
    topk_accuracy,
    topk_indices,
)

__all__ = ["evaluate_retrieval", "format_table", "harmonic_mean", "selection_score", "topk_accuracy", "topk_indices"]
