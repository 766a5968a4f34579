"""Specimen records from BOLD / BIOSCAN TSV or CSV exports and FASTA files, as one schema.

Every reader yields dicts with `RECORD_FIELDS`: id, order, family, genus, species (empty string =
unknown), dna (raw barcode or empty) and image (path or empty). Rows that cannot be used are
reported with file, line and reason, then skipped (`on_bad_row="skip"`) or fatal (`"error"`).

Usage:
    records = read_records("../shared/data/insect_bold_coi/insect_bold_coi.tsv")
    dataset = records_to_dataset(records)          # a datasets.Dataset, images stay paths
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from ..constants import RANKS
from ..processing.barcodes import normalise_barcode

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


@dataclass
class BadRows:
    """Rows a reader could not use: (file, line, reason) each."""

    policy: str = "skip"
    rows: list[tuple[str, int, str]] = field(default_factory=list)

    def __post_init__(self):
        if self.policy not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {self.policy!r}")

    def report(self, file: str | os.PathLike, line: int, reason: str) -> None:
        if self.policy == "error":
            raise ValueError(f"{file}:{line}: {reason}")
        self.rows.append((os.fspath(file), line, reason))

    def log_summary(self) -> None:
        if self.rows:
            shown = "; ".join(f"{f}:{line}: {reason}" for f, line, reason in self.rows[:5])
            logger.warning("skipped %d bad rows: %s%s", len(self.rows), shown, " ..." if len(self.rows) > 5 else "")


def _clean(value: str | None) -> str:
    value = (value or "").strip()
    return "" if value.lower() in MISSING_VALUES else value


def _check_record(record: dict[str, str], require_dna: bool) -> str | None:
    """The reason a record is unusable, or None."""
    if not record["id"]:
        return "empty id"
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
) -> list[dict[str, str]]:
    """Records of a TSV (`.tsv`, `.txt`) or CSV (`.csv`) export with a header line.

    Image paths are resolved against `image_root` (default: the table's folder). A file without an
    id column raises `ValueError` naming the file; bad rows follow `on_bad_row`.
    """
    path = Path(path)
    bad = BadRows(on_bad_row)
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    image_root = Path(image_root) if image_root is not None else path.parent
    records: list[dict[str, str]] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        columns = {name: next((a for a in aliases if a in header), None) for name, aliases in COLUMN_ALIASES.items()}
        if columns["id"] is None:
            raise ValueError(f"{path}: no id column (one of {COLUMN_ALIASES['id']}) in header {header}")
        for row in reader:
            line = reader.line_num
            if None in row or any(v is None for v in row.values()):
                bad.report(path, line, f"expected {len(header)} fields")
                continue
            record = {name: _clean(row[col]) if col else "" for name, col in columns.items()}
            if record["image"]:
                record["image"] = os.fspath(image_root / record["image"])
            if reason := _check_record(record, require_dna):
                bad.report(path, line, reason)
                continue
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    bad.log_summary()
    return records


_SINTAX_PREFIX = {"o": "order", "f": "family", "g": "genus", "s": "species"}


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
            if prefix in _SINTAX_PREFIX:
                record[_SINTAX_PREFIX[prefix]] = name.replace("_", " ")
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
    path: str | os.PathLike, *, on_bad_row: str = "skip", limit: int | None = None
) -> list[dict[str, str]]:
    """Records of a FASTA file whose headers carry the taxonomy (see `parse_fasta_header`)."""
    path = Path(path)
    bad = BadRows(on_bad_row)
    records: list[dict[str, str]] = []

    def finish(header: str | None, line: int, sequence: list[str]) -> None:
        if header is None:
            return
        record = {**parse_fasta_header(header), "dna": "".join(sequence), "image": ""}
        if reason := _check_record(record, require_dna=True):
            bad.report(path, line, reason)
        else:
            records.append(record)

    header, header_line, sequence = None, 0, []
    with open(path, encoding="utf-8") as f:
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
    bad.log_summary()
    return records[:limit] if limit is not None else records


def read_records(path: str | os.PathLike, **kwargs) -> list[dict[str, str]]:
    """Records of a TSV/CSV table or a FASTA file (`.fasta`, `.fa`, `.fas`, `.fna`), by extension."""
    if Path(path).suffix.lower() in (".fasta", ".fa", ".fas", ".fna"):
        kwargs.pop("image_root", None)
        kwargs.pop("require_dna", None)
        return read_fasta(path, **kwargs)
    return read_table(path, **kwargs)


def records_to_dataset(records: Iterable[dict[str, str]]) -> datasets.Dataset:
    """A `datasets.Dataset` with the record schema; images stay paths and are decoded lazily."""
    columns = {name: [] for name in RECORD_FIELDS}
    for record in records:
        for name in RECORD_FIELDS:
            columns[name].append(record.get(name, "") or "")
    features = datasets.Features({name: datasets.Value("string") for name in RECORD_FIELDS})
    return datasets.Dataset.from_dict(columns, features=features)
