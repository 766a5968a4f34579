"""Specimen records: one schema (id, order, family, genus, species, dna, image) whatever the source.

`records` (TSV/CSV, FASTA), `bioscan` (BIOSCAN releases), `split` (the paper's split by species),
`loading` (the YAML `data` section and `load_splits`), `collate` (training batches).
"""

from .bioscan import official_splits, read_bioscan
from .loading import DataSection, load_splits
from .records import (
    RECORD_FIELDS,
    BadRow,
    BadRows,
    read_fasta,
    read_records,
    read_table,
    records_to_dataset,
    shared_data_dir,
)
from .split import SPLIT_NAMES, paper_split, split_statistics

__all__ = [
    "BadRow",
    "BadRows",
    "DataSection",
    "load_splits",
    "RECORD_FIELDS",
    "SPLIT_NAMES",
    "official_splits",
    "paper_split",
    "read_bioscan",
    "read_fasta",
    "read_records",
    "read_table",
    "records_to_dataset",
    "shared_data_dir",
    "split_statistics",
]
