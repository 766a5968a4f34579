"""Identify specimens against a reference index: typed predictions, and the predictions TSV.

`Identifier` loads an index and the model that built it once (weights hash checked once) and
gives one `Prediction` per query. `similarity` is the best cosine, which places the query;
`novelty_similarity` is the best cosine on the parts of the embedding that score novelty (the
same number unless the tower declares parts that do not: `EmbeddingPart.scores_novelty`). A
query whose novelty similarity is below the index's species threshold is `novel`; its answer
stops at the deepest rank whose threshold its similarity clears, deeper ranks are empty.

The TSV (`write_predictions_tsv`, `read_predictions_tsv`; `identify_to_tsv` streams and resumes):
a `# ` provenance line, then columns query_id, order, family, genus, species, similarity, novel,
order_support ... species_support (the fraction of the top-k references that agree with the
nearest one at that rank, like SINTAX's per-rank bootstrap), novelty_similarity, then hit1_id,
hit1_species, hit1_similarity, ... for the top-k references.

Usage:
    identifier = Identifier.load("refs/")
    predictions = identifier.identify(records, top_k=5)      # list[Prediction]
    identify_to_tsv(identifier, records, "preds.tsv")        # resumes if preds.tsv is partly written
"""

from __future__ import annotations

import csv
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from . import __version__
from .constants import RANKS
from .data import records_to_dataset
from .index import ReferenceIndex, require_field
from .modeling_clibd import CLIBDModel
from .processing import CLIBDProcessor
from .retrieval import SEARCH_BACKENDS, embed_records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
COMMENT = "# "  # provenance lines of a predictions TSV


@dataclass(frozen=True)
class Hit:
    """A reference among a query's nearest: its id, cosine similarity and taxonomy (rank -> label;
    read back from a TSV, the species only)."""

    id: str
    similarity: float
    taxonomy: dict[str, str]


@dataclass(frozen=True)
class Prediction:
    """The identification of one query.

    `answer`: rank -> label, "" below the deepest confident rank; `similarity`: best cosine
    (places the query); `novelty_similarity`: best cosine on the parts that score novelty;
    `novel`: the library probably does not hold the species; `support`: rank -> fraction of the
    top-k hits agreeing with the nearest one at that rank; `hits`: nearest first.
    """

    query_id: str
    answer: dict[str, str]
    similarity: float
    novelty_similarity: float
    novel: bool
    support: dict[str, float]
    hits: list[Hit]

    @property
    def deepest_rank(self) -> str | None:
        """The deepest rank the answer gives (e.g. "genus"), None when it gives none."""
        filled = [rank for rank in RANKS if self.answer.get(rank)]
        return filled[-1] if filled else None


def predict(query_id: str, hits: Sequence[Hit], thresholds: Mapping[str, float],
            novelty_similarity: float | None = None) -> Prediction:
    """The decision for one query from its hits (nearest first), the index's per-rank thresholds
    and its novelty similarity (the best similarity when None). The answer is filled from order
    down and stops at the first rank whose threshold is not cleared (species: by the novelty
    similarity); a rank without a calibrated threshold (NaN or absent) does not stop it.

    Usage:
        predict("q1", [Hit("k1", 0.95, {"order": "Diptera", ...}), ...], index.thresholds)
    """
    best = hits[0]
    novelty = best.similarity if novelty_similarity is None else novelty_similarity
    answer, support, confident = {}, {}, True
    for rank in RANKS:
        threshold = thresholds.get(rank, math.nan)
        score = novelty if rank == "species" else best.similarity
        confident = confident and (math.isnan(threshold) or score >= threshold)
        label = best.taxonomy.get(rank, "")
        answer[rank] = label if confident else ""
        support[rank] = sum(hit.taxonomy.get(rank, "") == label for hit in hits) / len(hits)
    species_threshold = thresholds.get("species", math.nan)
    novel = not math.isnan(species_threshold) and novelty < species_threshold
    return Prediction(query_id, answer, best.similarity, novelty, novel, support, list(hits))


