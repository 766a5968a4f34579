"""A reference library: labelled records embedded once, searched by cosine, grown without retraining.

An index directory holds `embeddings.safetensors` (fp16, one tensor per modality),
`records.tsv` (id, ranks, source) and `index.json` (model path and hash, modality, dimension,
how many leading dimensions judge novelty, count, per-rank novelty thresholds, clibd version). Builds run in shards that survive an
interruption; the finished directory is renamed into place.

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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_directory
from .data import records_to_dataset
from .evaluation.retrieval import embed_records, topk_search
from .modeling_clibd import CLIBDModel
from .novelty import calibrate_thresholds, novelty_part
from .processing import RANKS, CLIBDProcessor

RECORD_COLUMNS = ("id", *RANKS, "source")
SHARD_SIZE = 2048


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 of the model's weights file(s): an index is only valid for the model that built it."""
    digest = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (is this a saved CLIBD model?)")
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class ReferenceIndex:
    """Embeddings and labels of reference records for one modality, and their novelty thresholds."""

    directory: Path
    meta: dict
    embeddings: torch.Tensor  # [N, D] fp16, L2-normalised
    records: list[dict[str, str]]
    # built on first use: faiss indexes by (keys, backend); the novelty part of the keys
    _faiss: dict = field(default_factory=dict, repr=False, compare=False)
    _keys: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceIndex:
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

    @property
    def novelty_dim(self) -> int:
        """Leading dimensions whose cosine scores novelty (`CLIBDModel.novelty_dim`); all by default."""
        return self.meta.get("novelty_dim", self.embeddings.shape[1])

    def labels(self, rank: str) -> list[str]:
        return [r[rank] for r in self.records]

    def search(self, queries: torch.Tensor, k: int = 5, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities and indices [Q, k] of the k nearest references.

        `backend`: "torch" (exact, chunked matrix products), "faiss" (exact, `IndexFlatIP`) or
        "faiss-ivf" (approximate: an inverted file over 8-bit scalar-quantised vectors, for
        libraries of millions; about 1/4 of the memory of fp32 keys). The faiss index is built on
        first use and kept for later calls. faiss: `pip install 'clibd[faiss]'`.
        """
        return self._search("embeddings", self.embeddings, queries, k, backend)

    def novelty_similarity(self, queries: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """Each query's best cosine [Q] to any reference on the novelty part of the embedding
        (`novelty_part` of the first `novelty_dim` dimensions). `queries`: whole embeddings [Q, D]."""
        if "novelty" not in self._keys:
            self._keys["novelty"] = novelty_part(self.embeddings, self.novelty_dim).to(torch.float16)
        queries = novelty_part(queries, self.novelty_dim)
        return self._search("novelty", self._keys["novelty"], queries, 1, backend)[0][:, 0]

    def _search(self, name: str, keys: torch.Tensor, queries: torch.Tensor, k: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        if backend == "torch":
            return topk_search(queries, keys, k)
        if backend not in ("faiss", "faiss-ivf"):
            raise ValueError(f"unknown search backend {backend!r}; use 'torch', 'faiss' or 'faiss-ivf'")
        if (name, backend) not in self._faiss:
            self._faiss[(name, backend)] = approximate_faiss_index(keys) if backend == "faiss-ivf" else faiss_index(keys)
        return faiss_search(queries, self._faiss[(name, backend)], k)


def faiss_index(keys: torch.Tensor, nlist: int | None = None, encoding: str = "Flat", nprobe: int = 16,
                block: int = 65_536, seed: int = 0):
    """A faiss inner-product index over `keys` [N, D]: exact (`IndexFlatIP`) by default; with
    `nlist`, an inverted file of `nlist` cells, `nprobe` of them searched per query, the vectors
    stored as `encoding` (a faiss code: "Flat", "SQ8" one byte per dimension, "SQfp16", "PQ64").
    Keys are added in blocks, so no fp32 copy of the whole library is made.

    Usage:
        index = faiss_index(keys, nlist=1000, encoding="SQ8"); faiss_search(queries, index, k=5)
    """
    try:
        import faiss
    except ImportError as error:
        raise ImportError("the faiss backend needs faiss: pip install 'clibd[faiss]'") from error
    n, dim = keys.shape
    index = faiss.index_factory(dim, "Flat" if nlist is None else f"IVF{nlist},{encoding}", faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # faiss asks for >= 39 training points per cell; more only slows k-means down
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: 64 * (nlist or 1)]
        index.train(keys[sample.sort().values].float().numpy())
    for start in range(0, n, block):
        index.add(keys[start : start + block].float().numpy())
    if nlist is not None:
        faiss.extract_index_ivf(index).nprobe = min(nprobe, nlist)
    return index


def approximate_faiss_index(keys: torch.Tensor):
    """The `faiss-ivf` backend's index: sqrt(N) cells, 16 probed per query, 8-bit scalar-quantised keys."""
    return faiss_index(keys, nlist=max(1, int(keys.shape[0] ** 0.5)), encoding="SQ8", nprobe=16)


def faiss_search(queries: torch.Tensor, index, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products [Q, k] (values, indices) of `queries` in a `faiss_index`. An inverted
    file whose probed cells hold fewer than k keys for some query (faiss pads with -1) is searched
    again over every cell for those queries, so every returned index is a real key."""
    vectors = queries.float().numpy()
    k = min(k, index.ntotal)
    values, indices = index.search(vectors, k)
    short = (indices < 0).any(axis=1)
    if short.any():
        import faiss

        ivf = faiss.extract_index_ivf(index)
        nprobe, ivf.nprobe = ivf.nprobe, ivf.nlist
        try:
            values[short], indices[short] = index.search(vectors[short], k)
        finally:
            ivf.nprobe = nprobe
    return torch.from_numpy(values), torch.from_numpy(indices).long()


def _write_index(directory: Path, meta: dict, embeddings: torch.Tensor, records: list[dict]) -> None:
    """Write all three files into a temporary folder, then swap it into place."""
    with atomic_directory(directory) as tmp:
        save_file({meta["modality"]: embeddings.to(torch.float16).contiguous()}, tmp / "embeddings.safetensors")
        with open(tmp / "records.tsv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RECORD_COLUMNS, delimiter="\t", extrasaction="ignore")
            writer.writeheader()
            writer.writerows({c: r.get(c, "") for c in RECORD_COLUMNS} for r in records)
        (tmp / "index.json").write_text(json.dumps({**meta, "count": len(records)}, indent=2))


def _usable(records: list[dict], modality: str) -> list[dict]:
    field = "dna" if modality == "dna" else "image"
    missing = [r["id"] for r in records if not r.get(field)]
    if missing:
        raise ValueError(f"{len(missing)} records have no {field} to index, e.g. {missing[:5]}")
    unlabelled = [r["id"] for r in records if not any(r.get(rank) for rank in RANKS)]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} records have no taxonomy, e.g. {unlabelled[:5]}")
    return records


def embed_in_shards(model: CLIBDModel, processor: CLIBDProcessor, records: list[dict], modality: str,
                    work_dir: Path, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Embed `records` shard by shard into `work_dir`; shards already there are reused (resume)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    starts = range(0, len(records), SHARD_SIZE)
    for start in tqdm(starts, desc=f"index {modality}", disable=not progress):
        shard = work_dir / f"shard-{start // SHARD_SIZE:06d}.safetensors"
        ids = [r["id"] for r in records[start : start + SHARD_SIZE]]
        ids_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        if shard.exists():
            saved = load_file(shard)
            if bytes(saved["ids_hash"].tolist()).decode() == ids_hash:
                parts.append(saved["embeddings"])
                continue
        dataset = records_to_dataset(records[start : start + SHARD_SIZE])
        embeddings = embed_records(model, processor, dataset, modality, batch_size).to(torch.float16)
        tmp = shard.with_suffix(".tmp")
        save_file({"embeddings": embeddings, "ids_hash": torch.tensor(list(ids_hash.encode()), dtype=torch.uint8)},
                  tmp)
        os.replace(tmp, shard)
        parts.append(embeddings)
    return torch.cat(parts) if parts else torch.empty(0, model.embedding_dim(modality), dtype=torch.float16)


def build_index(model_dir: str | os.PathLike, records: list[dict], modality: str, out: str | os.PathLike,
                batch_size: int = 256, calibrate: bool = True, progress: bool = True) -> ReferenceIndex:
    """Embed labelled records with the model saved in `model_dir` into a new index at `out`."""
    if modality not in ("dna", "image"):
        raise ValueError(f"an index holds dna or image embeddings, not {modality!r}")
    out = Path(out)
    records = _usable(records, modality)
    _reject_duplicates(records, [])
    model = CLIBDModel.from_pretrained(model_dir).eval()
    processor = CLIBDProcessor.from_pretrained(model_dir)
    work_dir = out.with_name(f".{out.name}.partial")
    embeddings = embed_in_shards(model, processor, records, modality, work_dir, batch_size, progress)
    records = [{**r, "source": r.get("source", "")} for r in records]
    meta = {"clibd_version": __version__, "model": str(Path(model_dir).resolve()), "model_hash": model_hash(model_dir),
            "modality": modality, "dim": int(embeddings.shape[1]), "novelty_dim": model.novelty_dim(modality)}
    if calibrate:
        meta["thresholds"] = calibrate_thresholds(embeddings.float(), records, novelty_dim=meta["novelty_dim"])
    _write_index(out, meta, embeddings, records)
    shutil.rmtree(work_dir, ignore_errors=True)
    return ReferenceIndex.load(out)


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
    """Embed new labelled records with the index's own model and add them (new species included)."""
    index = ReferenceIndex.load(directory)
    model_dir = index.meta["model"]
    if model_hash(model_dir) != index.meta["model_hash"]:
        raise ValueError(f"{directory}: the model at {model_dir} is not the one that built this index "
                         "(weights hash differs); rebuild the index")
    records = _usable(records, index.modality)
    kept_records, kept = index.records, index.embeddings
    if replace:
        incoming = {r["id"] for r in records}
        mask = torch.tensor([r["id"] not in incoming for r in index.records], dtype=torch.bool)
        kept_records = [r for r in index.records if r["id"] not in incoming]
        kept = index.embeddings[mask]
    _reject_duplicates(records, kept_records)
    model = CLIBDModel.from_pretrained(model_dir).eval()
    processor = CLIBDProcessor.from_pretrained(model_dir)
    work_dir = Path(directory).with_name(f".{Path(directory).name}.partial")
    new = embed_in_shards(model, processor, records, index.modality, work_dir, batch_size, progress)
    all_records = kept_records + [{**r, "source": r.get("source", "")} for r in records]
    embeddings = torch.cat([kept, new])
    meta = dict(index.meta)
    if recalibrate:
        meta["thresholds"] = calibrate_thresholds(embeddings.float(), all_records, novelty_dim=meta.get("novelty_dim"))
    _write_index(Path(directory), meta, embeddings, all_records)
    shutil.rmtree(work_dir, ignore_errors=True)
    return ReferenceIndex.load(directory)
