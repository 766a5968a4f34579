"""How an index folder is read at scale: embeddings memory-mapped, records as columns, the faiss
inverted file kept beside them.

A library of a million 768-d references is 1.5 GB of fp16 embeddings, ~650 MB of records as
Python dicts and 15 s (minutes on a busy machine) of faiss training and adding per process for
the `faiss-ivf` backend (`bench/scale_index.py`). Here the embeddings are a view of the pages of `embeddings.safetensors`
(read when touched, shared by every process that maps them, never copied), the records are an
Arrow table read by Arrow's C++ CSV reader, and the inverted file is written once into the folder
(`faiss-ivf.index`, keyed to the embeddings' sha256) and memory-mapped by every later process, so
`identify --search faiss-ivf` starts in seconds and holds the inverted file, not the embeddings.
Mapping relies on clibd replacing index files (`atomic_directory`), never rewriting them in place:
a file truncated under a process that maps it would crash that process.

Usage:
    embeddings = map_embeddings(Path("refs/embeddings.safetensors"), "dna")   # torch, fp16, mapped
    records = RecordTable.read(Path("refs/records.tsv")); records[0]["species"]
    ivf = persisted_ivf(Path("refs"), "embeddings", lambda: embeddings)       # built once, then mapped
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import operator
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import torch
from safetensors import safe_open

from .atomic import atomic_write, atomic_write_text
from .retrieval import APPROXIMATE_RECIPE, approximate_faiss_index

logger = logging.getLogger(__name__)

# safetensors dtypes numpy can map; an index stores F16 (others are read through safetensors)
_NUMPY_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


def map_embeddings(path: Path, name: str) -> torch.Tensor:
    """Tensor `name` of a safetensors file as a memory-mapped torch tensor: the file's pages are
    read when a search touches them and are shared with every other process mapping the file;
    nothing is copied (writes stay in this process: copy-on-write). Opening costs microseconds
    whatever the size.

    Usage:
        embeddings = map_embeddings(Path("refs/embeddings.safetensors"), "dna")
    """
    entry, data_start = _tensor_entry(path, name)
    if entry["dtype"] not in _NUMPY_DTYPES:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)
    begin, end = entry["data_offsets"]
    if begin == end:  # numpy cannot map zero bytes
        return torch.empty(entry["shape"], dtype=torch.float16 if entry["dtype"] == "F16" else torch.float32)
    # the safetensors layout: 8 bytes of header size, the JSON header, then the raw tensors
    array = np.memmap(path, dtype=_NUMPY_DTYPES[entry["dtype"]], mode="c", offset=data_start + begin,
                      shape=tuple(entry["shape"]))
    return torch.from_numpy(array)


def _tensor_entry(path: Path, name: str) -> tuple[dict, int]:
    """Tensor `name`'s header entry in a safetensors file and where its data start; a `ValueError`
    naming the file when it is not one, lacks `name` or is cut short (rather than numpy's or
    struct's message from deep inside the mapping)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_size)) if header_size <= size - 8 else None
    except (struct.error, ValueError) as error:  # too short for its header size; header not JSON
        raise ValueError(f"{path}: not a safetensors file ({error}): the index is damaged; rebuild it") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (cut short: {size} bytes): the index is damaged; rebuild it")
    entry = header.get(name)
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: holds no {name!r} embeddings (it has {sorted(k for k in header if k != '__metadata__')})"
                         ": the index is damaged; rebuild it")
    end = 8 + header_size + entry["data_offsets"][1]
    if end > size:
        raise ValueError(f"{path}: cut short ({size} bytes; its {name!r} embeddings end at byte {end}): the index "
                         "is damaged; rebuild it")
    return entry, 8 + header_size


