"""A reference library: labelled records embedded once, searched by cosine, grown without retraining.

An index directory holds `embeddings.safetensors` (fp16, one tensor per modality), `records.tsv`
(id, ranks, source) and `index.json` (model path and weights hash, modality, dimension, the
embedding's parts (`EmbeddingPart`: which dimensions score novelty), count, per-rank novelty
thresholds, clibd version). Builds run in shards that survive an interruption; the finished
directory is renamed into place. Searching goes through `clibd.retrieval`.

Usage:
    index = build_index("runs/demo/best", records, modality="dna", out="refs/")
    index = ReferenceIndex.load("refs/"); index.search(queries, k=5)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_directory
from .constants import RANKS
from .data import records_to_dataset
from .modeling_clibd import CLIBDModel
from .novelty import calibrate_thresholds
from .processing import CLIBDProcessor
from .retrieval import embed_records, search
from .towers.parts import EmbeddingPart, part_columns, select_parts, whole

INDEX_MODALITIES = ("dna", "image")  # the record field each modality reads has the same name
RECORD_COLUMNS = ("id", *RANKS, "source")
SHARD_SIZE = 2048


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 of the model's weights file(s): an index is only valid for the model that built it.

    Usage:
        model_hash("runs/demo/best") == ReferenceIndex.load("refs/").meta["model_hash"]
    """
    digest = hashlib.sha256()
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
    return CLIBDModel.from_pretrained(model_dir).eval(), CLIBDProcessor.from_pretrained(model_dir), digest


