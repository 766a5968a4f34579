"""Identify specimens against a reference index: typed predictions, and the predictions TSV.

`Identifier` loads an index and the model that built it once (weights hash checked once) and
gives one `Prediction` per query. `similarity` is the best cosine, which places the query;
`novelty_similarity` is the best cosine on the parts of the embedding that score novelty (the
same number unless the tower declares parts that do not: `EmbeddingPart.scores_novelty`). A
query whose novelty similarity is below the index's species threshold is `novel`; its answer
stops at the deepest rank whose threshold its similarity clears, deeper ranks are empty. A DNA
index with a species check (`clibd.species_check`) first aligns the query with its nearest
references: one at least 97 % identical names the species (and the lineage), and the query is
not novel; the others are decided as above, with the check's own species threshold.

The TSV (`write_predictions_tsv`, `read_predictions_tsv`; `identify_to_tsv` streams and resumes):
a `# ` provenance line, then columns query_id, order, family, genus, species, similarity, novel,
order_support ... species_support (the fraction of the top-k references that agree with the
nearest one at that rank, like SINTAX's per-rank bootstrap), novelty_similarity, order_precision
... species_precision (the calibrated precision of the answer at that rank, empty where none is
given), identity (the best alignment identity to the nearest references, where the index has
a species check: `clibd.species_check`), error (why a query could not be identified; its other
columns are then empty), then
hit1_id, hit1_species, hit1_similarity, ... for the top-k references.

Usage:
    identifier = Identifier.load("refs/")
    predictions = identifier.identify(records, top_k=5)      # list[Prediction]
    identify_to_tsv(identifier, records, "preds.tsv")        # resumes if preds.tsv is partly written
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_write_text
from .checked_embedding import embed_checked
from .constants import RANKS
from .index import ReferenceIndex, require_field, unusable
from .modeling_clibd import CLIBDModel
from .novelty import precision_at
from .processing import CLIBDProcessor
from .retrieval import SEARCH_BACKENDS
from .species_check import SpeciesCheck, choose_candidate

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
COMMENT = "# "  # provenance lines of a predictions TSV
ON_BAD_INPUT = ("error", "skip")
logger = logging.getLogger(__name__)


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
    top-k hits agreeing with the nearest one at that rank; `hits`: nearest first; `error`: why
    the query could not be identified (`on_bad_input="skip"`: then no answer, no hits, NaN
    similarities), "" otherwise; `precision`: rank -> how often the index's calibration answers
    at this similarity were right at that rank, for the ranks answered (where the index has a curve);
    `identity`: the best alignment identity to the nearest references (`clibd.species_check`; NaN
    where the index has no species check), which names the species when it clears the cut-off.
    """

    query_id: str
    answer: dict[str, str]
    similarity: float
    novelty_similarity: float
    novel: bool
    support: dict[str, float]
    hits: list[Hit]
    error: str = ""
    precision: dict[str, float] = field(default_factory=dict)
    identity: float = math.nan

    @property
    def deepest_rank(self) -> str | None:
        """The deepest rank the answer gives (e.g. "genus"), None when it gives none."""
        filled = [rank for rank in RANKS if self.answer.get(rank)]
        return filled[-1] if filled else None


def predict(query_id: str, hits: Sequence[Hit], thresholds: Mapping[str, float],
            novelty_similarity: float | None = None,
            curves: Mapping[str, list[tuple[float, float]]] | None = None) -> Prediction:
    """The decision for one query from its hits (nearest first), the index's per-rank thresholds
    and its novelty similarity (the best similarity when None). The answer is filled from order
    down and stops at the first rank whose threshold is not cleared (species: by the novelty
    similarity). A rank whose threshold could not be calibrated (NaN) stops it too: no answer
    is better than an unchecked one; an absent threshold (an index built with
    `calibrate=False`) does not stop it.

    Usage:
        predict("q1", [Hit("k1", 0.95, {"order": "Diptera", ...}), ...], index.thresholds)
    """
    best = hits[0]
    novelty = best.similarity if novelty_similarity is None else novelty_similarity
    answer, support, confident = {}, {}, True
    for rank in RANKS:
        threshold = thresholds.get(rank, -math.inf)
        score = novelty if rank == "species" else best.similarity
        confident = confident and score >= threshold  # False for a NaN threshold
        label = best.taxonomy.get(rank, "")
        answer[rank] = label if confident else ""
        support[rank] = sum(hit.taxonomy.get(rank, "") == label for hit in hits) / len(hits)
    novel = not novelty >= thresholds.get("species", -math.inf)
    curves = curves or {}
    precision = {rank: precision_at(curves.get(rank, []), novelty if rank == "species" else best.similarity)
                 for rank in RANKS if answer[rank]}
    precision = {rank: value for rank, value in precision.items() if not math.isnan(value)}
    return Prediction(query_id, answer, best.similarity, novelty, novel, support, list(hits), precision=precision)


