"""Specimen records from BOLD / BIOSCAN TSV or CSV exports and FASTA files, as one schema.

Every reader yields dicts with `RECORD_FIELDS`: id, order, family, genus, species (empty string =
unknown), dna (raw barcode or empty) and image (path or empty). Rows that cannot be used are
reported with file, line, record id and reason, then skipped (`on_bad_row="skip"`) or fatal
(`"error"`); pass your own `BadRows` to read the skipped rows afterwards. Files are read as UTF-8
(a byte order mark is dropped); other encodings are an error naming the file and line.

Usage:
    records = read_records("../shared/data/insect_bold_coi/insect_bold_coi.tsv")
    dataset = records_to_dataset(records)          # a datasets.Dataset, images stay paths
    bad = BadRows(); read_records("queries.fasta", bad_rows=bad); bad.rows  # [BadRow(file, line, id, reason)]
"""

from __future__ import annotations

import codecs
import csv
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ..constants import RANKS
from ..processing.barcodes import normalise_barcode

if TYPE_CHECKING:  # datasets (with pandas) is imported where a Dataset is made: not on identify's path
    import datasets

logger = logging.getLogger(__name__)

RECORD_FIELDS = ("id", *RANKS, "dna", "image")
BAD_ROW_POLICIES = ("skip", "error")

# Column names used by BOLD v3/v4 exports, BIOSCAN-1M/5M metadata and our own files, per field.
COLUMN_ALIASES = {
    "id": ("id", "processid", "sampleid"),
    "order": ("order", "order_name"),
    "family": ("family", "family_name"),
    "genus": ("genus", "genus_name"),
    "species": ("species", "species_name"),
    "dna": ("dna", "dna_barcode", "nucleotides", "nucraw"),
    "image": ("image", "image_file", "image_path"),
}
MISSING_VALUES = {"", "not_classified", "na", "nan", "none", "null"}


def shared_data_dir() -> Path:
    """`$CLIBD_SHARED_DATA`, else `../shared/data` beside the working directory or this checkout."""
    if env := os.environ.get("CLIBD_SHARED_DATA"):
        return Path(env)
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[4] / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED_PREFIX = ("..", "shared", "data")  # how the configs name the shared data


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A config's data path: one under `../shared/data` (the configs' convention) is read under
    `shared_data_dir()` ($CLIBD_SHARED_DATA where set; else `../shared/data` beside the working
    directory or this checkout, so a run from another folder finds it too); any other as given.

    Usage:
        resolve_data_path("../shared/data/insect_bold_coi/insect_bold_coi.tsv")
    """
    path = Path(path)
    if path.parts[: len(SHARED_PREFIX)] != SHARED_PREFIX:
        return path
    env = os.environ.get("CLIBD_SHARED_DATA")
    if not env and path.exists():
        return path
    resolved = shared_data_dir().joinpath(*path.parts[len(SHARED_PREFIX):])
    if env and not resolved.exists():  # say why the config's path was not read as written
        raise FileNotFoundError(f"{resolved}: not found ({path} in the config, read under $CLIBD_SHARED_DATA={env})")
    return resolved


class BadRow(NamedTuple):
    """A row a reader could not use: where it is, the record's id ("" when unknown) and why."""

    file: str
    line: int
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" + (f" (record {self.id!r})" if self.id else "")


@dataclass
class BadRows:
    """Rows a reader could not use, as `BadRow`s; `policy` "error" raises at the first instead.

    Usage:
        bad = BadRows()
        records = read_records("queries.tsv", bad_rows=bad)
        errors = [(row.id, row.reason) for row in bad.rows if row.id]  # one error row per skipped query
    """

    policy: str = "skip"
    rows: list[BadRow] = field(default_factory=list)

    def __post_init__(self):
        if self.policy not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {self.policy!r}")

    def report(self, file: str | os.PathLike, line: int, reason: str, id: str = "") -> None:
        row = BadRow(os.fspath(file), line, id, reason)
        if self.policy == "error":
            raise ValueError(str(row))
        self.rows.append(row)

    def log_summary(self, start: int = 0) -> None:
        """Warn about the rows from `start` on (a reader logs only those it added itself)."""
        rows = self.rows[start:]
        if rows:
            shown = "; ".join(str(row) for row in rows[:5])
            logger.warning("skipped %d bad rows: %s%s", len(rows), shown, " ..." if len(rows) > 5 else "")


