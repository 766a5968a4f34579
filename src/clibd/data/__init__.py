"""Specimen records: one schema (id, order, family, genus, species, dna, image) whatever the source.

`records` (TSV/CSV, FASTA), `bioscan` (BIOSCAN releases), `split` (the paper's split by species),
`loading` (the YAML `data` section and `load_splits`), `collate` (training batches).

Names are imported on first use (`clibd.lazy`): reading query records and embedding them
(`clibd identify`) does not import `datasets`, which splitting and training need.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("official_splits", "read_bioscan"), ".bioscan"),
    **dict.fromkeys(("DataSection", "load_splits"), ".loading"),
    **dict.fromkeys(("RECORD_FIELDS", "BadRow", "BadRows", "read_fasta", "read_records", "read_table", "record_rows",
                     "records_to_dataset", "resolve_data_path", "shared_data_dir"), ".records"),
    **dict.fromkeys(("SPLIT_NAMES", "paper_split", "split_statistics"), ".split"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:  # for type checkers and linters; at run time see _EXPORTS
    from .bioscan import official_splits as official_splits
    from .bioscan import read_bioscan as read_bioscan
    from .loading import DataSection as DataSection
    from .loading import load_splits as load_splits
    from .records import RECORD_FIELDS as RECORD_FIELDS
    from .records import BadRow as BadRow
    from .records import BadRows as BadRows
    from .records import read_fasta as read_fasta
    from .records import read_records as read_records
    from .records import read_table as read_table
    from .records import record_rows as record_rows
    from .records import records_to_dataset as records_to_dataset
    from .records import resolve_data_path as resolve_data_path
    from .records import shared_data_dir as shared_data_dir
    from .split import SPLIT_NAMES as SPLIT_NAMES
    from .split import paper_split as paper_split
    from .split import split_statistics as split_statistics