class Identifier:
    """A reference index and the model that built it, loaded once, identifying batches of records.

    Usage:
        identifier = Identifier.load("refs/", model_dir=None, backend="torch")
        for batch in identifier.iter_identify(records, top_k=5): ...
    """

    def __init__(self, index: ReferenceIndex, model: CLIBDModel, processor: CLIBDProcessor,
                 model_dir: str | os.PathLike, backend: str = "torch", batch_size: int = 256,
                 progress: bool = False):
        if backend not in SEARCH_BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; use one of {SEARCH_BACKENDS}")
        self.index, self.model, self.processor = index, model, processor
        self.model_dir, self.backend, self.batch_size, self.progress = Path(model_dir), backend, batch_size, progress

    @classmethod
    def load(cls, index_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
             backend: str = "torch", batch_size: int = 256, progress: bool = False) -> Identifier:
        """Load the index at `index_dir` and its model: from `model_dir` (e.g. with an index pulled
        from the Hub) or where the index says; its weights must be the ones that built the index."""
        index = ReferenceIndex.load(index_dir)
        model_dir = model_dir or index.meta["model"]
        model, processor = index.load_model(model_dir)
        return cls(index, model, processor, model_dir, backend, batch_size, progress)

    def embed(self, records: Sequence[dict[str, str]]) -> torch.Tensor:
        """Embeddings [N, D] (float32, L2-normalised) of query records, by the index's modality."""
        records = list(records)
        self._check(records)
        dataset = records_to_dataset(records)
        return embed_records(self.model, self.processor, dataset, self.index.modality, self.batch_size)

    def identify_embeddings(self, embeddings: torch.Tensor, query_ids: Sequence[str],
                            top_k: int = 5) -> list[Prediction]:
        """Predictions for queries already embedded (`embed`), in order."""
        similarities, rows = self.index.search(embeddings, top_k, self.backend)
        novelty = (self.index.novelty_similarity(embeddings, self.backend) if self.index.scores_novelty_apart
                   else similarities[:, 0])
        thresholds = self.index.thresholds
        return [predict(query_id, [self._hit(j, s) for j, s in zip(js, ss, strict=True)], thresholds, n)
                for query_id, ss, js, n in zip(query_ids, similarities.tolist(), rows.tolist(), novelty.tolist(),
                                               strict=True)]

    def iter_identify(self, records: Iterable[dict[str, str]], top_k: int = 5) -> Iterator[list[Prediction]]:
        """Predictions batch by batch (`batch_size` records), so a long run holds one batch."""
        records = list(records)
        self._check(records)  # before the first batch, so no partial output
        starts = range(0, len(records), self.batch_size)
        for start in tqdm(starts, desc="identify", disable=not self.progress):
            batch = records[start : start + self.batch_size]
            yield self.identify_embeddings(self.embed(batch), [r["id"] for r in batch], top_k)

    def identify(self, records: Iterable[dict[str, str]], top_k: int = 5) -> list[Prediction]:
        """One `Prediction` per record (record schema: id and a dna barcode or image path), in order."""
        return [prediction for batch in self.iter_identify(records, top_k) for prediction in batch]

    def provenance_line(self) -> str:
        """The TSV's `# ` line: clibd version, model and its hash, index, thresholds."""
        index = self.index
        thresholds = ", ".join(f"{rank}={value:.4f}" for rank, value in index.thresholds.items())
        return (f"{COMMENT}clibd {__version__} identify; model {self.model_dir} "
                f"(sha256 {index.meta['model_hash'][:16]}); index {index.directory.resolve()} "
                f"({len(index.records)} {index.modality} references); thresholds {thresholds}\n")

    def _check(self, records: list[dict[str, str]]) -> None:
        require_field(records, self.index.modality, f"queries (this index holds {self.index.modality} references)")

    def _hit(self, row: int, similarity: float) -> Hit:
        record = self.index.records[row]
        return Hit(record["id"], similarity, {rank: record[rank] for rank in RANKS})


def image_records(paths: list[str]) -> list[dict[str, str]]:
    """Query records for photos: files as given, folders expanded to the image files inside.

    Usage:
        identifier.identify(image_records(["photos/"]))
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return [{"id": str(p), **dict.fromkeys(RANKS, ""), "dna": "", "image": str(p)} for p in files]


def prediction_columns(top_k: int) -> list[str]:
    """The TSV's columns for `top_k` hits."""
    hits = [f"hit{i}_{field}" for i in range(1, top_k + 1) for field in ("id", "species", "similarity")]
    return ["query_id", *RANKS, "similarity", "novel", *(f"{rank}_support" for rank in RANKS),
            "novelty_similarity", *hits]


def _row(prediction: Prediction) -> dict[str, str]:
    row = {"query_id": prediction.query_id, **{rank: prediction.answer.get(rank, "") for rank in RANKS},
           "similarity": f"{prediction.similarity:.4f}", "novel": str(prediction.novel).lower(),
           **{f"{rank}_support": f"{prediction.support[rank]:.2f}" for rank in RANKS},
           "novelty_similarity": f"{prediction.novelty_similarity:.4f}"}
    for i, hit in enumerate(prediction.hits, start=1):
        row |= {f"hit{i}_id": hit.id, f"hit{i}_species": hit.taxonomy.get("species", ""),
                f"hit{i}_similarity": f"{hit.similarity:.4f}"}
    return row