@dataclass
class ReferenceIndex:
    """Embeddings and labels of reference records for one modality, and their novelty thresholds.

    Usage:
        index = ReferenceIndex.load("refs/"); similarities, rows = index.search(queries, k=5)
    """

    directory: Path
    meta: dict
    embeddings: torch.Tensor  # [N, D] fp16, L2-normalised
    records: list[dict[str, str]]
    # built on first use: faiss indexes by (keys, backend); the novelty part of the keys
    _faiss: dict = field(default_factory=dict, repr=False, compare=False)
    _keys: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceIndex:
        """Read an index folder written by `build_index` / `add_to_index` (or an older clibd)."""
        directory = Path(directory)
        meta_path = directory / "index.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: not a clibd index (no index.json)")
        meta = json.loads(meta_path.read_text())
        embeddings = load_file(directory / "embeddings.safetensors")[meta["modality"]]
        with open(directory / "records.tsv", newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t"))
        if len(records) != embeddings.shape[0] or meta["count"] != len(records):
            raise ValueError(f"{directory}: {len(records)} records but {embeddings.shape[0]} embeddings "
                             f"(index.json says {meta['count']}): the index is damaged")
        return cls(directory, meta, embeddings, records)

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    @property
    def thresholds(self) -> dict[str, float]:
        return self.meta.get("thresholds", {})

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

    def labels(self, rank: str) -> list[str]:
        return [r[rank] for r in self.records]

    def load_model(self, model_dir: str | os.PathLike | None = None) -> tuple[CLIBDModel, CLIBDProcessor]:
        """The model and processor that built this index: from `model_dir` (e.g. an index pulled
        from the Hub) or where `index.json` says; a `ValueError` if their weights hash differs."""
        model, processor, _ = load_model(model_dir or self.meta["model"], self.meta["model_hash"])
        return model, processor

    def search(self, queries: torch.Tensor, k: int = 5, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities and indices [Q, k] of the k nearest references; `backend` as in
        `clibd.retrieval.search` ("torch", "faiss", "faiss-ivf"; a faiss index is built on first
        use and kept)."""
        return search(queries, self.embeddings, k, backend, cache=self._faiss, name="embeddings")

    def novelty_similarity(self, queries: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """Each query's best cosine [Q] to any reference on the parts that score novelty
        (`select_parts(..., "scores_novelty")`). `queries`: whole embeddings [Q, D]."""
        if "novelty" not in self._keys:
            self._keys["novelty"] = select_parts(self.embeddings, self.parts, "scores_novelty").to(torch.float16)
        queries = select_parts(queries, self.parts, "scores_novelty")
        return search(queries, self._keys["novelty"], 1, backend, cache=self._faiss, name="novelty")[0][:, 0]


def _write_index(directory: Path, meta: dict, embeddings: torch.Tensor, records: list[dict]) -> None:
    """Write all three files into a temporary folder, then swap it into place."""
    with atomic_directory(directory) as tmp:
        save_file({meta["modality"]: embeddings.to(torch.float16).contiguous()}, tmp / "embeddings.safetensors")
        with open(tmp / "records.tsv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RECORD_COLUMNS, delimiter="\t", extrasaction="ignore")
            writer.writeheader()
            writer.writerows({c: r.get(c, "") for c in RECORD_COLUMNS} for r in records)
        (tmp / "index.json").write_text(json.dumps({**meta, "count": len(records)}, indent=2))


def require_field(records: list[dict], modality: str, what: str = "records") -> None:
    """A `ValueError` naming the records that have no barcode / photo for `modality`."""
    missing = [r["id"] for r in records if not r.get(modality)]
    if missing:
        raise ValueError(f"{len(missing)} {what} have no {modality}, e.g. {missing[:5]}")


def _usable(records: list[dict], modality: str) -> list[dict]:
    require_field(records, modality, "records to index")
    unlabelled = [r["id"] for r in records if not any(r.get(rank) for rank in RANKS)]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} records have no taxonomy, e.g. {unlabelled[:5]}")
    return [{**r, "source": r.get("source", "")} for r in records]


def embed_in_shards(model: CLIBDModel, processor: CLIBDProcessor, records: list[dict], modality: str,
                    work_dir: Path, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Embed `records` shard by shard into `work_dir`; shards already there are reused (resume)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in tqdm(range(0, len(records), SHARD_SIZE), desc=f"index {modality}", disable=not progress):
        shard = work_dir / f"shard-{start // SHARD_SIZE:06d}.safetensors"
        ids = [r["id"] for r in records[start : start + SHARD_SIZE]]
        ids_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        if shard.exists():
            saved = load_file(shard)
            if bytes(saved["ids_hash"].tolist()).decode() == ids_hash:
                shards.append(saved["embeddings"])
                continue
        dataset = records_to_dataset(records[start : start + SHARD_SIZE])
        embeddings = embed_records(model, processor, dataset, modality, batch_size).to(torch.float16)
        tmp = shard.with_suffix(".tmp")
        save_file({"embeddings": embeddings, "ids_hash": torch.tensor(list(ids_hash.encode()), dtype=torch.uint8)},
                  tmp)
        os.replace(tmp, shard)
        shards.append(embeddings)
    return torch.cat(shards) if shards else torch.empty(0, model.embedding_dim(modality), dtype=torch.float16)


def _thresholds(embeddings: torch.Tensor, records: list[dict], parts: list[EmbeddingPart]) -> dict[str, float]:
    embeddings = embeddings.float()
    return calibrate_thresholds(embeddings, records,
                                novelty_embeddings=select_parts(embeddings, parts, "scores_novelty"))


def _finish(directory: Path, meta: dict, parts: list[EmbeddingPart], embeddings: torch.Tensor,
            records: list[dict], calibrate: bool, work_dir: Path) -> ReferenceIndex:
    """Store the parts (and thresholds, if asked), write the index, drop the build's shards."""
    meta = {**meta, "parts": [part.to_dict() for part in parts]}
    if calibrate:
        meta["thresholds"] = _thresholds(embeddings, records, parts)
    _write_index(directory, meta, embeddings, records)
    shutil.rmtree(work_dir, ignore_errors=True)
    return ReferenceIndex.load(directory)


def build_index(model_dir: str | os.PathLike, records: list[dict], modality: str, out: str | os.PathLike,
                batch_size: int = 256, calibrate: bool = True, progress: bool = True) -> ReferenceIndex:
    """Embed labelled records with the model saved in `model_dir` into a new index at `out`.

    Usage:
        index = build_index("runs/demo/best", read_records("refs.tsv"), "dna", "refs/")
    """
    if modality not in INDEX_MODALITIES:
        raise ValueError(f"an index holds {' or '.join(INDEX_MODALITIES)} embeddings, not {modality!r}")
    out = Path(out)
    records = _usable(records, modality)
    _reject_duplicates(records, [])
    model, processor, digest = load_model(model_dir)
    work_dir = out.with_name(f".{out.name}.partial")
    embeddings = embed_in_shards(model, processor, records, modality, work_dir, batch_size, progress)
    meta = {"clibd_version": __version__, "model": str(Path(model_dir).resolve()), "model_hash": digest,
            "modality": modality, "dim": int(embeddings.shape[1])}
    return _finish(out, meta, model.embedding_parts(modality), embeddings, records, calibrate, work_dir)


def _reject_duplicates(new: list[dict], existing: list[dict]) -> None:
    seen = {r["id"] for r in existing}
    duplicates = []
    for record in new:
        if record["id"] in seen:
            duplicates.append(record["id"])
        seen.add(record["id"])
    if duplicates:
        raise ValueError(f"{len(duplicates)} record ids are already in the index or repeated: {duplicates[:10]}"
                         " (use replace=True / --replace to overwrite them)")


def add_to_index(directory: str | os.PathLike, records: list[dict], replace: bool = False,
                 batch_size: int = 256, recalibrate: bool = True, progress: bool = True) -> ReferenceIndex:
    """Embed new labelled records with the index's own model and add them (new species included).
    An index written before parts were stored is rewritten with the model's parts.

    Usage:
        index = add_to_index("refs/", read_records("new_species.fasta"))
    """
    index = ReferenceIndex.load(directory)
    records = _usable(records, index.modality)
    kept_records, kept = index.records, index.embeddings
    if replace:
        incoming = {r["id"] for r in records}
        mask = torch.tensor([r["id"] not in incoming for r in index.records], dtype=torch.bool)
        kept_records = [r for r in index.records if r["id"] not in incoming]
        kept = index.embeddings[mask]
    _reject_duplicates(records, kept_records)
    model, processor = index.load_model()
    work_dir = Path(directory).with_name(f".{Path(directory).name}.partial")
    new = embed_in_shards(model, processor, records, index.modality, work_dir, batch_size, progress)
    all_records = kept_records + records
    embeddings = torch.cat([kept, new])
    meta = {k: v for k, v in index.meta.items() if k != "novelty_dim"}  # legacy: the parts replace it
    return _finish(Path(directory), meta, model.embedding_parts(index.modality), embeddings, all_records,
                   recalibrate, work_dir)