def read_index_meta(directory: Path) -> dict:
    """An index folder's `index.json`; a `FileNotFoundError` where there is none, a `ValueError`
    naming the file where it is not an index's (damaged, cut short, edited by hand).

    Usage:
        meta = read_index_meta(Path("refs"))
    """
    path = directory / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a clibd index (no index.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSON and UTF-8 decoding errors alike
        raise ValueError(f"{path}: not valid JSON ({error}): the index is damaged; rebuild it") from error
    needed = ("count", "modalities" if isinstance(meta, dict) and "modalities" in meta else "modality")
    lacking = [key for key in needed if not isinstance(meta, dict) or key not in meta]
    if lacking:
        raise ValueError(f"{path}: not a clibd index's (no {', '.join(lacking)}): the index is damaged; rebuild it")
    return meta


class RecordTable(Sequence):
    """The records of an index as an Arrow table (id, ranks, source): `table[i]` is the record
    dict a list of dicts would give. A million references read in under a second into ~145 MB,
    where `csv.DictReader` takes several seconds and ~650 MB; going through all of them takes ~4 s.

    Usage:
        records = RecordTable.read(Path("refs/records.tsv")); records[17]["species"]; records.column("genus")
    """

    def __init__(self, table: pa.Table):
        self._table = table
        self._columns = {name: table.column(name) for name in table.column_names}

    @classmethod
    def read(cls, path: Path) -> RecordTable:
        """Read a records TSV (a header line, then one record a line; `csv`'s quoting), every
        column as text: ids such as "0042" stay as written, "NA" is not a missing value."""
        with open(path, newline="") as f:
            header = next(csv.reader(f, delimiter="\t"), [])
        types = dict.fromkeys(header, pa.string())  # (dictionary columns: 15 % smaller, 5x slower to iterate)
        try:
            table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter="\t", newlines_in_values=True),
                                    convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=False,
                                                                          quoted_strings_can_be_null=False))
        except pa.ArrowInvalid as error:
            raise ValueError(f"{path}: not a records table ({error}): the index is damaged") from error
        return cls(table)

    def take(self, rows: Sequence[int]) -> RecordTable:
        """The records at `rows`, in that order (a multi-modal library's records with one modality)."""
        return RecordTable(self._table.take(pa.array(list(rows), type=pa.int64())))

    def column(self, name: str) -> list[str]:
        """One column, for every record."""
        return self._columns[name].to_pylist()

    @property
    def column_names(self) -> list[str]:
        """The table's columns (id, the ranks, source, ...)."""
        return list(self._columns)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[operator.index(i)]  # negative positions, and IndexError past the end
        return {name: column[i].as_py() for name, column in self._columns.items()}

    def __iter__(self) -> Iterator[dict[str, str]]:
        for batch in self._table.to_batches(max_chunksize=65_536):  # a block of dicts at a time
            yield from batch.to_pylist()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(
            a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # equal to a list of the same dicts, which is unhashable

    def __add__(self, other: Sequence) -> list[dict[str, str]]:
        return [*self, *other]

    def __radd__(self, other: Sequence) -> list[dict[str, str]]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"RecordTable({len(self)} records, columns {list(self._columns)})"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MB blocks (about 0.5 GB/s: 3 s for a million 768-d fp16 rows)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def ivf_path(directory: Path, name: str) -> Path:
    """Where the inverted file over the keys `name` ("embeddings", "novelty") is kept."""
    return directory / ("faiss-ivf.index" if name == "embeddings" else f"faiss-ivf-{name}.index")


def _embeddings_key(directory: Path, known: dict | None) -> dict:
    """What the inverted file is keyed to: the embeddings file's sha256 (and its size and mtime,
    so that an unchanged file is not hashed again: hashing costs seconds per million rows)."""
    stat = (directory / "embeddings.safetensors").stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if known and {k: known.get(k) for k in key} == key:
        return {**key, "sha256": known["sha256"]}
    return {**key, "sha256": file_sha256(directory / "embeddings.safetensors")}


def _read_persisted(path: Path, key: dict):
    """The persisted inverted file at `path`, memory-mapped, if its key still matches `key` (the
    keys' name, how they are searched) and the embeddings file (by sha256); else None. A copied
    folder (new file times) is rehashed, and its key's file times refreshed, instead of rebuilt."""
    import faiss

    key_path = path.with_name(path.name + ".json")
    if not (path.exists() and key_path.exists()):
        return None
    saved = json.loads(key_path.read_text())
    current = _embeddings_key(path.parent, saved.get("embeddings"))
    if saved.get("embeddings", {}).get("sha256") != current["sha256"] or any(saved.get(k) != v for k, v in key.items()):
        logger.info("%s is stale (the embeddings or how they are searched changed): rebuilding it", path)
        return None
    try:
        # IO_FLAG_MMAP_IFC (faiss >= 1.10) maps the inverted lists as plain arrays: searched as fast
        # as a copy in memory; IO_FLAG_MMAP maps them as "on-disk" lists, ~15 % slower here
        index = faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP))
    except RuntimeError as error:  # a damaged file: rebuilt like a stale one
        logger.warning("%s could not be read (%s): rebuilding it", path, error)
        return None
    if saved["embeddings"] != current:
        try:  # so that the next process need not hash the embeddings again
            atomic_write_text(key_path, json.dumps({**saved, "embeddings": current}, indent=2))
        except OSError as error:
            logger.info("%s could not be refreshed (%s): the embeddings are hashed again next time", key_path, error)
    return index


def persisted_ivf(directory: Path, name: str, keys: Callable[[], torch.Tensor], describe: dict | None = None):
    """The `faiss-ivf` index (`clibd.retrieval.approximate_faiss_index`) over the keys `name` of
    the index folder `directory`: read from the folder, memory-mapped, when a file there was
    built from the same embeddings file (by sha256), keys and recipe (and `describe`, e.g. which
    columns the keys take); otherwise built from `keys()` (called only then) and written there
    (`faiss-ivf.index` and its key `faiss-ivf.index.json`) for the next process. A folder that
    cannot be written keeps the index in memory, with a warning.

    Usage:
        ivf = persisted_ivf(Path("refs"), "embeddings", lambda: index.embeddings)
    """
    import faiss

    if not (directory / "embeddings.safetensors").exists():  # an index made in memory: no file to key to
        return approximate_faiss_index(keys())
    path = ivf_path(directory, name)
    key = {"keys": name, "recipe": APPROXIMATE_RECIPE, **(describe or {})}
    index = _read_persisted(path, key)
    if index is not None:
        return index
    index = approximate_faiss_index(keys())
    saved = {**key, "embeddings": _embeddings_key(directory, None), "faiss": faiss.__version__}
    try:
        # the index before its key: a key is never newer than the file it describes
        atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
        atomic_write_text(path.with_name(path.name + ".json"), json.dumps(saved, indent=2))
    except (OSError, RuntimeError) as error:  # faiss reports a file it cannot open as a RuntimeError
        logger.warning("%s could not be written (%s): the faiss-ivf index is kept in memory only", path, error)
    return index