def _not_utf8(path: Path) -> ValueError:
    """Where `path` stops being UTF-8, as `file:line`: the decoder only knows an offset in its buffer."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                column = len(raw[: error.start].decode("utf-8")) + 1
                return ValueError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                  f"{column}); save the file as UTF-8")
    return ValueError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _clean(value: str | None) -> str:
    value = (value or "").strip()
    return "" if value.lower() in MISSING_VALUES else value


def id_problem(record_id: str) -> str | None:
    """Why a record id cannot be used, or None: a tab or a line break would break every TSV clibd
    writes it to (records.tsv, the predictions). The readers, index build / add and identify ask.

    Usage:
        id_problem("BOLD\t1")   # "id holds a tab or a line break"
    """
    return "id holds a tab or a line break" if any(c in str(record_id) for c in "\t\r\n") else None


def _check_record(record: dict[str, str], require_dna: bool) -> str | None:
    """The reason a record is unusable, or None."""
    if not record["id"]:
        return "empty id"
    if why := id_problem(record["id"]):
        return why
    if record["dna"]:
        try:
            normalise_barcode(record["dna"], "barcode")
        except ValueError as error:
            return str(error)
    elif require_dna:
        return "no barcode"
    return None


def read_table(
    path: str | os.PathLike,
    *,
    on_bad_row: str = "skip",
    require_dna: bool = False,
    image_root: str | os.PathLike | None = None,
    limit: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[dict[str, str]]:
    """Records of a TSV (`.tsv`, `.txt`) or CSV (`.csv`) export with a header line.

    Image paths are resolved against `image_root` (default: the table's folder). A table of photos
    without an id column (e.g. BIOSCAN's images.csv) takes each photo's file name as its id; any
    other file without an id column, or one that is not UTF-8, raises `ValueError` naming the file; bad rows follow `on_bad_row`,
    or go to `bad_rows` (whose policy then applies) when given.
    """
    path = Path(path)
    bad = bad_rows if bad_rows is not None else BadRows(on_bad_row)
    first_bad = len(bad.rows)
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    image_root = Path(image_root) if image_root is not None else path.parent
    try:
        # utf-8-sig: Excel and Windows tools start files with a BOM, which would hide the id column
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            records = _table_records(reader, path, bad, require_dna, image_root, limit)
    except UnicodeDecodeError as error:
        raise _not_utf8(path) from error
    bad.log_summary(first_bad)
    return records


def _swallowed_rows(row: dict) -> bool:
    """Whether a TSV row's field holds whole rows after it: BOLD's exports are not quoted, so a
    field that starts with '"' swallows the lines up to the next '"', tabs and all. A quoted field
    holding a line break but no tab (a note as pandas writes it) is a field like any other."""
    return any(isinstance(v, str) and "\n" in v and "\t" in v for v in row.values())


def _table_records(
    reader: csv.DictReader, path: Path, bad: BadRows, require_dna: bool, image_root: Path, limit: int | None
) -> list[dict[str, str]]:
    header = reader.fieldnames or []
    columns = {name: next((a for a in aliases if a in header), None) for name, aliases in COLUMN_ALIASES.items()}
    if columns["id"] is None and columns["image"] is None:
        raise ValueError(f"{path}: no id column (one of {COLUMN_ALIASES['id']}) in header {header}")
    records: list[dict[str, str]] = []
    tabs = reader.reader.dialect.delimiter == "\t"
    first = reader.line_num + 1  # the line the next row starts on
    for row in reader:
        line = reader.line_num
        start, first = first, line + 1  # a row is named at its first line (a quoted note may span several)
        if tabs and _swallowed_rows(row):
            bad.report(path, start, f"lines {start}-{line} were read as one row: a field starting with a double "
                       "quote (\") is not closed on its line (remove the quote; TSV needs none)",
                       _clean(row.get(columns["id"])) if columns["id"] else "")
            continue
        if None in row or any(v is None for v in row.values()):
            bad.report(path, start, f"expected {len(header)} fields", _clean(row.get(columns["id"])))
            continue
        record = {name: _clean(row[col]) if col else "" for name, col in columns.items()}
        if columns["id"] is None:  # a table of photos (images.csv): each one's id is its file name
            record["id"] = Path(record["image"]).name
        if record["image"]:
            record["image"] = os.fspath(image_root / record["image"])
        if reason := _check_record(record, require_dna):
            bad.report(path, start, reason, record["id"])
            continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records


# SINTAX's rank prefixes in `;tax=o:...,f:...` headers (read here, written by the alignment bench)
SINTAX_PREFIX = {"o": "order", "f": "family", "g": "genus", "s": "species"}


def parse_fasta_header(header: str) -> dict[str, str]:
    """Id and ranks from a FASTA header. Understood forms:

    `ID;tax=o:Diptera,f:Culicidae,g:Aedes,s:Aedes_aegypti;` (SINTAX), `ID order=Diptera family=...`
    (key=value pairs split by spaces, `;` or `|`), and `ID|order|family|genus|species` (BOLD-like).
    """
    header = header.strip().lstrip(">")
    record = dict.fromkeys(RANKS, "")
    if "tax=" in header:
        record["id"] = header.split(";", 1)[0].split()[0]
        taxonomy = header.split("tax=", 1)[1].rstrip(";")
        for part in taxonomy.split(","):
            prefix, _, name = part.partition(":")
            if prefix in SINTAX_PREFIX:
                record[SINTAX_PREFIX[prefix]] = name.replace("_", " ")
        return record
    if "=" in header:
        record["id"] = re.split(r"[\s;|]", header, maxsplit=1)[0]
        for key, value in re.findall(r"(\w+)=([^;|=]*?)(?=\s*(?:[;|]|\s\w+=|$))", header):
            if key.lower() in RANKS:
                record[key.lower()] = value.strip()
        return record
    parts = [p.strip() for p in header.split("|")]
    record["id"] = parts[0].split()[0] if parts[0] else ""
    for rank, value in zip(RANKS, parts[1:5], strict=False):
        record[rank] = _clean(value)
    return record


def read_fasta(
    path: str | os.PathLike,
    *,
    on_bad_row: str = "skip",
    limit: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[dict[str, str]]:
    """Records of a FASTA file whose headers carry the taxonomy (see `parse_fasta_header`).

    A file that is not UTF-8 raises `ValueError` naming the file and line; bad records follow
    `on_bad_row`, or go to `bad_rows` (whose policy then applies) when given.
    """
    path = Path(path)
    bad = bad_rows if bad_rows is not None else BadRows(on_bad_row)
    first_bad = len(bad.rows)
    records: list[dict[str, str]] = []

    def finish(header: str | None, line: int, sequence: list[str]) -> None:
        if header is None:
            return
        record = {**parse_fasta_header(header), "dna": "".join(sequence), "image": ""}
        if reason := _check_record(record, require_dna=True):
            bad.report(path, line, reason, record["id"])
        else:
            records.append(record)

    header, header_line, sequence = None, 0, []
    try:
        # utf-8-sig: a BOM before the first '>' would otherwise turn that header into sequence
        with open(path, encoding="utf-8-sig") as f:
            for number, text in enumerate(f, start=1):
                text = text.strip()
                if text.startswith(">"):
                    finish(header, header_line, sequence)
                    if limit is not None and len(records) >= limit:
                        break
                    header, header_line, sequence = text, number, []
                elif text:
                    if header is None:
                        bad.report(path, number, "sequence before the first '>' header")
                        continue
                    sequence.append(text)
            else:
                finish(header, header_line, sequence)
    except UnicodeDecodeError as error:
        raise _not_utf8(path) from error
    bad.log_summary(first_bad)
    return records[:limit] if limit is not None else records


def read_records(
    path: str | os.PathLike, *, bad_rows: BadRows | None = None, **kwargs
) -> list[dict[str, str]]:
    """Records of a TSV/CSV table or a FASTA file (`.fasta`, `.fa`, `.fas`, `.fna`), by extension.

    Keyword arguments go to `read_table` or `read_fasta`; skipped rows are added to `bad_rows` when given.
    """
    if Path(path).suffix.lower() in (".fasta", ".fa", ".fas", ".fna"):
        kwargs.pop("image_root", None)
        kwargs.pop("require_dna", None)
        return read_fasta(path, bad_rows=bad_rows, **kwargs)
    return read_table(path, bad_rows=bad_rows, **kwargs)


def record_rows(records: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """The records in the record schema, every field present ("" where missing or empty), without
    building a Dataset (embedding queries needs no more). Other values are kept as given, so a
    barcode that is not a string is refused by the processor, naming its record, rather than read
    as its text (as `records_to_dataset` would: a NaN barcode would become "nan").

    Usage:
        rows = record_rows([{"id": "q1", "dna": "AACATT..."}])   # [{"id": "q1", "order": "", ...}]
    """
    return [{name: record.get(name, "") or "" for name in RECORD_FIELDS} for record in records]


def records_to_dataset(records: Iterable[dict[str, str]]) -> datasets.Dataset:
    """A `datasets.Dataset` with the record schema; images stay paths and are decoded lazily."""
    import datasets

    columns = {name: [] for name in RECORD_FIELDS}
    for record in records:
        for name in RECORD_FIELDS:
            columns[name].append(record.get(name, "") or "")
    features = datasets.Features({name: datasets.Value("string") for name in RECORD_FIELDS})
    return datasets.Dataset.from_dict(columns, features=features)
