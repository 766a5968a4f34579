"""Read specimen records from BOLD / BIOSCAN TSV or CSV exports into the record schema.

Usage:
    records = read_records("../shared/data/insect_bold_coi/insect_bold_coi_small.tsv")
    records[0]   # {'id': 'COLFF267-13', 'order': 'Coleoptera', ..., 'dna': 'AACT...', 'image': ''}
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

RECORD_FIELDS = ("id", "order", "family", "genus", "species", "dna", "image")

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


def shared_data_dir() -> Path:
    """`$CLIBD_SHARED_DATA`, else `../shared/data` beside the working directory or this checkout."""
    if env := os.environ.get("CLIBD_SHARED_DATA"):
        return Path(env)
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[4] / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def read_records(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, str]]:
    """Records of a TSV (`.tsv`, `.txt`) or CSV (`.csv`) export with a header line.

    The id column is required; a file without one raises `ValueError` naming the file.
    """
    path = Path(path)
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = {name: next((a for a in aliases if a in (reader.fieldnames or [])), None)
                   for name, aliases in COLUMN_ALIASES.items()}
        if columns["id"] is None:
            raise ValueError(f"{path}: no id column (one of {COLUMN_ALIASES['id']}) in header {reader.fieldnames}")
        records = []
        for row in reader:
            records.append({name: (row.get(col) or "").strip() if col else "" for name, col in columns.items()})
            if limit is not None and len(records) >= limit:
                break
    return records