def failed(query_id: str, reason: str) -> Prediction:
    """The row of a query that could not be identified: no answer, no hits, and why.

    Usage:
        failed("photo_17.jpg", "unreadable or truncated image")
    """
    return Prediction(query_id, dict.fromkeys(RANKS, ""), math.nan, math.nan, False, dict.fromkeys(RANKS, 0.0), [],
                      reason)


class Identifier:
    """A reference index and the model that built it, loaded once, identifying batches of records.

    Usage:
        identifier = Identifier.load("refs/", model_dir=None, backend="torch")
        for batch in identifier.iter_identify(records, top_k=5): ...
    """

    def __init__(self, index: ReferenceIndex, model: CLIBDModel, processor: CLIBDProcessor,
                 model_dir: str | os.PathLike, backend: str = "torch", batch_size: int = 256,
                 progress: bool = False, on_bad_input: str = "error"):
        if backend not in SEARCH_BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; use one of {SEARCH_BACKENDS}")
        if on_bad_input not in ON_BAD_INPUT:
            raise ValueError(f"on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
        self.index, self.model, self.processor = index, model, processor
        self.model_dir, self.backend, self.batch_size, self.progress = Path(model_dir), backend, batch_size, progress
        self.on_bad_input = on_bad_input

    @classmethod
    def load(cls, index_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
             backend: str = "torch", batch_size: int = 256, progress: bool = False,
             on_bad_input: str = "error") -> Identifier:
        """Load the index at `index_dir` and its model: from `model_dir` (e.g. with an index pulled
        from the Hub) or where the index says; its weights must be the ones that built the index.
        `on_bad_input`: "error" raises at a query that cannot be identified (naming it), "skip"
        gives it a `failed` prediction (its `error` says why) and goes on."""
        index = ReferenceIndex.load(index_dir)
        model_dir = model_dir or index.meta["model"]
        model, processor = index.load_model(model_dir)
        return cls(index, model, processor, model_dir, backend, batch_size, progress, on_bad_input)

    def embed(self, records: Sequence[dict[str, str]]) -> torch.Tensor:
        """Embeddings [N, D] (float32, L2-normalised) of query records, by the index's modality."""
        records = list(records)
        self._check(records)
        return embed_checked(self.model, self.processor, records, self.index.modality, self.batch_size)[0]

    def identify_embeddings(self, embeddings: torch.Tensor, query_ids: Sequence[str], top_k: int = 5,
                            barcodes: Sequence[str] | None = None) -> list[Prediction]:
        """Predictions for queries already embedded (`embed`), in order. With the queries'
        `barcodes` and an index that has a species check, alignment settles the species where it can."""
        check = self.index.species_check if barcodes is not None else None
        similarities, rows = self.index.search(embeddings, max(top_k, check.candidates) if check else top_k,
                                               self.backend)
        if not torch.isfinite(similarities).all():  # queries are checked when embedded: a key is damaged
            raise ValueError(f"{self.index.directory / 'embeddings.safetensors'}: holds embeddings that are not "
                             "finite (NaN or inf): the index is damaged; rebuild it")
        novelty = (self.index.novelty_similarity(embeddings, self.backend) if self.index.scores_novelty_apart
                   else similarities[:, 0])
        thresholds, curves = self.index.thresholds, self.index.precision_curves
        if check:  # the species threshold of the queries alignment leaves to the embedding
            thresholds = {**thresholds, "species": check.embedding_threshold}
        predictions = []
        for n, (query_id, ss, js, novelty_sim) in enumerate(zip(query_ids, similarities.tolist(), rows.tolist(),
                                                                 novelty.tolist(), strict=True)):
            hits = [self._hit(j, s) for j, s in zip(js[:top_k], ss[:top_k], strict=True)]
            prediction = predict(query_id, hits, thresholds, novelty_sim, curves)
            predictions.append(self._check_species(prediction, barcodes[n], js, check) if check else prediction)
        return predictions

    def _check_species(self, prediction: Prediction, barcode: str, rows: list[int], check: SpeciesCheck
                       ) -> Prediction:
        """`prediction` with its species settled by alignment where a candidate clears the cut-off."""
        references = self.index.barcodes
        position, best = choose_candidate(barcode, [references[j] for j in rows[: check.candidates]],
                                          check.identity_cutoff, prediction.query_id)
        if position < 0:
            return replace(prediction, identity=best)
        record = self.index.records[rows[position]]
        named = {rank: check.precision for rank in RANKS if not math.isnan(check.precision)}
        return replace(prediction, answer={rank: record[rank] for rank in RANKS}, novel=False, identity=best,
                       precision={**named, **{r: v for r, v in prediction.precision.items() if r != "species"}})

    def iter_identify(self, records: Iterable[dict[str, str]], top_k: int = 5) -> Iterator[list[Prediction]]:
        """Predictions batch by batch (`batch_size` records), so a long run holds one batch. Queries
        that cannot be identified (no barcode or photo for the index's modality, a repeated id, a
        reader's `error`, an unreadable photo, a non-finite embedding) follow `on_bad_input`."""
        records = list(records)
        problems = self._problems(records)  # before the first batch, so "error" leaves no partial output
        starts = range(0, len(records), self.batch_size)
        for start in tqdm(starts, desc="identify", disable=not self.progress):
            batch = records[start : start + self.batch_size]
            yield self._identify_batch(batch, {i - start: problems[i] for i in problems
                                               if start <= i < start + len(batch)}, top_k)

    def _problems(self, records: list[dict[str, str]]) -> dict[int, str]:
        """Position -> why, for queries that cannot be identified as given; raised under "error"."""
        problems = unusable(records, self.index.modality, what="query")
        self._raise_or_warn([(records[i]["id"], reason) for i, reason in problems.items()])
        return problems

    def _raise_or_warn(self, bad: list[tuple[str, str]]) -> None:
        if not bad:
            return
        shown = "; ".join(f"{query_id}: {reason}" for query_id, reason in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if self.on_bad_input == "error":
            raise ValueError(f"{len(bad)} queries cannot be identified: {shown}")
        logger.warning("%d queries cannot be identified (error rows): %s", len(bad), shown)

    def _identify_batch(self, batch: list[dict[str, str]], problems: dict[int, str], top_k: int) -> list[Prediction]:
        good = [i for i in range(len(batch)) if i not in problems]
        embeddings, failures = self._embed_checked([batch[i] for i in good])
        problems = {**problems, **{good[j]: reason for j, reason in failures.items()}}
        kept = [j for j in range(len(good)) if j not in failures]
        queries = [batch[good[j]] for j in kept]
        barcodes = [q["dna"] for q in queries] if self.index.modality == "dna" else None
        found = iter(self.identify_embeddings(embeddings[kept], [q["id"] for q in queries], top_k, barcodes)
                     if kept else [])
        return [failed(record["id"], problems[i]) if i in problems else next(found) for i, record in enumerate(batch)]

    def _embed_checked(self, records: list[dict[str, str]]) -> tuple[torch.Tensor, dict[int, str]]:
        """Embeddings of `records` and position -> why for those that could not be embedded."""
        embeddings, failures = embed_checked(self.model, self.processor, records, self.index.modality,
                                             self.batch_size, skip=self.on_bad_input == "skip")
        self._raise_or_warn([(records[i]["id"], reason) for i, reason in failures.items()])
        return embeddings, failures

    def identify(self, records: Iterable[dict[str, str]], top_k: int = 5) -> list[Prediction]:
        """One `Prediction` per record (record schema: id and a dna barcode or image path), in order."""
        return [prediction for batch in self.iter_identify(records, top_k) for prediction in batch]

    def provenance_line(self) -> str:
        """The TSV's `# ` line: clibd version, model and its hash, index, thresholds."""
        index = self.index
        thresholds = ", ".join(f"{rank}={value:.4f}" for rank, value in index.thresholds.items())
        if check := index.species_check:
            thresholds += (f"; species check: identity >= {check.identity_cutoff} among {check.candidates} "
                           f"candidates, else species={check.embedding_threshold:.4f}")
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
            "novelty_similarity", *(f"{rank}_precision" for rank in RANKS), "identity", "error", *hits]


def _row(prediction: Prediction) -> dict[str, str]:
    if prediction.error:  # no answer: only the id and why (tabs and line breaks would break the table)
        return {"query_id": prediction.query_id, "error": " ".join(prediction.error.split())}
    row = {"query_id": prediction.query_id, **{rank: prediction.answer.get(rank, "") for rank in RANKS},
           "similarity": f"{prediction.similarity:.4f}", "novel": str(prediction.novel).lower(),
           **{f"{rank}_support": f"{prediction.support[rank]:.2f}" for rank in RANKS},
           "novelty_similarity": f"{prediction.novelty_similarity:.4f}",
           **{f"{rank}_precision": _number(prediction.precision.get(rank, math.nan), 3) for rank in RANKS},
           "identity": _number(prediction.identity, 4)}
    for i, hit in enumerate(prediction.hits, start=1):
        row |= {f"hit{i}_id": hit.id, f"hit{i}_species": hit.taxonomy.get("species", ""),
                f"hit{i}_similarity": f"{hit.similarity:.4f}"}
    return row


def _number(value: float, digits: int) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def _prediction(row: dict[str, str]) -> Prediction:
    if row.get("error"):
        return failed(row["query_id"], row["error"])
    hits, i = [], 1
    while row.get(f"hit{i}_id"):
        hits.append(Hit(row[f"hit{i}_id"], float(row[f"hit{i}_similarity"]), {"species": row[f"hit{i}_species"]}))
        i += 1
    return Prediction(row["query_id"], {rank: row[rank] for rank in RANKS}, float(row["similarity"]),
                      float(row["novelty_similarity"]), row["novel"] == "true",
                      {rank: float(row[f"{rank}_support"]) for rank in RANKS}, hits,
                      # files written before the precision columns read without them
                      precision={rank: float(row[f"{rank}_precision"]) for rank in RANKS
                                 if row.get(f"{rank}_precision")},
                      identity=float(row["identity"]) if row.get("identity") else math.nan)


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


def _resume(path: Path, provenance: str, columns: list[str]) -> list[str] | None:
    """Query ids already written to `path` (one per row); None when there is nothing to resume (no
    file, or one cut before its header). A last line cut by an interruption is removed first. A
    file written by another run (model, index, thresholds) or with other columns (another top-k,
    an older clibd) is a `ValueError`."""
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
            raise ValueError(f"{path} was written with other columns (another --top-k or an older clibd: "
                             f"{len(table.fieldnames)} columns, this run writes {len(columns)}); write to a new "
                             "file or remove it")
        return [row["query_id"] for row in table]


def _still_to_do(records: Sequence[dict[str, str]], done: list[str]) -> list[dict[str, str]]:
    """The records an earlier run did not write, counting repeated ids: a repeat of an id written
    before becomes a "duplicate query id" error row, as it would have in one run."""
    rows_written, written = Counter(done), set(done)
    todo = []
    for record in records:
        if rows_written[record["id"]]:
            rows_written[record["id"]] -= 1
        elif record["id"] in written:
            todo.append({**record, "error": "duplicate query id (given earlier in this run)"})
        else:
            todo.append(record)
    return todo


def identify_to_tsv(identifier: Identifier, records: Sequence[dict[str, str]],
                    out: str | os.PathLike | None = None, top_k: int = 5) -> int:
    """Stream predictions for `records` as TSV to `out` (stdout when None); return rows written.

    The provenance line and header are written at once (the file exists with both or not at all);
    rows are appended batch by batch and flushed, so an interrupted run, started again with the
    same `out`, skips the queries already written (the file's provenance and columns must match
    this run).

    Usage:
        identify_to_tsv(Identifier.load("refs/", progress=True), records, "preds.tsv", top_k=5)
    """
    top_k = min(top_k, len(identifier.index.records))
    done = _resume(Path(out), identifier.provenance_line(), prediction_columns(top_k)) if out is not None else None
    todo = _still_to_do(records, done) if done is not None else list(records)
    header = io.StringIO()
    header.write(identifier.provenance_line())
    write_predictions_tsv([], header, top_k)
    if out is None:
        sys.stdout.write(header.getvalue())
    elif done is None:
        atomic_write_text(Path(out), header.getvalue())
    stream: TextIO = sys.stdout if out is None else open(out, "a", newline="")  # noqa: SIM115
    try:
        written = 0
        for batch in identifier.iter_identify(todo, top_k):
            write_predictions_tsv(batch, stream, top_k, header=False)
            stream.flush()
            written += len(batch)
    finally:
        if out is not None:
            stream.close()
    return written
