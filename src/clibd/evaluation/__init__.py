"""Evaluation: the paper's retrieval metrics (micro/macro accuracy per rank, seen/unseen/H.M.;
`retrieval`, the pairs compared and the best-checkpoint score `pairs`, the metric itself as a
Hugging Face `evaluate` module `clibd_retrieval`), IS+DU and Table 9 (`is_du`), the paper's
table layouts (`tables`), the one-call report of a saved model (`report.run_evaluation`) and the
scoring of species held out of training and of the references (`novel_species`). Embedding and
search live one layer down, in `clibd.retrieval`."""

from pathlib import Path

from .is_du import evaluate_is_du, train_linear_classifier
from .pairs import evaluation_pairs, selection_score
from .retrieval import evaluate_retrieval, harmonic_mean, topk_accuracy
from .tables import format_table, render_folder, render_report

# `evaluate.load(METRIC_PATH)`: the retrieval metric as a Hugging Face evaluate module
METRIC_PATH = str(Path(__file__).parent / "clibd_retrieval")

__all__ = ["METRIC_PATH", "evaluate_is_du", "evaluate_retrieval", "evaluation_pairs", "format_table",
           "harmonic_mean", "render_folder", "render_report", "selection_score", "topk_accuracy",
           "train_linear_classifier"]
