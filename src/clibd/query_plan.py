"""What an identify run compares: the query modality, the key set and the strategy, checked once.

`query`: "image", "dna", "text" (the record's taxonomy through the text tower), "image+dna" (the
normalised mean of a record's photo and barcode embeddings, the paper's "averaged" feature) or
"image+dna-concat" (the two concatenated, "concatenated"): every query feature of
`clibd.evaluation.pairs`, built as the evaluation builds it. `keys`: one key kind of the library or
several stacked (["image", "dna", "text"], the paper's "all"); `text` keys are taxon names;
"image+dna" / "image+dna-concat" keys are the library's image and DNA keys of the records that have
both, joined the same way (searched alone). A query and keys of different widths (a concatenated
query against single keys, a multi-part DNA embedding) cannot be compared. `strategy`: "nearest"
(the nearest key answers) or "is-du" (paper 5.4: image queries; the best image-key cosine above the
library's IS+DU threshold routes a query to the image keys, "seen", else to the DNA keys, "unseen").

Usage:
    plan = resolve_plan(library, model.config.modalities, records, keys=["dna"], query="image")
    embeddings, failures = embed_queries(model, processor, records, plan.query, batch_size=256)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .checked_embedding import embed_checked
from .constants import KEY_KINDS, QUERY_MODALITIES, RANKS, STRATEGIES
from .library import CONCAT, MEAN, ReferenceLibrary, combine, feature_parts, keys_name
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
        """What a query needs embedded: "image", "dna", "text" (its ranks), or image and dna.

        Usage:
            QueryPlan("image+dna", ("dna",)).fields   # ["image", "dna"]
        """
        return feature_parts(self.query)

    def describe(self) -> str:
        """One line for the TSV's provenance: what was compared, and how.

        Usage:
            plan.describe()   # "query image -> keys dna; strategy nearest"
        """
        if self.strategy == "is-du":
            return f"query {self.query}; strategy is-du (image keys above {self.threshold:.4f}, else dna keys)"
        return f"query {self.query} -> keys {' '.join(self.keys)}; strategy nearest"


def _default_query(library: ReferenceLibrary, records: Sequence[dict]) -> str:
    """A single-modality index: its modality, unless no query carries it and some carry the other
    (then theirs, which `resolve_plan` refuses where the keys hold none of it). A library: dna when
    any query has a barcode, else image."""
    if not library.is_library:
        own = library.modalities[0]
        carried = [m for m in ("dna", "image") if any(r.get(m) for r in records)]
        return own if own in carried or not carried else carried[0]
    return "dna" if any(r.get("dna") for r in records) or not any(r.get("image") for r in records) else "image"


def resolve_plan(library: ReferenceLibrary, towers: Sequence[str], records: Sequence[dict],
                 keys: Sequence[str] | str | None = None, query: str | None = None, strategy: str | None = None,
                 threshold: float | None = None, dims: Mapping[str, int] | None = None) -> QueryPlan:
    """The plan for `records`, defaults filled: query as `_default_query`; keys the query's own
    kind where the library holds it (image+dna: dna), else every image / dna key set stacked.
    A query or key kind the model has no tower for, keys the library does not hold, or a query and
    keys of different widths (`dims`: each tower's embedding width, default the library's key
    widths) is a `ValueError` naming it.

    Usage:
        plan = resolve_plan(library, model.config.modalities, records, keys=["dna"], query="image")
    """
    strategy = strategy or "nearest"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    keys = keys.split() if isinstance(keys, str) else keys
    if strategy == "is-du":
        query, keys = query or "image", keys or ["image", "dna"]
        if query != "image" or keys_name(keys) != "image dna":
            raise ValueError("strategy is-du answers photo queries (--query image) from image and dna keys "
                             f"(--keys image dna), not {query} queries against {' '.join(keys)} keys")
    chosen_query = query or _default_query(library, records)
    if chosen_query not in QUERY_MODALITIES:
        raise ValueError(f"unknown query modality {chosen_query!r}; use one of {QUERY_MODALITIES}")
    if not keys:
        own = "dna" if chosen_query == MEAN else chosen_query
        held = set(feature_parts(own)) <= set(library.modalities)
        if not held and not query:  # e.g. photos against DNA keys: no rank could be calibrated, none answered
            raise ValueError(f"the queries are {own} but {library.directory} holds {' and '.join(library.modalities)} "
                             f"keys: identify them against keys of their own kind (a library: clibd index build "
                             f"--modality image dna), or ask for it with --query {own} (query=... in Python; "
                             "uncalibrated: no rank is answered)")
        keys = [own] if held else [m for m in library.modalities if m != "text"]
    query = chosen_query
    unknown = [m for m in keys if m not in KEY_KINDS]
    if unknown:
        raise ValueError(f"unknown key kind {unknown}; keys are {', '.join(KEY_KINDS)}")
    no_tower = [m for kind in [query, *keys] for m in feature_parts(kind) if m not in towers]
    if no_tower:
        raise ValueError(f"the model has no {' or '.join(sorted(set(no_tower)))} tower (its towers: "
                         f"{', '.join(towers)}): it cannot compare {query} queries with {' '.join(keys)} keys")
    library.require(keys)  # a ValueError naming the key modalities the library does not hold
    check_widths(query, keys, dims or {m: k.embeddings.shape[1] for m, k in library.key_sets.items()})
    if strategy == "is-du" and threshold is None:
        threshold = library.is_du_threshold()
        if threshold != threshold:  # NaN: nothing to calibrate from
            raise ValueError(f"{library.directory}: no IS+DU threshold could be calibrated (it needs labelled "
                             "records with a photo and a barcode whose species has other photos and barcodes); "
                             "give one (is_du_threshold=...)")
    return QueryPlan(query, tuple(keys_name(keys).split()), strategy, threshold)


def feature_width(kind: str, dims: Mapping[str, int]) -> int | None:
    """The width of a query / key kind (`dims`: per tower; None where a tower's width is unknown);
    a `ValueError` for `image+dna` when the image and DNA widths differ (no mean exists).

    Usage:
        feature_width("image+dna-concat", {"image": 512, "dna": 512})   # 1024
    """
    parts = [dims.get(m) for m in feature_parts(kind)]
    if None in parts:
        return None
    if kind == MEAN and parts[0] != parts[1]:
        raise ValueError(f"image+dna (the mean of the image and DNA embeddings) needs equally wide embeddings; "
                         f"image is {parts[0]} wide, dna {parts[1]}: use image+dna-concat")
    return parts[0] if kind == MEAN else sum(parts)


def check_widths(query: str, keys: Sequence[str], dims: Mapping[str, int]) -> None:
    """A `ValueError` naming both sides when `query` embeddings and `keys` differ in width (the
    evaluation skips such pairs: a cosine needs equal widths).

    Usage:
        check_widths("image+dna-concat", ["dna"], {"image": 512, "dna": 512})   # raises: 1024 vs 512
    """
    key_widths = {kind: feature_width(kind, dims) for kind in keys}
    query_width = feature_width(query, dims)
    for kind, width in key_widths.items():
        if None not in (width, query_width) and width != query_width:
            raise ValueError(f"{query} queries are {query_width} wide and {kind} keys {width} wide: they cannot "
                             f"be compared (choose keys as wide as the query, e.g. --query {CONCAT} with "
                             f"--keys {CONCAT})")


def query_problems(records: Sequence[dict], field: str) -> dict[int, str]:
    """Position -> why, for `records` that lack what a query needs for `field` (text: a rank);
    the plain fields are checked by `clibd.index.unusable`.

    Usage:
        query_problems(records, "text")   # {3: "no taxonomy (...)"} for a record with no rank
    """
    if field != "text":
        return {}
    return {i: "no taxonomy (a text query reads its order, family, genus and species)"
            for i, r in enumerate(records) if not r.get("error") and not any(r.get(rank) for rank in RANKS)}


def embed_queries(model: CLIBDModel, processor: CLIBDProcessor, records: list[dict], query: str, batch_size: int,
                  skip: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
    """Query embeddings [N, D] (CPU, float32, L2-normalised) and {position: why} of those that
    could not be embedded (`clibd.checked_embedding.embed_checked`); the combined kinds joined as
    `clibd.library.combine` (as the evaluation), failing where either fails.

    Usage:
        embeddings, failures = embed_queries(model, processor, records, "image+dna", 64, skip=True)
    """
    parts, failures = [], {}
    for modality in feature_parts(query):
        embeddings, failed = embed_checked(model, processor, records, modality, batch_size, skip)
        parts.append(embeddings)
        for i, why in failed.items():
            failures.setdefault(i, why)
    if len(parts) == 1:
        return parts[0], failures
    return combine(parts[0], parts[1], query), failures
