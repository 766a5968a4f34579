"""Retrieval: embed records in batches and find the nearest keys (exact torch, exact faiss, faiss-ivf).

This layer knows models and records, not splits, indexes or metrics: index, identify, evaluation
and the demo all embed and search through it.

Usage:
    keys = embed_records(model, processor, key_dataset, "dna")
    similarities, indices = search(queries, keys, k=5)                 # exact
    similarities, indices = search(queries, keys, k=5, backend="faiss-ivf", cache=cache)
"""

from __future__ import annotations

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data.collate import ContrastiveCollator
from .modeling_clibd import CLIBDModel
from .processing import CLIBDProcessor

SEARCH_BACKENDS = ("torch", "faiss", "faiss-ivf")


@torch.no_grad()
def embed_records(
    model: CLIBDModel, processor: CLIBDProcessor, dataset: datasets.Dataset, modality: str,
    batch_size: int = 256, num_workers: int = 0, progress: bool = False,
) -> torch.Tensor:
    """L2-normalised float32 CPU embeddings [N, D] of every record for one modality (the
    model's `get_<modality>_features`, all embedding parts included), in batches on the model's device.

    Usage:
        keys = embed_records(model, processor, records_to_dataset(records), "dna")
    """
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=ContrastiveCollator(processor, [modality]))
    feature_fn = {"image": model.get_image_features, "dna": model.get_dna_features,
                  "text": model.get_text_features}[modality]
    chunks = []
    for batch in tqdm(loader, desc=f"embed {modality}", disable=not progress):
        chunks.append(feature_fn(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
    if not chunks:
        return torch.empty(0, model.embedding_dim(modality))
    return torch.cat(chunks)


def topk_search(queries: torch.Tensor, keys: torch.Tensor, k: int, query_chunk: int = 256,
                key_block: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products [Q, k] (values, indices), in query chunks x key blocks with a
    running top-k, so memory stays at the keys plus one key block and one score block whatever the
    library size. Half precision keys are widened block by block: CPUs multiply fp32 several times
    faster. k is capped at the number of keys.

    Usage:
        similarities, indices = topk_search(queries, keys, k=5)
    """
    k = min(k, keys.shape[0])
    compute = torch.float32 if keys.device.type == "cpu" else keys.dtype
    queries = queries.to(compute)
    all_values, all_indices = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        chunk = queries[q0 : q0 + query_chunk]
        best_values = torch.full((chunk.shape[0], 0), float("-inf"))
        best_indices = torch.empty((chunk.shape[0], 0), dtype=torch.long)
        for k0 in range(0, keys.shape[0], key_block):
            scores = (chunk @ keys[k0 : k0 + key_block].to(compute).T).float()
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            values = torch.cat([best_values, top.values], dim=1)
            indices = torch.cat([best_indices, top.indices + k0], dim=1)
            keep = torch.topk(values, min(k, values.shape[1]), dim=1)
            best_values, best_indices = keep.values, indices.gather(1, keep.indices)
        all_values.append(best_values)
        all_indices.append(best_indices)
    if not all_values:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(all_values), torch.cat(all_indices)


def topk_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int = 256) -> torch.Tensor:
    """Indices [Q, k] of the k most cosine-similar keys (inputs L2-normalised)."""
    return topk_search(queries, keys, k, query_chunk=chunk_size)[1]


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


def search(queries: torch.Tensor, keys: torch.Tensor, k: int, backend: str = "torch",
           cache: dict | None = None, name: str = "keys") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products [Q, k] (values, indices) of `queries` among `keys`.

    `backend`: "torch" (exact, chunked matrix products), "faiss" (exact, `IndexFlatIP`) or
    "faiss-ivf" (approximate: an inverted file over 8-bit scalar-quantised vectors, for libraries
    of millions). A faiss index is built on first use and kept in `cache` under (`name`, backend)
    for later calls with the same keys. faiss: `pip install 'clibd[faiss]'`.

    Usage:
        cache = {}; similarities, indices = search(queries, keys, 5, "faiss", cache=cache)
    """
    if backend == "torch":
        return topk_search(queries, keys, k)
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; use one of {SEARCH_BACKENDS}")
    cache = {} if cache is None else cache
    if (name, backend) not in cache:
        cache[(name, backend)] = approximate_faiss_index(keys) if backend == "faiss-ivf" else faiss_index(keys)
    return faiss_search(queries, cache[(name, backend)], k)
