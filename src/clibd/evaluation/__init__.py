"""Evaluation: the paper's retrieval metrics (micro/macro accuracy per rank, seen/unseen/H.M.,
IS+DU; `retrieval`), the one-call report of a saved model (`report.run_evaluation`) and the
scoring of species held out of training and of the references (`novel_species`). Embedding and
search live one layer down, in `clibd.retrieval`."""

from .retrieval import (
    evaluate_is_du,
    evaluate_retrieval,
    evaluation_pairs,
    format_table,
    harmonic_mean,
    selection_score,
    topk_accuracy,
)

__all__ = ["evaluate_is_du", "evaluate_retrieval", "evaluation_pairs", "format_table", "harmonic_mean",
           "selection_score", "topk_accuracy"]
