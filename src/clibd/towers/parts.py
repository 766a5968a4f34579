"""The parts of an embedding: what a tower declares about the dimensions it returns.

A tower's embedding may be several unit vectors concatenated, each scaled so that the cosine of
two embeddings is the weighted mean of the parts' cosines (e.g. the k-mer-profile tower: a learned
k-mer branch, a fixed random sketch of the profile, two branches over the aligned barcode). The
parts are data: the training objective cuts the embedding into its trained parts (one loss each),
and a reference index stores them to know which dimensions judge novelty.

Usage:
    parts = model.embedding_parts("dna")
    units = split_parts(embeds, parts)                 # one unit vector per part
    novelty = select_parts(embeds, parts, "scores_novelty")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EmbeddingPart:
    """A contiguous block of an embedding: `dim` wide, `weight` in the cosine, `trained` (it has
    a loss of its own), `scores_novelty` (its cosine says whether a library holds a species).

    Usage:
        EmbeddingPart("kmer_sketch", 1024, weight=1.0, trained=False)
    """

    name: str
    dim: int
    weight: float = 1.0
    trained: bool = True
    scores_novelty: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EmbeddingPart:
        return cls(**values)


def whole(dim: int) -> list[EmbeddingPart]:
    """The parts of a one-part embedding (image and text towers, the BarcodeBERT tower)."""
    return [EmbeddingPart("embedding", dim)]


def combine_parts(units: Sequence[torch.Tensor], parts: Sequence[EmbeddingPart]) -> torch.Tensor:
    """Unit vectors per part -> one unit vector whose cosines are the weighted mean of theirs.

    Usage:
        embeds = combine_parts([kmer_unit, sketch_unit], tower.embedding_parts())
    """
    if len(units) == 1:
        return units[0]
    total = sum(part.weight for part in parts)
    return torch.cat([(part.weight / total) ** 0.5 * unit for unit, part in zip(units, parts, strict=True)], dim=-1)


def split_parts(embeds: torch.Tensor, parts: Sequence[EmbeddingPart]) -> list[torch.Tensor]:
    """An embedding cut into its parts, each re-normalised to a unit vector (the inverse of `combine_parts`).

    Usage:
        kmer, sketch = split_parts(model.get_dna_features(**batch), model.embedding_parts("dna"))
    """
    if len(parts) == 1:
        return [embeds]
    pieces = embeds.split([part.dim for part in parts], dim=-1)
    return [F.normalize(piece, dim=-1) for piece in pieces]


def part_columns(parts: Sequence[EmbeddingPart], flag: str) -> list[int]:
    """Column indices of the parts whose boolean field `flag` is true."""
    columns, start = [], 0
    for part in parts:
        if getattr(part, flag):
            columns.extend(range(start, start + part.dim))
        start += part.dim
    return columns


def select_parts(embeds: torch.Tensor, parts: Sequence[EmbeddingPart], flag: str) -> torch.Tensor:
    """The unit vectors whose cosine is that of the parts flagged `flag` (e.g. "scores_novelty"),
    their weights kept; `embeds` itself when every part is flagged.

    Usage:
        novelty_keys = select_parts(index.embeddings, index.parts, "scores_novelty")
    """
    columns = part_columns(parts, flag)
    if not columns:
        raise ValueError(f"no part of the embedding has {flag}: {[p.name for p in parts]}")
    if len(columns) == embeds.shape[-1]:
        return embeds
    return F.normalize(embeds[..., columns].float(), dim=-1)

