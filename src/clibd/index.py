"""A reference library: labelled records embedded once, searched by cosine, grown without retraining.

An index directory holds `embeddings.safetensors` (fp16, one tensor per modality), `records.tsv`
(id, ranks, source) and `index.json` (model path and weights hash, modality, dimension, the
embedding's parts (`EmbeddingPart`: which dimensions score novelty), count, per-rank novelty
thresholds, clibd version). Builds run in shards that survive an interruption; the finished
directory is renamed into place. Searching goes through `clibd.retrieval`. Writing lives in
`clibd.index_build`; a folder with several key modalities (image, DNA, taxon names) is a
multi-modal library (`clibd.library`), which `ReferenceIndex.load` opens as its first key set.

Usage:
    index = build_index("runs/demo/best", records, modality="dna", out="refs/")
    index = ReferenceIndex.load("refs/"); index.search(queries, k=5)
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .atomic import atomic_write
from .checked_embedding import NOT_FINITE, check_finite_weights, embed_checked, not_finite_rows
from .constants import RANKS
from .data.records import id_problem
from .index_store import RecordTable, map_embeddings, persisted_ivf, read_index_meta
from .modeling_clibd import CLIBDModel
from .novelty import Calibration, calibrate, label_ids, labels_of
from .processing import CLIBDProcessor
from .retrieval import active_processes, embedding_processes, faiss_search, search
from .species_check import SpeciesCheck
from .towers.parts import EmbeddingPart, part_columns, select_parts, whole

logger = logging.getLogger(__name__)

RECORD_COLUMNS = ("id", *RANKS, "source")
BARCODES_FILE = "barcodes.tsv"  # a DNA index's reference barcodes (id, dna), for the species check
SHARD_SIZE = 2048


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 of the model's weights file(s): an index is only valid for the model that built it.

    Usage:
        model_hash("runs/demo/best") == ReferenceIndex.load("refs/").meta["model_hash"]
    """
    digest = hashlib.sha256()
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: " + ("a file, not a model folder" if Path(model_dir).exists()
                                                    else "no such model folder"))
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (is this a saved CLIBD model?)")
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_model(model_dir: str | os.PathLike, expected_hash: str | None = None
               ) -> tuple[CLIBDModel, CLIBDProcessor, str]:
    """The model (eval mode) and processor saved in `model_dir`, and its weights hash; a
    `ValueError` when `expected_hash` is given and differs (the model did not build the index).

    Usage:
        model, processor, digest = load_model("runs/demo/best")
    """
    digest = model_hash(model_dir)
    if expected_hash is not None and digest != expected_hash:
        raise ValueError(f"{model_dir}: not the one that built this index (weights hash differs); "
                         "pass the model that built it, or rebuild the index")
    try:
        model = CLIBDModel.from_pretrained(model_dir).eval()
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        raise ValueError(f"{model_dir}: cannot load the model's weights (model.safetensors truncated or damaged? "
                         f"{type(error).__name__}: {error})") from error
    check_finite_weights(model, model_dir)
    return model, CLIBDProcessor.from_pretrained(model_dir), digest


