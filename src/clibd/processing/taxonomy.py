"""Taxonomy -> the text the text tower reads: "order family genus species", `not_classified` for gaps.

Usage:
    taxonomy_text({"order": "Diptera", "family": "Cecidomyiidae"})
    # 'Diptera Cecidomyiidae not_classified not_classified'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..constants import RANKS

MISSING = "not_classified"
# Fields of the record schema that are not ranks; a record carrying them is still accepted.
RECORD_FIELDS = frozenset({"id", "processid", "dna", "image", "dna_barcode", "image_file"})


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", MISSING)


def taxonomy_ranks(taxonomy: Mapping[str, Any] | str | Any, record: str = "record") -> dict[str, str]:
    """The four ranks of a taxonomy given as a dict, a record object or a ';'-separated string.

    Missing ranks are empty strings. A rank name that is not one of order, family, genus,
    species raises `ValueError` naming the record.
    """
    if isinstance(taxonomy, str):
        parts = [part.strip() for part in taxonomy.split(";")]
        if len(parts) > len(RANKS):
            raise ValueError(f"{record}: taxonomy {taxonomy!r} has {len(parts)} ';'-separated ranks, at most 4 "
                             f"({', '.join(RANKS)})")
        values = dict(zip(RANKS, parts, strict=False))  # fewer parts = missing deeper ranks
    elif isinstance(taxonomy, Mapping):
        unknown = sorted(set(taxonomy) - set(RANKS) - RECORD_FIELDS)
        if unknown:
            raise ValueError(f"{record}: unknown taxonomic rank(s) {unknown}; known ranks: {', '.join(RANKS)}")
        values = {rank: taxonomy.get(rank) for rank in RANKS}
    elif all(hasattr(taxonomy, rank) for rank in RANKS):
        values = {rank: getattr(taxonomy, rank) for rank in RANKS}
    else:
        raise ValueError(f"{record}: taxonomy must be a dict, a record with {RANKS} or a string, "
                         f"got {type(taxonomy).__name__}")
    return {rank: "" if _is_missing(values.get(rank)) else str(values[rank]).strip() for rank in RANKS}


def taxonomy_text(taxonomy: Mapping[str, Any] | str | Any, record: str = "record") -> str:
    """The text-tower input for one specimen.

    A string without ';' is taken as already formatted text; otherwise ranks are joined with spaces
    and missing ones written `not_classified`.
    """
    if isinstance(taxonomy, str) and ";" not in taxonomy:
        if not taxonomy.strip():
            raise ValueError(f"{record}: taxonomy text is empty")
        return " ".join(taxonomy.split())
    ranks = taxonomy_ranks(taxonomy, record)
    if not any(ranks.values()):
        raise ValueError(f"{record}: taxonomy has no rank filled")
    return " ".join(ranks[rank] or MISSING for rank in RANKS)
