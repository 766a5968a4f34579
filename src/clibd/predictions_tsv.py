"""The predictions TSV of `clibd identify`: write, read back, and stream with resume.

A `# ` provenance line, then one row per query (columns: `prediction_columns`; see
`clibd.identify` for what each means). `identify_to_tsv` writes the provenance line and header
atomically, appends and flushes batch by batch, and on a second run with the same file skips the
queries already written (the provenance and columns must match).

Usage:
    identify_to_tsv(Identifier.load("refs/"), records, "preds.tsv", top_k=5)
    predictions = read_predictions_tsv("preds.tsv")
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .atomic import atomic_write_text
from .constants import RANKS
from .prediction import COMMENT, Hit, Prediction, failed

if TYPE_CHECKING:  # identify imports this module
    from .identify import Identifier


def prediction_columns(top_k: int) -> list[str]:
    """The TSV's columns for `top_k` hits.

    Usage:
        prediction_columns(5)   # ["query_id", "order", ..., "hit5_similarity"]
    """
    hits = [f"hit{i}_{field}" for i in range(1, top_k + 1) for field in ("id", "species", "similarity")]
    return ["query_id", *RANKS, "similarity", "novel", *(f"{rank}_support" for rank in RANKS),
            "novelty_similarity", *(f"{rank}_precision" for rank in RANKS), "identity", "identity_reference",
            "error", "route", *hits]


def _row(prediction: Prediction) -> dict[str, str]:
    if prediction.error:  # no answer: only the id and why (tabs and line breaks would break the table)
        return {"query_id": prediction.query_id, "error": " ".join(prediction.error.split())}
    row = {"query_id": prediction.query_id, **{rank: prediction.answer.get(rank, "") for rank in RANKS},
           "similarity": f"{prediction.similarity:.4f}", "novel": str(prediction.novel).lower(),
           **{f"{rank}_support": f"{prediction.support[rank]:.2f}" for rank in RANKS},
           "novelty_similarity": f"{prediction.novelty_similarity:.4f}",
           **{f"{rank}_precision": _number(prediction.precision.get(rank, math.nan), 3) for rank in RANKS},
           "identity": _number(prediction.identity, 4), "identity_reference": prediction.identity_reference,
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
                      route=row.get("route") or "",  # files written before the route column: ""
                      identity=float(row["identity"]) if row.get("identity") else math.nan,
                      identity_reference=row.get("identity_reference") or "")  # older files: ""


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


class PredictionTally:
    """What predictions say, counted batch by batch as they are written (a few counters, whatever
    the run's size): queries, how many got a species (of them, with an `identity_cutoff`, how
    many by an alignment at least that identical: the unrounded identity), how many are flagged
    novel, the deepest rank answered, and how many could not be identified.

    Usage:
        tally = PredictionTally(0.97); identify_to_tsv(identifier, records, "preds.tsv", on_batch=tally.add)
        print(tally.line(), file=sys.stderr)
    """

    def __init__(self, identity_cutoff: float | None = None):
        self.identity_cutoff = identity_cutoff
        self.queries = self.failed = self.novel = self.aligned = 0
        self.deepest: Counter[str] = Counter()

    def add(self, predictions: Iterable[Prediction]) -> None:
        """Count one batch."""
        for prediction in predictions:
            self.queries += 1
            if prediction.error:
                self.failed += 1
                continue
            self.novel += prediction.novel
            self.deepest[prediction.deepest_rank or "none"] += 1
            cutoff = self.identity_cutoff
            self.aligned += cutoff is not None and bool(prediction.answer["species"]) and prediction.identity >= cutoff

    def line(self) -> str:
        """The counts in one line."""
        aligned = ("" if self.identity_cutoff is None else
                   f" ({self.aligned} by an alignment at least {100 * self.identity_cutoff:g}% identical)")
        ranks = ", ".join(f"{rank} {self.deepest[rank]}" for rank in (*reversed(RANKS), "none"))
        return (f"{self.queries} queries: a species for {self.deepest['species']}{aligned}, {self.novel} flagged "
                f"novel; deepest rank answered: {ranks}; {self.failed} could not be identified")


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


def check_predictions_out(out: str | os.PathLike) -> None:
    """A `ValueError` where `out` cannot be a predictions file: a folder, something that is not a
    regular file (a pipe such as /dev/stdout cannot be resumed), a file in a folder that does not
    exist. The command line checks it before loading the model, `identify_to_tsv` again.

    Usage:
        check_predictions_out("preds.tsv")
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give the predictions file's name (e.g. {out / 'preds.tsv'})")
    if out.exists() and not out.is_file():
        raise ValueError(f"{out}: not a regular file; leave the output out to write to stdout")
    if not out.parent.is_dir():  # else the error names the temporary file beside it
        raise ValueError(f"{out}: its folder {out.parent} does not exist")


def identify_to_tsv(identifier: Identifier, records: Sequence[dict[str, str]],
                    out: str | os.PathLike | None = None, top_k: int = 5,
                    on_batch: Callable[[list[Prediction]], None] | None = None, **plan) -> int:
    """Stream predictions for `records` as TSV to `out` (stdout when None); return rows written.

    The provenance line and header are written at once (the file exists with both or not at all);
    rows are appended batch by batch and flushed, so an interrupted run, started again with the
    same `out`, skips the queries already written (the file's provenance and columns must match
    this run: model, index, query, keys, strategy, thresholds). `on_batch`: called with each
    batch of predictions written (e.g. `PredictionTally.add`). `plan`: keys, query, strategy,
    is_du_threshold (`Identifier.plan_for`).

    Usage:
        identify_to_tsv(Identifier.load("refs/", progress=True), records, "preds.tsv", top_k=5)
    """
    if out is not None:
        check_predictions_out(out)
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
            if on_batch is not None:
                on_batch(batch)
    finally:
        if out is not None:
            stream.close()
    return written
