"""Per-rank confidence thresholds, calibrated on the reference library itself by holding species out.

A sample of references (of species with at least two references) is matched twice against the
library: once with only itself removed (a specimen of a species the library holds) and once with
every reference of its species removed (a specimen of a species the library does not hold, the
novel-species case). For each rank, the nearest reference's label is right or wrong; the rank's
threshold is the similarity that best separates right from wrong answers (balanced accuracy).
So the species threshold separates "the library holds this species" from "it does not" (the
`novel` flag), and the genus, family and order thresholds say from which similarity the nearest
reference's genus, family and order can be trusted for a specimen of an absent species. `identify`
fills the answer from order down and stops at the first rank whose threshold the query's best
similarity does not clear (in the spirit of BOLD's 97/95/90/85 % identity cut-offs, but learned
per model and library).

The species rank (and with it the novel flag) may be judged on some parts of the embedding only:
those a tower declares `scores_novelty` (`clibd.towers.parts.select_parts`; e.g. the k-mer parts
of an aligned k-mer-profile DNA tower). The other ranks are judged on the whole embedding, which
places.

Usage:
    thresholds = calibrate_thresholds(embeddings, records)   # {"species": 0.93, "genus": 0.88, ...}
    thresholds = calibrate_thresholds(embeddings, records,
                                      novelty_embeddings=select_parts(embeddings, parts, "scores_novelty"))
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from .constants import RANKS


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


def nearest_held_out(embeddings: torch.Tensor, species: list[str], queries: list[int],
                     chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each query reference: (similarity, index) of its nearest other reference, and of its
    nearest reference of another species."""
    label_ids = {label: i for i, label in enumerate(sorted(set(species)))}
    key_species = torch.tensor([label_ids[label] for label in species])
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(queries), chunk_size):
        rows = torch.tensor(queries[start : start + chunk_size])
        sims = embeddings[rows] @ embeddings.T
        sims[torch.arange(len(rows)), rows] = -2.0  # a record is not its own reference
        loo = sims.max(dim=1)
        own_species = key_species[rows].unsqueeze(1) == key_species.unsqueeze(0)
        held_out = sims.masked_fill(own_species, -2.0).max(dim=1)
        parts.append((loo.values, loo.indices, held_out.values, held_out.indices))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def calibrate_thresholds(embeddings: torch.Tensor, records: list[dict], max_queries: int = 2000,
                         seed: int = 0, novelty_embeddings: torch.Tensor | None = None) -> dict[str, float]:
    """Per-rank similarity thresholds (see the module doc); NaN where a rank has no right or no
    wrong answers to separate (it then never stops an answer). The species threshold is on the
    cosine of `novelty_embeddings` (unit vectors, one per record; `embeddings` when None)."""
    species = [r.get("species", "") for r in records]
    counts = Counter(label for label in species if label)
    eligible = [i for i, label in enumerate(species) if label and counts[label] >= 2]
    queries = random.Random(seed).sample(eligible, min(max_queries, len(eligible)))
    if len(counts) < 2 or not queries:
        return dict.fromkeys(RANKS, float("nan"))
    placing = nearest_held_out(embeddings, species, queries)
    apart = novelty_embeddings is not None and novelty_embeddings is not embeddings
    novelty = nearest_held_out(novelty_embeddings, species, queries) if apart else placing
    thresholds = {}
    for rank in RANKS:
        loo_sims, loo_idx, out_sims, out_idx = novelty if rank == "species" else placing
        sims = torch.cat([loo_sims, out_sims]).tolist()
        nearest = torch.cat([loo_idx, out_idx]).tolist()
        right, wrong = [], []
        for query, sim, j in zip(queries + queries, sims, nearest, strict=True):
            truth = records[query].get(rank, "")
            if truth:
                (right if records[j].get(rank, "") == truth else wrong).append(sim)
        thresholds[rank] = best_threshold(right, wrong)
    return thresholds
