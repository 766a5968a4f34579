"""What an identify run compares: the query modality, the key set and the strategy, checked once.

`query`: "image", "dna" or "image+dna" (the normalised mean of a record's photo and barcode
embeddings, the paper's combined query). `keys`: one key modality of the library or several
stacked (["image", "dna"], the paper's "all"); `text` keys are taxon names. `strategy`: "nearest"
(the nearest key answers) or "is-du" (paper 5.4: image queries; the best image-key cosine above the
library's IS+DU threshold routes a query to the image keys, "seen", else to the DNA keys, "unseen").

Usage:
    plan = resolve_plan(library, model.config.modalities, records, keys=["dna"], query="image")
    embeddings, failures = embed_queries(model, processor, records, plan.query, batch_size=256)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checked_embedding import embed_checked
from .constants import QUERY_MODALITIES, STRATEGIES
from .library import ReferenceLibrary, keys_name
from .modeling_clibd import CLIBDModel
from .processing import CLIBDProcessor


@dataclass(frozen=True)
class QueryPlan:
    """A checked (query modality, key modalities, strategy) of one identify run.

    Usage:
        QueryPlan("image", ("dna",)); QueryPlan("image", ("image", "dna"), "is-du", threshold=0.8)
    """

    query: str
    keys: tuple[str, ...]
    strategy: str = "nearest"
    threshold: float | None = None  # is-du: the image-key cosine above which a query is "seen"

    @property
    def fields(self) -> list[str]:
        """The record fields a query needs ("image", "dna", or both for image+dna)."""
        return self.query.split("+")

    def describe(self) -> str:
        """One line for the TSV's provenance: what was compared, and how."""
        if self.strategy == "is-du":
            return f"query {self.query}; strategy is-du (image keys above {self.threshold:.4f}, else dna keys)"
        return f"query {self.query} -> keys {' '.join(self.keys)}; strategy nearest"


def _default_query(library: ReferenceLibrary, records: Sequence[dict]) -> str:
    """A single-modality index: its modality. A library: dna when any query has a barcode, else image."""
    if not library.is_library:
        return library.modalities[0]
    return "dna" if any(r.get("dna") for r in records) or not any(r.get("image") for r in records) else "image"


def resolve_plan(library: ReferenceLibrary, towers: Sequence[str], records: Sequence[dict],
                 keys: Sequence[str] | str | None = None, query: str | None = None, strategy: str | None = None,
                 threshold: float | None = None) -> QueryPlan:
    """The plan for `records`, defaults filled: query as `_default_query`; keys the query's own
    modality where the library holds it (image+dna: dna), else every image / dna key set stacked.
    A query or key modality the model has no tower for, or keys the library does not hold, is a
    `ValueError` naming it."""
    strategy = strategy or "nearest"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    keys = keys.split() if isinstance(keys, str) else keys
    if strategy == "is-du":
        query, keys = query or "image", keys or ["image", "dna"]
        if query != "image" or keys_name(keys) != "image dna":
            raise ValueError("strategy is-du answers photo queries (--query image) from image and dna keys "
                             f"(--keys image dna), not {query} queries against {' '.join(keys)} keys")
    query = query or _default_query(library, records)
    if query not in QUERY_MODALITIES:
        raise ValueError(f"unknown query modality {query!r}; use one of {QUERY_MODALITIES}")
    if not keys:
        own = "dna" if query == "image+dna" else query
        keys = [own] if own in library.modalities else [m for m in library.modalities if m != "text"]
    unknown = [m for m in keys if m not in ("image", "dna", "text")]
    if unknown:
        raise ValueError(f"unknown key modality {unknown}; keys are image, dna or text")
    no_tower = [m for m in [*query.split("+"), *keys] if m not in towers]
    if no_tower:
        raise ValueError(f"the model has no {' or '.join(sorted(set(no_tower)))} tower (its towers: "
                         f"{', '.join(towers)}): it cannot compare {query} queries with {' '.join(keys)} keys")
    library.keys(keys)  # a ValueError naming the key modalities the library does not hold
    if strategy == "is-du" and threshold is None:
        threshold = library.is_du_threshold()
        if threshold != threshold:  # NaN: nothing to calibrate from
            raise ValueError(f"{library.directory}: no IS+DU threshold could be calibrated (it needs labelled "
                             "records with a photo and a barcode whose species has other photos and barcodes); "
                             "give one (is_du_threshold=...)")
    return QueryPlan(query, tuple(keys_name(keys).split()), strategy, threshold)


def embed_queries(model: CLIBDModel, processor: CLIBDProcessor, records: list[dict], query: str, batch_size: int,
                  skip: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
    """Query embeddings [N, D] (CPU, float32, L2-normalised) and {position: why} of those that
    could not be embedded (`clibd.checked_embedding.embed_checked`); image+dna: the normalised
    mean of the two, failing where either fails.

    Usage:
        embeddings, failures = embed_queries(model, processor, records, "image+dna", 64, skip=True)
    """
    parts, failures = [], {}
    for modality in query.split("+"):
        embeddings, failed = embed_checked(model, processor, records, modality, batch_size, skip)
        parts.append(embeddings)
        for i, why in failed.items():
            failures.setdefault(i, why)
    if len(parts) == 1:
        return parts[0], failures
    return F.normalize(parts[0] + parts[1], dim=-1), failures