@dataclass
class ReferenceIndex:
    """Embeddings and labels of reference records for one modality, and their novelty thresholds.

    Usage:
        index = ReferenceIndex.load("refs/"); similarities, rows = index.search(queries, k=5)
    """

    directory: Path
    meta: dict
    embeddings: torch.Tensor  # [N, D] fp16, L2-normalised; loaded: mapped from the file, not copied
    records: Sequence[dict[str, str]]  # loaded: a RecordTable (an Arrow table; each record a dict)
    # built on first use: faiss indexes by (keys, backend) (faiss-ivf: read from or written to the
    # folder, `clibd.index_store`); the novelty part of the keys
    _faiss: dict = field(default_factory=dict, repr=False, compare=False)
    _keys: dict = field(default_factory=dict, repr=False, compare=False)
    _labels: dict = field(default_factory=dict, repr=False, compare=False)
    # what its searched keys are called in the folder: "embeddings" for a single-modality index;
    # a multi-modal library's key sets (`clibd.library`) are named by their modality
    key_name: str = "embeddings"

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceIndex:
        """Read an index folder written by `build_index` / `add_to_index` (or an older clibd): the
        embeddings memory-mapped (read when searched, shared between processes), the records as
        columns (`clibd.index_store`), so a million references open in seconds."""
        directory = Path(directory)
        meta = read_index_meta(directory)
        if "modalities" in meta:  # a multi-modal library: its first key set (`clibd.library` reads all)
            from .library import ReferenceLibrary

            return ReferenceLibrary.load(directory).key_sets[meta["modalities"][0]]
        embeddings = map_embeddings(directory / "embeddings.safetensors", meta["modality"])
        records = RecordTable.read(directory / "records.tsv")
        if len(records) != embeddings.shape[0] or meta["count"] != len(records):
            raise ValueError(f"{directory}: {len(records)} records but {embeddings.shape[0]} embeddings "
                             f"(index.json says {meta['count']}): the index is damaged")
        return cls(directory, meta, embeddings, records)

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def thresholds(self) -> dict[str, float]:
        """Per-rank thresholds (`clibd.novelty`). An index from a clibd that left a rank NaN where
        it had only right or only wrong answers (which then answered anything) is recalibrated
        here, in memory, with a warning; `recalibrate_index` stores the result."""
        recalibrated = self._recalibrated
        return recalibrated.thresholds if recalibrated else self.meta.get("thresholds", {})

    @cached_property
    def _recalibrated(self) -> Calibration | None:
        thresholds = self.meta.get("thresholds", {})
        if "calibration" in self.meta or not any(math.isnan(value) for value in thresholds.values()):
            return None
        logger.warning("%s: built by an older clibd whose thresholds for %s could not be set; recalibrated in "
                       "memory (store it with `clibd index recalibrate %s`)", self.directory,
                       [rank for rank, value in thresholds.items() if math.isnan(value)], self.directory)
        return _calibrate(self.embeddings, self.records, self.parts)  # indexes from before trained_species

    @property
    def margin_weights(self) -> dict[str, float]:
        """Per placing rank, the weight of the taxon margin in the confidence its threshold is
        compared with (`clibd.novelty.rank_confidence`); {} (the similarity alone) for an index
        built before margins were."""
        recalibrated = self._recalibrated
        return recalibrated.margin_weights if recalibrated else self.meta.get("margin_weights", {})

    @property
    def precision_curves(self) -> dict[str, list[tuple[float, float]]]:
        """Per rank, the calibrated precision of answers by confidence (`clibd.thresholds.precision_curve`)."""
        recalibrated = self._recalibrated
        return recalibrated.curves if recalibrated else self.meta.get("precision_curves", {})

    @cached_property
    def parts(self) -> list[EmbeddingPart]:
        """The parts of the stored embeddings. Indexes written before parts were stored have a
        `novelty_dim`: a leading block that scores novelty and a rest that does not."""
        if "parts" in self.meta:
            return [EmbeddingPart.from_dict(part) for part in self.meta["parts"]]
        dim = self.embeddings.shape[1]
        novelty_dim = self.meta.get("novelty_dim", dim)
        if novelty_dim >= dim:
            return whole(dim)
        return [EmbeddingPart("novelty", novelty_dim), EmbeddingPart("placement", dim - novelty_dim,
                                                                     scores_novelty=False)]

    @cached_property
    def scores_novelty_apart(self) -> bool:
        """Whether only some parts score novelty (`novelty_similarity` then differs from the best similarity)."""
        return len(part_columns(self.parts, "scores_novelty")) < self.embeddings.shape[1]

    @cached_property
    def species_check(self) -> SpeciesCheck | None:
        """The calibrated species rule of a DNA index (`clibd.species_check`); None for an index
        built without it, or by an older clibd (which kept no barcodes: rebuild it)."""
        stored = self.meta.get("species_check")
        calibrated = isinstance(stored, dict) and "embedding_threshold" in stored
        return SpeciesCheck.from_dict(stored) if calibrated and self.barcodes else None

    @cached_property
    def barcodes(self) -> list[str]:
        """The reference barcodes of a DNA index (or a library's DNA keys) in record order ("" where
        unknown; [] without any, and for keys of another modality, whose folder may hold a library's)."""
        path = self.directory / BARCODES_FILE
        if self.meta.get("modality") != "dna":
            return []
        if not path.exists():
            stored = self.meta.get("species_check")
            if isinstance(stored, dict) and "embedding_threshold" in stored:  # written with it: not an older index
                raise ValueError(f"{path}: missing, yet the index's species check aligns queries with these "
                                 "barcodes: the index is damaged; rebuild it")
            return []
        table = RecordTable.read(path)
        if table.column("id") != self.labels("id"):
            raise ValueError(f"{path}: its ids are not the index's records: the index is damaged")
        return table.column("dna")

    def records_with_barcodes(self) -> Sequence[dict[str, str]]:
        """The records as dicts, each with its `dna`, where the index keeps the barcodes; else the
        records as they are (no dict per record for an image index, or an older DNA index).

        Usage:
            check = calibrate_species_check(index.embeddings, novelty, index.records_with_barcodes())
        """
        if not self.barcodes:
            return self.records
        return [{**record, "dna": dna} for record, dna in zip(self.records, self.barcodes, strict=True)]

    def labels(self, rank: str) -> list[str]:
        """Every reference's label at `rank` (any column: "id", "genus", ...), in key order, ""
        where it has none; read once per index (the margins of identify look labels up per hit).

        Usage:
            index.labels("genus")[17]
        """
        if rank not in self._labels:
            self._labels[rank] = labels_of(self.records, rank)
        return self._labels[rank]

    def label_ids(self, rank: str) -> torch.Tensor:
        """[N] integers standing for `labels(rank)` (`clibd.novelty.label_ids`), made once per index:
        what identify's margins compare.

        Usage:
            index.label_ids("genus")[rows]   # [Q, K] labels of each query's nearest references
        """
        if (rank, "ids") not in self._labels:
            self._labels[rank, "ids"] = label_ids(self.labels(rank))
        return self._labels[rank, "ids"]

    def load_model(self, model_dir: str | os.PathLike | None = None) -> tuple[CLIBDModel, CLIBDProcessor]:
        """The model and processor that built this index: from `model_dir` (e.g. an index pulled
        from the Hub) or where `index.json` says; a `ValueError` if their weights hash differs."""
        model, processor, _ = load_model(model_dir or self.meta["model"], self.meta["model_hash"])
        return model, processor

    def search(self, queries: torch.Tensor, k: int = 5, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities and indices [Q, k] of the k nearest references; `backend` as in
        `clibd.retrieval.search` ("torch", "faiss", "faiss-ivf"; a faiss index is built on first
        use and kept; "faiss-ivf" is also kept in the index folder, for later processes)."""
        return self._search(queries, self.key_name, lambda: self.embeddings, k, backend)

    def novelty_similarity(self, queries: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """Each query's best cosine [Q] to any reference on the parts that score novelty
        (`select_parts(..., "scores_novelty")`). `queries`: whole embeddings [Q, D]."""
        queries = select_parts(queries, self.parts, "scores_novelty")
        name = "novelty" if self.key_name == "embeddings" else f"novelty-{self.key_name}"
        return self._search(queries, name, self._novelty_keys, 1, backend)[0][:, 0]

    def _novelty_keys(self) -> torch.Tensor:
        if "novelty" not in self._keys:
            self._keys["novelty"] = select_parts(self.embeddings, self.parts, "scores_novelty").to(torch.float16)
        return self._keys["novelty"]

    def _search(self, queries: torch.Tensor, name: str, keys: Callable[[], torch.Tensor], k: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`clibd.retrieval.search` over the keys `name`; `keys()` is only called when they are
        needed: a faiss-ivf index persisted in the folder is memory-mapped and never reads them."""
        if backend == "faiss-ivf" and (name, backend) not in self._faiss:
            # keyed to the build this object loaded, not only to the file now in the folder: a process
            # that loaded an index before `index add` replaced it neither reads nor leaves a wrong file
            describe = {"build_id": self.meta.get("build_id"), "count": len(self.records)}
            if name.startswith("novelty"):
                describe["parts"] = [part.to_dict() for part in self.parts]
            ivf = persisted_ivf(self.directory, name, keys, describe)
            if ivf.ntotal != len(self.records):  # never answer row numbers of another library
                raise ValueError(f"{self.directory}: the faiss-ivf index holds {ivf.ntotal} keys for "
                                 f"{len(self.records)} records; remove {self.directory}/faiss-ivf*.index")
            self._faiss[(name, backend)] = ivf
        if (name, backend) in self._faiss:
            return faiss_search(queries, self._faiss[(name, backend)], k)
        return search(queries, keys(), k, backend, cache=self._faiss, name=name)


def require_field(records: list[dict], modality: str, what: str = "records") -> None:
    """A `ValueError` naming the records that have no barcode / photo for `modality`."""
    missing = [r["id"] for r in records if not r.get(modality)]
    if missing:
        raise ValueError(f"{len(missing)} {what} have no {modality}, e.g. {missing[:5]}")


def unusable(records: Sequence[dict], modality: str, known_ids: Collection[str] = (), labelled: bool = False,
             what: str = "record") -> dict[int, str]:
    """Position -> why, for records that cannot be embedded for `modality` as given: a reader's
    `error`, no barcode or photo, an id holding a tab or a line break (it would break every TSV
    written), no taxonomy (when `labelled`: references), an id in `known_ids` or given earlier in
    `records`. The one check behind index build / add and identify.

    Usage:
        unusable(queries, "dna", what="query")       # {3: "duplicate query id (repeated; ...)"}
    """
    first, found = {}, {}
    for i, record in enumerate(records):
        record_id = record["id"]
        if record.get("error"):
            found[i] = record["error"]
        elif not record.get(modality):
            found[i] = f"no {modality}"
        elif why := id_problem(record_id):  # records given in Python: the readers check files
            found[i] = why
        elif labelled and not any(record.get(rank) for rank in RANKS):
            found[i] = "no taxonomy"
        elif record_id in known_ids:
            found[i] = "id already in the index (use replace=True / --replace to overwrite it)"
        elif record_id in first:
            found[i] = f"duplicate {what} id (repeated; first given as {what} {first[record_id] + 1})"
        first.setdefault(record_id, i)
    return found


def embed_in_shards(model: CLIBDModel, processor: CLIBDProcessor, records: list[dict], modality: str,
                    work_dir: Path, batch_size: int = 256, progress: bool = True, skip: bool = False,
                    accelerator=None) -> tuple[torch.Tensor, dict[int, str]]:
    """Embed `records` shard by shard into `work_dir`; shards already there are reused (resume).
    Returns the embeddings and {position: why} of records that could not be embedded (`skip`;
    without it, a `ValueError`; see `clibd.checked_embedding`). Under several processes
    (`accelerator`, an `accelerate.PartialState` / `Accelerator`, or an enclosing
    `clibd.retrieval.embedding_processes`) each shard is embedded by all of them
    (`clibd.retrieval.embed_records`) and written by the main one: `work_dir` must be shared."""
    processes = accelerator if accelerator is not None else active_processes()
    main = processes is None or processes.is_main_process
    work_dir.mkdir(parents=True, exist_ok=True)
    shards, failures = [], {}
    for start in tqdm(range(0, len(records), SHARD_SIZE), desc=f"index {modality}", disable=not (progress and main)):
        shard = work_dir / f"shard-{start // SHARD_SIZE:06d}.safetensors"
        ids = [r["id"] for r in records[start : start + SHARD_SIZE]]
        ids_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        if shard.exists():
            saved = load_file(shard)
            if bytes(saved["ids_hash"].tolist()).decode() == ids_hash:
                shards.append(saved["embeddings"])
                failures |= {start + i: NOT_FINITE for i in not_finite_rows(saved["embeddings"])}
                continue
        with embedding_processes(processes):
            embeddings, shard_failures = embed_checked(model, processor, records[start : start + SHARD_SIZE],
                                                       modality, batch_size, skip)
        embeddings = embeddings.to(torch.float16)
        failures |= {start + i: why for i, why in shard_failures.items()}
        if main:  # every process holds the whole shard; two writing one file would collide
            tensors = {"embeddings": embeddings, "ids_hash": torch.tensor(list(ids_hash.encode()), dtype=torch.uint8)}
            atomic_write(shard, partial(save_file, tensors))
        shards.append(embeddings)
    empty = torch.empty(0, model.embedding_dim(modality), dtype=torch.float16)
    return (torch.cat(shards) if shards else empty), failures


def _calibrate(embeddings: torch.Tensor, records: list[dict], parts: list[EmbeddingPart],
               precision: float | None = None, trained_species: list[str] | None = None) -> Calibration:
    # fp16 as stored: `nearest_held_out` makes each chunk float32 as it uses it, no full copy
    return calibrate(embeddings, records, novelty_embeddings=select_parts(embeddings, parts, "scores_novelty"),
                     precision=precision, trained_species=trained_species)


def trained_species_meta(model) -> dict:
    """What an index.json keeps of the model's training species (`CLIBDConfig.trained_species`),
    which calibration holds out apart from the rest (`clibd.novelty.calibration_sample`); {} where
    the model does not say."""
    species = getattr(model.config, "trained_species", None)
    return {} if species is None else {"trained_species": sorted(species)}


# The writing side lives in `clibd.index_build`, which imports this module; its names stay
# importable from here, looked up on first use so that either module may be imported first.
_WRITING = ("_write_index", "add_to_index", "build_index", "recalibrate_index")


def __getattr__(name: str):
    if name in _WRITING:
        from . import index_build

        return getattr(index_build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