def _prediction(row: dict[str, str]) -> Prediction:
    hits, i = [], 1
    while row.get(f"hit{i}_id"):
        hits.append(Hit(row[f"hit{i}_id"], float(row[f"hit{i}_similarity"]), {"species": row[f"hit{i}_species"]}))
        i += 1
    return Prediction(row["query_id"], {rank: row[rank] for rank in RANKS}, float(row["similarity"]),
                      float(row["novelty_similarity"]), row["novel"] == "true",
                      {rank: float(row[f"{rank}_support"]) for rank in RANKS}, hits)


def write_predictions_tsv(predictions: Iterable[Prediction], stream: TextIO, top_k: int, header: bool = True) -> None:
    """Write predictions as TSV rows (similarities to 4 decimals, support to 2) with `top_k` hit
    columns (hits beyond a prediction's own are empty), after the header line when `header`.

    Usage:
        write_predictions_tsv(identifier.identify(records), sys.stdout, top_k=5)
    """
    writer = csv.DictWriter(stream, fieldnames=prediction_columns(top_k), delimiter="\t", lineterminator="\n",
                            extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(_row(prediction) for prediction in predictions)


def _table(lines: Iterable[str]) -> csv.DictReader:
    """The rows of a predictions TSV: the one place that skips its provenance lines."""
    return csv.DictReader((line for line in lines if not line.startswith(COMMENT)), delimiter="\t")


def read_predictions_tsv(path: str | os.PathLike) -> list[Prediction]:
    """Predictions from a TSV written by `clibd identify` (values at the file's precision; hits
    carry their species only).

    Usage:
        predictions = read_predictions_tsv("preds.tsv")
    """
    with open(path, newline="") as f:
        return [_prediction(row) for row in _table(f)]


def _run_of(provenance: str) -> tuple[str, ...] | None:
    """What must agree for a file to be resumed: model hash, index (path, size), thresholds."""
    match = re.search(r"\(sha256 (\w+)\); index (.*); thresholds (.*)$", provenance.strip())
    return match.groups() if provenance.startswith(COMMENT) and match else None


def _resume(path: Path, provenance: str, columns: list[str]) -> set[str] | None:
    """Query ids already written to `path`; None when there is nothing to resume (no file, or one
    cut before its header). A last line cut by an interruption is removed first. A file written
    by another run (model, index, thresholds) or with another top-k is a `ValueError`."""
    if not path.exists():
        return None
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        table = _table(f)
        if table.fieldnames is None:
            return None
        if _run_of(first) != _run_of(provenance):
            raise ValueError(f"{path} holds predictions of another run ({first.strip() or 'no provenance line'}); "
                             f"this run: {provenance.strip()}. Write to a new file or remove it")
        if table.fieldnames != columns:
            raise ValueError(f"{path} was written with another --top-k ({len(table.fieldnames)} columns, "
                             f"this run writes {len(columns)}); write to a new file or remove it")
        return {row["query_id"] for row in table}


def identify_to_tsv(identifier: Identifier, records: Sequence[dict[str, str]],
                    out: str | os.PathLike | None = None, top_k: int = 5) -> int:
    """Stream predictions for `records` as TSV to `out` (stdout when None); return rows written.

    Rows are appended batch by batch and flushed, so an interrupted run, started again with the
    same `out`, skips the queries already written (the file's provenance must match this run).

    Usage:
        identify_to_tsv(Identifier.load("refs/", progress=True), records, "preds.tsv", top_k=5)
    """
    top_k = min(top_k, len(identifier.index.records))
    done = _resume(Path(out), identifier.provenance_line(), prediction_columns(top_k)) if out is not None else None
    todo = [r for r in records if r["id"] not in done] if done is not None else list(records)
    stream: TextIO = sys.stdout if out is None else open(out, "w" if done is None else "a", newline="")  # noqa: SIM115
    try:
        if done is None:
            stream.write(identifier.provenance_line())
            write_predictions_tsv([], stream, top_k)
        written = 0
        for batch in identifier.iter_identify(todo, top_k):
            write_predictions_tsv(batch, stream, top_k, header=False)
            stream.flush()
            written += len(batch)
    finally:
        if out is not None:
            stream.close()
    return written
