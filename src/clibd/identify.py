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
nearest one at that rank, like SINTAX's per-rank bootstrap), novelty_similarity, order_precision
... species_precision (the calibrated precision of the answer at that rank, empty where none is
given), error (why a query could not be identified; its other columns are then empty), route
(the key modality that answered: see `Prediction.route`), then hit1_id, hit1_species,
hit1_similarity, ... for the top-k references.

A multi-modal library (`clibd.library`) is searched with any query modality against any of its
key sets (`clibd.query_plan`: photo -> DNA keys, image+DNA -> DNA, photo -> taxon names, stacked
keys, IS+DU routing); the thresholds are those calibrated for that (query, keys) pair.

Usage:
    identifier = Identifier.load("refs/")
    predictions = identifier.identify(records, top_k=5)      # list[Prediction]
    identifier.identify(photos, keys=["dna"], query="image")  # a library: photos against DNA references
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
from .constants import RANKS
from .index import ReferenceIndex, unusable
from .library import ReferenceLibrary
from .modeling_clibd import CLIBDModel
from .novelty import precision_at
from .processing import CLIBDProcessor
from .query_plan import QueryPlan, embed_queries, resolve_plan
from .retrieval import SEARCH_BACKENDS

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
    modality: str = ""  # the key's modality (image, dna, text) in a multi-modal library; "" read from a TSV


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
    `route`: the key modality the answer came from (is-du: "image" for a species judged seen,
    "dna" for unseen; stacked keys: the nearest key's), "" where not known (older TSVs, error rows).
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
    route: str = ""

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
    """A reference index (or multi-modal library) and the model that built it, loaded once,
    identifying batches of records: any query modality against any key modality the model aligns
    (`clibd.query_plan`), by the nearest key or by IS+DU routing.

    Usage:
        identifier = Identifier.load("refs/", model_dir=None, backend="torch")
        for batch in identifier.iter_identify(records, top_k=5): ...
        identifier.identify(photos, keys=["dna"], query="image")       # photo -> DNA references
        identifier.identify(photos, strategy="is-du")                   # each Prediction has a route
    """

    def __init__(self, index: ReferenceIndex | ReferenceLibrary, model: CLIBDModel, processor: CLIBDProcessor,
                 model_dir: str | os.PathLike, backend: str = "torch", batch_size: int = 256,
                 progress: bool = False, on_bad_input: str = "error", keys: Sequence[str] | None = None,
                 query: str | None = None, strategy: str | None = None, is_du_threshold: float | None = None):
        if backend not in SEARCH_BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; use one of {SEARCH_BACKENDS}")
        if on_bad_input not in ON_BAD_INPUT:
            raise ValueError(f"on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
        self.library = index if isinstance(index, ReferenceLibrary) else ReferenceLibrary.of_index(index)
        self.index = self.library.key_sets[self.library.modalities[0]]  # the first key set (older callers)
        self.model, self.processor = model, processor
        self.model_dir, self.backend, self.batch_size, self.progress = Path(model_dir), backend, batch_size, progress
        self.on_bad_input = on_bad_input
        self.defaults = {"keys": keys, "query": query, "strategy": strategy, "threshold": is_du_threshold}

    @classmethod
    def load(cls, index_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
             backend: str = "torch", batch_size: int = 256, progress: bool = False,
             on_bad_input: str = "error", device: str | None = None, **plan) -> Identifier:
        """Load the index at `index_dir` and its model: from `model_dir` (e.g. with an index pulled
        from the Hub) or where the index says; its weights must be the ones that built the index.
        `on_bad_input`: "error" raises at a query that cannot be identified (naming it), "skip"
        gives it a `failed` prediction (its `error` says why) and goes on. `device`: where the
        model embeds queries (default: the GPU when there is one; each batch's embeddings come
        back to the CPU at once). `plan`: default keys, query, strategy, is_du_threshold."""
        library = ReferenceLibrary.load(index_dir)
        model_dir = model_dir or library.meta["model"]
        model, processor = library.key_sets[library.modalities[0]].load_model(model_dir)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(library, model, processor, model_dir, backend, batch_size, progress, on_bad_input, **plan)

    def plan_for(self, records: Sequence[dict[str, str]], keys: Sequence[str] | str | None = None,
                 query: str | None = None, strategy: str | None = None,
                 is_du_threshold: float | None = None) -> QueryPlan:
        """The checked plan for `records`: the arguments given, else this identifier's defaults."""
        given = {"keys": keys, "query": query, "strategy": strategy, "threshold": is_du_threshold}
        chosen = {name: given[name] if given[name] is not None else default for name, default in self.defaults.items()}
        return resolve_plan(self.library, self.model.config.modalities, records, **chosen)

    def embed(self, records: Sequence[dict[str, str]], query: str | None = None) -> torch.Tensor:
        """Embeddings [N, D] (float32, L2-normalised, on the CPU) of query records for `query`
        (default: as `plan_for` chooses); a `ValueError` naming records that lack its fields."""
        records = list(records)
        plan = self.plan_for(records, query=query)
        for name in plan.fields:
            missing = [r["id"] for r in records if not r.get(name)]
            if missing:
                raise ValueError(f"{len(missing)} queries have no {name} (the {plan.query} query needs it), "
                                 f"e.g. {missing[:5]}")
        return embed_queries(self.model, self.processor, records, plan.query, self.batch_size)[0]

    def identify_embeddings(self, embeddings: torch.Tensor, query_ids: Sequence[str], top_k: int = 5,
                            plan: QueryPlan | None = None) -> list[Prediction]:
        """Predictions for queries already embedded (`embed`), in order; `plan` as `plan_for` gives
        (default: the first key set's own modality)."""
        plan = plan or self._first_plan()
        if plan.strategy == "is-du":
            return self._route_is_du(embeddings, query_ids, top_k, plan.threshold)
        keys = self.library.keys(plan.keys)
        similarities, rows = self._search(keys, embeddings, top_k)
        own = plan.keys == (plan.query,) and keys.scores_novelty_apart  # novelty parts: one tower's own
        novelty = keys.novelty_similarity(embeddings, self.backend) if own else similarities[:, 0]
        thresholds, curves = self.library.calibration(plan.query, plan.keys)
        predictions = []
        for query_id, ss, js, n in zip(query_ids, similarities.tolist(), rows.tolist(), novelty.tolist(), strict=True):
            hits = [self._hit(keys, plan.keys, j, s) for j, s in zip(js, ss, strict=True)]
            predictions.append(replace(predict(query_id, hits, thresholds, n, curves), route=hits[0].modality))
        return predictions

    def _route_is_du(self, embeddings: torch.Tensor, query_ids: Sequence[str], top_k: int,
                     threshold: float) -> list[Prediction]:
        """IS+DU: the image keys answer where the best image-key cosine is above `threshold`
        (strictly, as `evaluate_is_du`), the DNA keys elsewhere, each with its pair's calibration."""
        routes = {}
        for modality in ("image", "dna"):
            keys = self.library.keys([modality])
            routes[modality] = (keys, *self._search(keys, embeddings, top_k),
                                *self.library.calibration("image", [modality]))
        predictions = []
        for n, query_id in enumerate(query_ids):
            route = "image" if float(routes["image"][1][n, 0]) > threshold else "dna"
            keys, similarities, rows, thresholds, curves = routes[route]
            hits = [self._hit(keys, [route], j, s) for j, s in zip(rows[n].tolist(), similarities[n].tolist(),
                                                                   strict=True)]
            predictions.append(replace(predict(query_id, hits, thresholds, None, curves), route=route))
        return predictions

    def _search(self, keys: ReferenceIndex, embeddings: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        similarities, rows = keys.search(embeddings, top_k, self.backend)
        if not torch.isfinite(similarities).all():  # queries are checked when embedded: a key is damaged
            raise ValueError(f"{keys.directory / 'embeddings.safetensors'}: holds embeddings that are not "
                             "finite (NaN or inf): the index is damaged; rebuild it")
        return similarities, rows

    def iter_identify(self, records: Iterable[dict[str, str]], top_k: int = 5, keys: Sequence[str] | None = None,
                      query: str | None = None, strategy: str | None = None,
                      is_du_threshold: float | None = None) -> Iterator[list[Prediction]]:
        """Predictions batch by batch (`batch_size` records), so a long run holds one batch. Queries
        that cannot be identified (no barcode or photo for the query modality, a repeated id, a
        reader's `error`, an unreadable photo, a non-finite embedding) follow `on_bad_input`.
        `keys`, `query`, `strategy`, `is_du_threshold`: as `plan_for`."""
        records = list(records)
        plan = self.plan_for(records, keys, query, strategy, is_du_threshold)
        problems = self._problems(records, plan)  # before the first batch, so "error" leaves no partial output
        starts = range(0, len(records), self.batch_size)
        for start in tqdm(starts, desc="identify", disable=not self.progress):
            batch = records[start : start + self.batch_size]
            yield self._identify_batch(batch, {i - start: problems[i] for i in problems
                                               if start <= i < start + len(batch)}, top_k, plan)

    def _problems(self, records: list[dict[str, str]], plan: QueryPlan) -> dict[int, str]:
        """Position -> why, for queries that cannot be identified as given; raised under "error"."""
        problems: dict[int, str] = {}
        for name in plan.fields:
            for i, why in unusable(records, name, what="query").items():
                problems.setdefault(i, why)
        problems = dict(sorted(problems.items()))
        self._raise_or_warn([(records[i]["id"], reason) for i, reason in problems.items()])
        return problems

    def _raise_or_warn(self, bad: list[tuple[str, str]]) -> None:
        if not bad:
            return
        shown = "; ".join(f"{query_id}: {reason}" for query_id, reason in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if self.on_bad_input == "error":
            raise ValueError(f"{len(bad)} queries cannot be identified: {shown}")
        logger.warning("%d queries cannot be identified (error rows): %s", len(bad), shown)

    def _identify_batch(self, batch: list[dict[str, str]], problems: dict[int, str], top_k: int,
                        plan: QueryPlan) -> list[Prediction]:
        good = [i for i in range(len(batch)) if i not in problems]
        embeddings, failures = embed_queries(self.model, self.processor, [batch[i] for i in good], plan.query,
                                             self.batch_size, skip=self.on_bad_input == "skip")
        self._raise_or_warn([(batch[good[j]]["id"], reason) for j, reason in failures.items()])
        problems = {**problems, **{good[j]: reason for j, reason in failures.items()}}
        kept = [j for j in range(len(good)) if j not in failures]
        found = iter(self.identify_embeddings(embeddings[kept], [batch[good[j]]["id"] for j in kept], top_k, plan)
                     if kept else [])
        return [failed(record["id"], problems[i]) if i in problems else next(found) for i, record in enumerate(batch)]

    def identify(self, records: Iterable[dict[str, str]], top_k: int = 5, keys: Sequence[str] | None = None,
                 query: str | None = None, strategy: str | None = None,
                 is_du_threshold: float | None = None) -> list[Prediction]:
        """One `Prediction` per record (record schema: id and a dna barcode and/or image path), in
        order. `keys`: key modalities (["dna"], ["image", "dna"] stacked, ["text"]); `query`:
        "image", "dna" or "image+dna"; `strategy`: "nearest" or "is-du" (see `clibd.query_plan`)."""
        return [prediction for batch in self.iter_identify(records, top_k, keys, query, strategy, is_du_threshold)
                for prediction in batch]

    def key_count(self, plan: QueryPlan) -> int:
        """How many keys a query of `plan` is searched among (is-du: the smaller key set)."""
        if plan.strategy == "is-du":
            return min(len(self.library.keys([m]).records) for m in ("image", "dna"))
        return len(self.library.keys(plan.keys).records)

    def provenance_line(self, plan: QueryPlan | None = None) -> str:
        """The TSV's `# ` line: clibd version, model and its hash, index, query/keys/strategy, thresholds."""
        plan = plan or self._first_plan()
        library = self.library
        pairs = [("image", ["image"]), ("image", ["dna"])] if plan.strategy == "is-du" else [(plan.query, plan.keys)]
        thresholds = "; ".join(", ".join(f"{rank}={value:.4f}" for rank, value in library.calibration(*pair)[0].items())
                               for pair in pairs)
        held = ", ".join(f"{len(library.key_sets[m].records)} {m}" for m in library.modalities)
        return (f"{COMMENT}clibd {__version__} identify; model {self.model_dir} "
                f"(sha256 {library.meta['model_hash'][:16]}); index {library.directory.resolve()} "
                f"({held} references); {plan.describe()}; thresholds {thresholds}\n")

    def _first_plan(self) -> QueryPlan:
        """The plan of callers that give none: the first image / dna key set's own modality."""
        return self.plan_for([], query=next(m for m in self.library.modalities if m != "text"))

    def _hit(self, keys: ReferenceIndex, modalities: Sequence[str], row: int, similarity: float) -> Hit:
        record = keys.records[row]
        return Hit(record["id"], similarity, {rank: record[rank] for rank in RANKS},
                   self.library.key_modality(modalities, row))


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
            "novelty_similarity", *(f"{rank}_precision" for rank in RANKS), "error", "route", *hits]


def _row(prediction: Prediction) -> dict[str, str]:
    if prediction.error:  # no answer: only the id and why (tabs and line breaks would break the table)
        return {"query_id": prediction.query_id, "error": " ".join(prediction.error.split())}
    row = {"query_id": prediction.query_id, **{rank: prediction.answer.get(rank, "") for rank in RANKS},
           "similarity": f"{prediction.similarity:.4f}", "novel": str(prediction.novel).lower(),
           **{f"{rank}_support": f"{prediction.support[rank]:.2f}" for rank in RANKS},
           "novelty_similarity": f"{prediction.novelty_similarity:.4f}",
           **{f"{rank}_precision": _number(prediction.precision.get(rank, math.nan), 3) for rank in RANKS},
           "route": prediction.route}
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
                      route=row.get("route") or "")  # files written before the route column: ""


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
                    out: str | os.PathLike | None = None, top_k: int = 5, **plan) -> int:
    """Stream predictions for `records` as TSV to `out` (stdout when None); return rows written.

    The provenance line and header are written at once (the file exists with both or not at all);
    rows are appended batch by batch and flushed, so an interrupted run, started again with the
    same `out`, skips the queries already written (the file's provenance and columns must match
    this run: model, index, query, keys, strategy, thresholds). `plan`: keys, query, strategy,
    is_du_threshold (`Identifier.plan_for`).

    Usage:
        identify_to_tsv(Identifier.load("refs/", progress=True), records, "preds.tsv", top_k=5)
    """
    plan = identifier.plan_for(records, **plan)
    top_k, provenance = min(top_k, identifier.key_count(plan)), identifier.provenance_line(plan)
    done = _resume(Path(out), provenance, prediction_columns(top_k)) if out is not None else None
    todo = _still_to_do(records, done) if done is not None else list(records)
    header = io.StringIO()
    header.write(provenance)
    write_predictions_tsv([], header, top_k)
    if out is None:
        sys.stdout.write(header.getvalue())
    elif done is None:
        atomic_write_text(Path(out), header.getvalue())
    stream: TextIO = sys.stdout if out is None else open(out, "a", newline="")  # noqa: SIM115
    try:
        written = 0
        for batch in identifier.iter_identify(todo, top_k, plan.keys, plan.query, plan.strategy, plan.threshold):
            write_predictions_tsv(batch, stream, top_k, header=False)
            stream.flush()
            written += len(batch)
    finally:
        if out is not None:
            stream.close()
    return written
