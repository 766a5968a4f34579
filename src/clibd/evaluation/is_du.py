"""IS+DU (paper 5.4, Tables 3, 9, 10): an image query is answered from the image keys of seen
species when a seen-vs-unseen classifier calls it seen, else from the DNA keys of the unseen
species. Two classifiers, as in the authors' `scripts/method_nn.py` and `scripts/method_linear.py`:

- `nn`: the cosine similarity to the nearest seen image key;
- `linear`: the softmax confidence of a linear classifier over the seen species
  (`clibd.evaluation.seen_classifier`: a head on the frozen `train_seen` image embeddings, or
  the authors' head and image encoder fine-tuned together).

As in the authors' code the routing is per position of the top-5: the k-th answer is the seen
side's k-th when its k-th score is above the threshold, else the unseen side's k-th. The threshold
maximises the harmonic mean of seen and unseen species micro top-1 accuracy over a uniform grid
on [0, 1] (chosen on val, applied to test). Reported: micro/macro top-1/3/5 at every rank for
seen/unseen/H.M., and Table 9, the binary seen-vs-unseen accuracy: the share of seen queries
whose top-k species are among the seen species (unseen queries: among the unseen species).

Usage:
    val = evaluate_is_du(model, processor, splits, embed, stage="val")
    test = evaluate_is_du(model, processor, splits, embed, threshold=val["threshold"], stage="test")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from ..constants import RANKS
from ..modeling_clibd import CLIBDModel
from ..processing import CLIBDProcessor
from ..retrieval import topk_search
from .clibd_retrieval.retrieval_metrics import harmonic_mean, rank_metrics, with_harmonic_mean
from .retrieval import TOP_K, EmbeddingCache, key_pool, labels
from .seen_classifier import LinearClassifier, fine_tune_linear_classifier, train_linear_classifier

__all__ = ["GRID", "LinearClassifier", "Side", "binary_accuracy", "dna_oracle", "evaluate_is_du",
           "fine_tune_linear_classifier", "route", "search_threshold", "seen_vs_unseen", "train_linear_classifier"]

UNSEEN_KEY_SPLITS = ("val_unseen_keys", "test_unseen_keys")
# the authors' grids: np.linspace(0, 1, 1000) in method_nn.py, np.linspace(0, 1, 1001) in method_linear.py
GRID = {"nn": 1000, "linear": 1001}


@dataclass
class Side:
    """One side of the routing for a set of queries: top-k scores [Q, K] (the unseen side: None)
    and per rank the top-k labels of each query.

    Usage:
        Side(scores, {rank: labels[rank] for rank in RANKS}); Side(None, unseen_labels)
    """

    scores: torch.Tensor | None
    labels: dict[str, list[list[str]]]


def route(seen: Side, unseen: Side, threshold: float) -> dict[str, list[list[str]]]:
    """Per rank, per query, the routed top-k: position k from `seen` where its k-th score is
    strictly above `threshold`, else from `unseen` (the authors' `decide_prediction_with_threshold`).

    Usage:
        predicted = route(Side(scores, seen_labels), Side(None, unseen_labels), 0.7)
    """
    use_seen = (seen.scores > threshold).tolist()
    return {rank: [[s if take else u for s, u, take in zip(srow, urow, flags, strict=False)]
                   for srow, urow, flags in zip(seen.labels[rank], unseen.labels[rank], use_seen, strict=True)]
            for rank in RANKS}


def search_threshold(sides: dict[str, tuple[Side, Side, list[str]]], steps: int = 1000,
                     drop_empty: bool = True) -> tuple[float, float]:
    """The threshold on linspace(0, 1, steps) maximising the harmonic mean of seen and unseen
    species micro top-1 accuracy (the first of equals); returns (threshold, that H.M.).
    `sides`: {"seen"|"unseen": (seen side, unseen side, true species)}.

    Usage:
        threshold, hm = search_threshold({"seen": (nn_side, dna_side, species), "unseen": (...)})
    """
    thresholds = torch.linspace(0, 1, steps, dtype=torch.float64)
    accuracy = {}
    for split, (seen, unseen, true) in sides.items():
        # top-1 depends on the first position only: right when routed to a side whose answer is right
        keep = torch.tensor([bool(t) or not drop_empty for t in true], dtype=torch.bool)
        seen_right = torch.tensor([s[0] == t for s, t in zip(seen.labels["species"], true, strict=True)])[keep]
        unseen_right = torch.tensor([u[0] == t for u, t in zip(unseen.labels["species"], true, strict=True)])[keep]
        if not keep.any():
            accuracy[split] = torch.zeros(steps, dtype=torch.float64)
            continue
        # queries with score <= t go to the unseen side: sorted scores and a running sum of what
        # that switch gains give every threshold's accuracy in O(Q log Q + T), not a [T, Q] table
        scores, order = seen.scores[:, 0][keep].double().sort()
        gain = torch.cat([torch.zeros(1, dtype=torch.float64),
                          (unseen_right.double() - seen_right.double())[order].cumsum(0)])
        switched = torch.searchsorted(scores, thresholds, right=True)
        accuracy[split] = (seen_right.double().sum() + gain[switched]) / len(scores)
    a, b = accuracy["seen"], accuracy["unseen"]
    hm = torch.where((a > 0) & (b > 0), 2 * a * b / (a + b), torch.zeros_like(a))
    best = int(torch.argmax(hm))  # argmax returns the first maximum, as the authors' strict ">"
    return float(thresholds[best]), float(hm[best])


def seen_vs_unseen(predicted_species: list[list[str]], species: set[str],
                   k_list: Sequence[int] = TOP_K) -> dict[str, float]:
    """Table 9: the share of queries with one of their top-k species in `species` (the authors'
    `check_for_acc_about_correct_predict_seen_or_unseen`), {"top1": ..., ...}.

    Usage:
        seen_vs_unseen([["s1", "u1"]], {"s1"})   # {"top1": 1.0, "top3": 1.0, "top5": 1.0}
    """
    n = max(len(predicted_species), 1)
    return {f"top{k}": sum(any(p in species for p in row[:k]) for row in predicted_species) / n for k in k_list}


def binary_accuracy(seen_predicted: list[list[str]], unseen_predicted: list[list[str]], seen_species: set[str],
                    unseen_species: set[str]) -> dict[str, dict[str, float]]:
    """{"seen": {topk: ...}, "unseen": {...}, "hm": {...}}: Table 9 for one strategy.

    Usage:
        binary_accuracy(seen_top_species, unseen_top_species, seen_species_set, unseen_species_set)
    """
    seen = seen_vs_unseen(seen_predicted, seen_species)
    unseen = seen_vs_unseen(unseen_predicted, unseen_species)
    return {"seen": seen, "unseen": unseen, "hm": {k: harmonic_mean(seen[k], unseen[k]) for k in seen}}


def _search_side(queries: torch.Tensor, keys: torch.Tensor, key_labels: dict[str, list[str]],
                 with_scores: bool) -> Side:
    values, indices = topk_search(queries, keys, max(TOP_K))
    top = indices.tolist()
    return Side(values if with_scores else None,
                {rank: [[key_labels[rank][j] for j in row] for row in top] for rank in RANKS})


def _species_sets(seen_keys: datasets.Dataset, unseen_keys: datasets.Dataset, compat: bool) -> tuple[set, set]:
    seen = {s for s in labels(seen_keys, compat)["species"] if s}
    return seen, {s for s in labels(unseen_keys, compat)["species"] if s}


def evaluate_is_du(model: CLIBDModel, processor: CLIBDProcessor, splits: datasets.DatasetDict,
                   embed: EmbeddingCache, threshold: float | None = None, stage: str = "val",
                   method: str = "nn", classifier: LinearClassifier | None = None, compat: bool = False) -> dict:
    """IS+DU with image queries (module docstring): seen side = the nearest seen image keys
    (`method="nn"`) or `classifier` (`"linear"`), unseen side = the nearest DNA keys of the
    validation and test unseen species. `threshold=None`: searched on this stage (use on val),
    else applied (the val threshold on test). Returns {"threshold", "seen", "unseen", "hm"
    ({rank: {micro_top1 ... macro_top5}}), "seen_vs_unseen" (Table 9)}.

    Usage:
        val = evaluate_is_du(model, processor, splits, embed, stage="val")
    """
    if method not in GRID or (method == "linear") != (classifier is not None):
        raise ValueError(f"method must be 'nn' (no classifier) or 'linear' (with a classifier), got {method!r}")
    seen_keys = splits["seen_keys"]
    unseen_keys = datasets.concatenate_datasets([splits[n] for n in UNSEEN_KEY_SPLITS if n in splits])
    image_keys = embed("seen-keys", seen_keys, "image")
    dna_keys = embed("unseen-keys", unseen_keys, "dna")
    sides = {}
    for split in ("seen", "unseen"):
        dataset = splits[f"{stage}_{split}"]
        queries = embed(f"{stage}-{split}", dataset, "image")
        seen_side = (Side(*classifier.predict(classifier.features(dataset, queries), max(TOP_K)))
                     if classifier is not None
                     else _search_side(queries, image_keys, labels(seen_keys, compat), with_scores=True))
        sides[split] = (seen_side, _search_side(queries, dna_keys, labels(unseen_keys, compat), False),
                        labels(dataset, compat)["species"])
    if threshold is None:
        threshold, _ = search_threshold(sides, GRID[method])
    predicted = {split: route(seen, unseen, threshold) for split, (seen, unseen, _) in sides.items()}
    metrics = {split: rank_metrics(labels(splits[f"{stage}_{split}"], compat), predicted[split], TOP_K)
               for split in predicted}
    seen_species, unseen_species = _species_sets(seen_keys, unseen_keys, compat)
    binary = binary_accuracy(predicted["seen"]["species"], predicted["unseen"]["species"], seen_species,
                             unseen_species)
    return {"method": method, "threshold": threshold, **with_harmonic_mean(metrics["seen"], metrics["unseen"]),
            "seen_vs_unseen": binary}


def dna_oracle(splits: datasets.DatasetDict, embed: EmbeddingCache, stage: str = "test", compat: bool = False) -> dict:
    """Table 9's "NN (oracle), DNA" row: seen-vs-unseen from the species of the nearest DNA keys
    of the whole key pool (seen and unseen), image queries.

    Usage:
        dna_oracle(splits, EmbeddingCache(model, processor, 256, False), "test")["seen_vs_unseen"]
    """
    pool = key_pool(splits)
    keys, key_labels = embed("keys", pool, "dna"), labels(pool, compat)
    predicted = {}
    for split in ("seen", "unseen"):
        queries = embed(f"{stage}-{split}", splits[f"{stage}_{split}"], "image")
        predicted[split] = _search_side(queries, keys, key_labels, with_scores=False).labels["species"]
    unseen_keys = datasets.concatenate_datasets([splits[n] for n in UNSEEN_KEY_SPLITS if n in splits])
    seen_species, unseen_species = _species_sets(splits["seen_keys"], unseen_keys, compat)
    return {"seen_vs_unseen": binary_accuracy(predicted["seen"], predicted["unseen"], seen_species, unseen_species)}
