"""Embedding that names what it cannot embed: unreadable inputs and non-finite numbers never pass silently.

A NaN in a model's weights or in one query's embedding makes every cosine NaN, and a NaN compares
false with every threshold: without these checks a damaged model answers one reference's species
for every query. `check_finite_weights` refuses such a model when it is loaded; `embed_checked`
embeds records and reports, per record, the ones whose input could not be read or whose
embedding is not finite, raising (`skip=False`) or returning them as failures (`skip=True`).

Usage:
    check_finite_weights(model, "runs/demo/best")
    embeddings, failures = embed_checked(model, processor, records, "dna", skip=True)  # {position: why}
"""

from __future__ import annotations

import math
import os

import torch

from .data.records import record_rows
from .modeling_clibd import CLIBDModel
from .processing import CLIBDProcessor
from .retrieval import embed_records

NOT_FINITE = "its embedding is not finite (NaN or inf): the input or the model's weights are damaged"


def check_finite_weights(model: CLIBDModel, source: str | os.PathLike) -> None:
    """A `ValueError` naming `source` and the tensors when any weight or buffer is NaN or inf.

    Usage:
        check_finite_weights(CLIBDModel.from_pretrained(path), path)
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{source}: the model's weights hold NaN or inf values ({len(bad)} tensors, e.g. "
                         f"{', '.join(bad[:3])}): the file is damaged; download or save the model again")


def not_finite_rows(embeddings: torch.Tensor) -> list[int]:
    """Positions of the rows of `embeddings` [N, D] that hold a NaN or an inf."""
    return torch.nonzero(~torch.isfinite(embeddings).all(dim=1)).flatten().tolist()


def _one_by_one(model: CLIBDModel, processor: CLIBDProcessor, records: list[dict], modality: str
                ) -> tuple[torch.Tensor, dict[int, str]]:
    """Embed records one at a time; a record that fails gets a NaN row and its error message."""
    rows, failures = [], {}
    for i, record in enumerate(records):
        try:
            rows.append(embed_records(model, processor, record_rows([record]), modality, 1))
        except ValueError as error:
            failures[i] = str(error)
            rows.append(torch.full((1, model.embedding_dim(modality)), math.nan))
    return (torch.cat(rows) if rows else torch.empty(0, model.embedding_dim(modality))), failures


def embed_checked(model: CLIBDModel, processor: CLIBDProcessor, records: list[dict], modality: str,
                  batch_size: int = 256, skip: bool = False) -> tuple[torch.Tensor, dict[int, str]]:
    """Embeddings [N, D] of `records` (as `clibd.retrieval.embed_records`) and {position: why} for
    the records that could not be embedded: an input the processor refuses (an unreadable or
    oversized photo, a bad barcode) or a non-finite embedding. `skip=False` raises a `ValueError`
    naming them; `skip=True` returns them (their rows hold NaN), so one bad photo costs one row.

    Usage:
        embeddings, failures = embed_checked(model, processor, records, "image", skip=True)
    """
    try:
        embeddings, failures = embed_records(model, processor, record_rows(records), modality, batch_size), {}
    except ValueError:
        if not skip:
            raise
        # one bad input fails its whole batch: find it, and keep the others
        embeddings, failures = _one_by_one(model, processor, records, modality)
    for i in not_finite_rows(embeddings):
        failures.setdefault(i, NOT_FINITE)
    if failures and not skip:
        shown = "; ".join(f"{records[i]['id']}: {why}" for i, why in list(failures.items())[:5])
        raise ValueError(f"{len(failures)} records could not be embedded: {shown}")
    return embeddings, failures
