"""Per-rank novelty thresholds, calibrated on the reference library itself by holding taxa out.

For each rank (species, genus, family, order) and a sample of references:
- *known*: the reference is queried against all others; its nearest neighbour's similarity counts
  when that neighbour has the right label at this rank (its taxon has other members);
- *novel*: every reference of its taxon at this rank is removed first, so the nearest neighbour
  belongs to another taxon: what a specimen of an absent species (genus, ...) looks like.
The threshold maximises balanced accuracy between the two. A query whose best similarity is below
the species threshold is reported novel; its answer stops at the deepest rank whose threshold it
clears (in the spirit of BOLD's 97/95/90/85 % identity cut-offs, but learned per model and library).

Usage:
    thresholds = calibrate_thresholds(embeddings, records)   # {"species": 0.93, "genus": 0.88, ...}
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from .processing import RANKS


def best_threshold(known: list[float], novel: list[float]) -> float:
    """The cut that best separates `known` (>= cut) from `novel` (< cut), by balanced accuracy."""
    if not known or not novel:
        return float("nan")
    candidates = sorted(set(known) | set(novel))
    known_t, novel_t = torch.tensor(known), torch.tensor(novel)
    best, best_score = candidates[0], -1.0
    for cut in candidates:
        score = (known_t >= cut).float().mean() + (novel_t < cut).float().mean()
        if score > best_score:
            best, best_score = cut, float(score)
    # Put the cut midway to the next lower value so that it is not fitted to one sample.
    lower = [c for c in candidates if c < best]
    return float((best + lower[-1]) / 2) if lower else float(best)


def held_out_similarities(embeddings: torch.Tensor, labels: list[str], queries: list[int],
                          chunk_size: int = 512) -> tuple[list[float], list[float]]:
    """(known, novel) nearest-neighbour similarities of `queries`, as the module doc describes."""
    label_ids = {label: i for i, label in enumerate(sorted(set(labels)))}
    key_labels = torch.tensor([label_ids.get(label, -1) for label in labels])
    known, novel = [], []
    for start in range(0, len(queries), chunk_size):
        rows = torch.tensor(queries[start : start + chunk_size])
        sims = embeddings[rows] @ embeddings.T
        sims[torch.arange(len(rows)), rows] = -2.0  # a record is not its own reference
        own = key_labels[rows].unsqueeze(1) == key_labels.unsqueeze(0)
        top = sims.max(dim=1)
        hit = key_labels[top.indices] == key_labels[rows]
        known += [float(v) for v, ok in zip(top.values, hit, strict=True) if ok]
        novel += sims.masked_fill(own, -2.0).max(dim=1).values.tolist()
    return known, novel


def calibrate_thresholds(embeddings: torch.Tensor, records: list[dict], max_queries: int = 2000,
                         seed: int = 0) -> dict[str, float]:
    """Per-rank similarity thresholds (see the module doc); NaN where a rank cannot be calibrated
    (for example a library with one order only has no held-out order)."""
    rng = random.Random(seed)
    thresholds = {}
    for rank in RANKS:
        labels = [r.get(rank, "") for r in records]
        counts = Counter(label for label in labels if label)
        eligible = [i for i, label in enumerate(labels) if label and counts[label] >= 2]
        queries = rng.sample(eligible, min(max_queries, len(eligible)))
        if len(counts) < 2 or not queries:
            thresholds[rank] = float("nan")
            continue
        known, novel = held_out_similarities(embeddings, labels, queries)
        thresholds[rank] = best_threshold(known, novel)
    return thresholds
