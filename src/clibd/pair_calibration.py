"""Thresholds for a query modality against another modality's keys, and the IS+DU switch, learned
on a multi-modal reference library itself (no split, no training data needed).

Same-modality keys are calibrated as `clibd.novelty.calibrate` does (each reference matched with
itself removed, then with its whole taxon removed). Across modalities the queries are the library's
own references in the query modality (a photo of a record whose barcode is a DNA key; the mean of a
record's photo and barcode for `image+dna`), matched against the keys with that record's own keys
removed (a specimen of a species the library holds) and with every key of its taxon removed (a
species it does not hold). Text keys belong to no record: their held-out case removes the keys of
the query's taxon (its species name; the genus and family names stay, which is what a specimen of
an unnamed species should land on). The thresholds are then set per rank as in `clibd.novelty`.
As there, where the model records the species it trained on (`CLIBDConfig.trained_species`) and
enough others are there, only queries of those others are held out (`clibd.novelty.new_species_pool`).

IS+DU (paper 5.4): an image query whose best image-key cosine is above a threshold is answered
from the image keys ("seen"), otherwise from the DNA keys ("unseen"). `calibrate_is_du` sets the
threshold on the library: photos of records are matched with their own keys removed (seen: the
species keeps its other photos) and with every photo of their species removed but the species'
barcodes kept (unseen: barcoded, never photographed); the threshold maximises the harmonic mean of
seen and unseen species top-1 accuracy, as the paper tunes it on validation.

Usage:
    calibration = calibrate_pair(queries, query_records, query_owner, keys, key_records, key_owner)
    is_du = calibrate_is_du(photos, photo_owner, image_keys, image_owner, dna_keys, dna_owner, records)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import torch

from .constants import RANKS
from .novelty import (
    MIN_UNTRAINED_REFERENCES,
    MIN_UNTRAINED_SPECIES,
    Calibration,
    CalibrationSample,
    answers_at,
    calibration_from_answers,
    new_species_pool,
)
from .thresholds import PRECISION_CONFIDENCE

NO_KEY = -2.0  # the similarity given to removed keys


def held_out_rank(records: Sequence[dict]) -> str | None:
    """The deepest rank the records label (what calibration holds out).

    Usage:
        held_out_rank([{"genus": "Aedes", "species": ""}])   # "genus"
    """
    return next((rank for rank in reversed(RANKS) if any(r.get(rank) for r in records)), None)


def _ids(labels: Sequence[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """Labels as integers ("" and labels of one side only get distinct ids: never equal to a key's)."""
    return torch.tensor([vocabulary.setdefault(label, len(vocabulary)) if label else -1 - i
                         for i, label in enumerate(labels)])


def nearest_pair(queries: torch.Tensor, query_owner: torch.Tensor, query_taxa: torch.Tensor, keys: torch.Tensor,
                 key_owner: torch.Tensor, key_taxa: torch.Tensor, chunk_size: int = 512) -> tuple[torch.Tensor, ...]:
    """(similarity, key) of each query's nearest key with its own keys removed (same owner), and
    with its own keys and every key of its taxon removed. Owners < 0 own nothing.

    Usage:
        loo_sim, loo_key, held_sim, held_key = nearest_pair(queries, owner, taxa, keys, key_owner, key_taxa)
    """
    keys = keys.float()
    out: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, queries.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        sims = queries[rows].float() @ keys.T
        own = (query_owner[rows, None] == key_owner[None, :]) & (key_owner[None, :] >= 0)
        sims = sims.masked_fill(own, NO_KEY)
        loo = sims.max(dim=1)
        held = sims.masked_fill(query_taxa[rows, None] == key_taxa[None, :], NO_KEY).max(dim=1)
        out.append((loo.values, loo.indices, held.values, held.indices))
    if not out:
        empty = torch.empty(0)
        return empty, empty.long(), empty, empty.long()
    return tuple(torch.cat(column) for column in zip(*out, strict=True))


def _sample(query_taxa: torch.Tensor, query_owner: torch.Tensor, key_taxa: torch.Tensor, key_owner: torch.Tensor,
            max_queries: int, seed: int, query_species: Sequence[str],
            trained_species: Sequence[str] | None = None, *, text_queries: bool) -> CalibrationSample:
    """The queries to hold out: labelled ones, those of taxa with another key preferred, only those
    of species the model did not train on where there are enough (as `clibd.novelty` samples;
    `text_queries`: the queries are taxon names, one per taxon, so they need `MIN_UNTRAINED_SPECIES`
    of them, no more); `shared`: those whose taxon keeps a key once their own keys are removed."""
    counts = Counter(key_taxa.tolist())
    own = Counter(zip(key_owner.tolist(), key_taxa.tolist(), strict=True))
    labelled = [i for i, t in enumerate(query_taxa.tolist()) if t >= 0]
    shared = [i for i in labelled if counts[int(query_taxa[i])] - own[(int(query_owner[i]), int(query_taxa[i]))] > 0]
    pool, new = new_species_pool(shared or labelled, query_species, trained_species,
                                 MIN_UNTRAINED_SPECIES if text_queries else MIN_UNTRAINED_REFERENCES)
    queries = random.Random(seed).sample(pool, min(max_queries, len(pool)))
    shared_set = set(shared)
    return CalibrationSample(queries, {i for i in queries if i in shared_set}, **new)


def _nothing_to_learn(rank: str | None, precision: float | None) -> Calibration:
    """The calibration of a pair with no answers to learn from: NaN thresholds ("none"), no answer
    at any rank; the stated precision kept."""
    return Calibration(dict.fromkeys(RANKS, float("nan")), dict.fromkeys(RANKS, "none"), {}, rank,
                       precision=precision, confidence_level=None if precision is None else PRECISION_CONFIDENCE)


def calibrate_pair(queries: torch.Tensor, query_records: Sequence[dict], query_owner: Sequence[int],
                   keys: torch.Tensor, key_records: Sequence[dict], key_owner: Sequence[int],
                   max_queries: int = 2000, seed: int = 0, precision: float | None = None,
                   trained_species: Sequence[str] | None = None, text_queries: bool = False) -> Calibration:
    """Per-rank thresholds for `queries` (unit vectors, one per `query_records`) against `keys`
    (one per `key_records`); `*_owner`: the library record each belongs to (-1: none, e.g. text keys);
    `trained_species`: the model's, None where it does not say (`clibd.novelty.new_species_pool`);
    `text_queries`: the queries are taxon names (text keys, one per taxon), whose new species are
    held out alone from `MIN_UNTRAINED_SPECIES` queries on (specimens need `MIN_UNTRAINED_REFERENCES`).

    Usage:
        calibration = calibrate_pair(photos, photo_records, photo_rows, dna_keys, dna_records, dna_rows)
    """
    rank = held_out_rank(key_records)
    if rank is None or len(key_records) == 0 or len(query_records) == 0:
        return _nothing_to_learn(rank, precision)
    vocabulary: dict[str, int] = {}
    key_taxa = _ids([r.get(rank, "") for r in key_records], vocabulary)
    query_taxa = _ids([r.get(rank, "") for r in query_records], vocabulary)
    query_taxa = torch.where(query_taxa < 0, query_taxa - len(key_records), query_taxa)  # never a key's
    query_owner_t, key_owner_t = torch.tensor(list(query_owner)), torch.tensor(list(key_owner))
    sample = _sample(query_taxa, query_owner_t, key_taxa, key_owner_t, max_queries, seed,
                     [r.get("species", "") for r in query_records], trained_species if rank == "species" else None,
                     text_queries=text_queries)
    if not sample.rows:
        return _nothing_to_learn(rank, precision)
    chosen, index = sample.rows, torch.tensor(sample.rows)
    matches = nearest_pair(queries[index], query_owner_t[index], query_taxa[index], keys, key_owner_t, key_taxa)
    answers = {level: answers_at(query_records, level, chosen, sample.shared, matches, key_records) for level in RANKS}
    return calibration_from_answers(answers, rank, precision, sample=sample)


def _route_accuracy(sims: torch.Tensor, seen_right: torch.Tensor, unseen_right: torch.Tensor,
                    cuts: torch.Tensor) -> torch.Tensor:
    """Accuracy [C] of IS+DU routing at each cut: the image answer where the similarity is above it."""
    use_image = sims[None, :] > cuts[:, None]
    return torch.where(use_image, seen_right[None, :], unseen_right[None, :]).float().mean(dim=1)


def calibrate_is_du(photos: torch.Tensor, photo_owner: Sequence[int], image_keys: torch.Tensor,
                    image_owner: Sequence[int], dna_keys: torch.Tensor, dna_owner: Sequence[int],
                    records: Sequence[dict], max_queries: int = 2000, seed: int = 0) -> dict:
    """The IS+DU threshold of a library (see the module doc): {"threshold", "seen", "unseen", "hm",
    "queries"} (accuracies at the threshold on the calibration photos); threshold NaN when the
    library has no labelled photo of a record whose species has other photos and barcodes.
    `photos`: image embeddings of records (`photo_owner`: their positions in `records`).

    Usage:
        calibrate_is_du(image_keys, image_rows, image_keys, image_rows, dna_keys, dna_rows, records)
    """
    vocabulary: dict[str, int] = {}
    species = _ids([r.get("species", "") for r in records], vocabulary)
    image_owner_t, dna_owner_t = torch.tensor(list(image_owner)), torch.tensor(list(dna_owner))
    photo_owner_t = torch.tensor(list(photo_owner))
    image_taxa, dna_taxa, photo_taxa = species[image_owner_t], species[dna_owner_t], species[photo_owner_t]
    image_counts, dna_counts = Counter(image_taxa.tolist()), Counter(dna_taxa.tolist())
    own_image = Counter(zip(image_owner_t.tolist(), image_taxa.tolist(), strict=True))
    own_dna = Counter(zip(dna_owner_t.tolist(), dna_taxa.tolist(), strict=True))
    pool = [i for i, (o, t) in enumerate(zip(photo_owner_t.tolist(), photo_taxa.tolist(), strict=True))
            if t >= 0 and image_counts[t] - own_image[(o, t)] > 0 and dna_counts[t] - own_dna[(o, t)] > 0]
    if not pool:
        return {"threshold": float("nan"), "seen": float("nan"), "unseen": float("nan"), "hm": float("nan"),
                "queries": 0}
    chosen = torch.tensor(sorted(random.Random(seed).sample(pool, min(max_queries, len(pool)))))
    owner, taxa, queries = photo_owner_t[chosen], photo_taxa[chosen], photos[chosen]
    seen_sim, seen_key, held_sim, held_key = nearest_pair(queries, owner, taxa, image_keys, image_owner_t, image_taxa)
    _, dna_key, _, _ = nearest_pair(queries, owner, taxa, dna_keys, dna_owner_t, dna_taxa)
    dna_right = dna_taxa[dna_key] == taxa  # DU: the own barcode removed, the species' others kept
    seen_right, held_right = image_taxa[seen_key] == taxa, image_taxa[held_key] == taxa  # the latter never
    cuts = torch.cat([torch.tensor([-1.0]), torch.cat([seen_sim, held_sim]).unique()])
    seen_acc = _route_accuracy(seen_sim, seen_right, dna_right, cuts)
    unseen_acc = _route_accuracy(held_sim, held_right, dna_right, cuts)
    hm = torch.where(seen_acc + unseen_acc > 0, 2 * seen_acc * unseen_acc / (seen_acc + unseen_acc).clamp_min(1e-12),
                     torch.zeros_like(seen_acc))
    best = int(hm.argmax())
    # midway to the next higher similarity seen: no calibration photo sits on the threshold itself
    threshold = float((cuts[best] + cuts[best + 1]) / 2) if best + 1 < len(cuts) else float(cuts[best])
    return {"threshold": threshold, "seen": float(seen_acc[best]), "unseen": float(unseen_acc[best]),
            "hm": float(hm[best]), "queries": len(chosen)}
