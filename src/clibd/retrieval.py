"""Retrieval: embed records in batches and find the nearest keys (exact torch, exact faiss, faiss-ivf).

This layer knows models and records, not splits, indexes or metrics: index, identify, evaluation
and the demo all embed and search through it.

Embedding scales past one device: under `accelerate launch --num_processes N` (or torchrun), each
process embeds a contiguous run of whole batches and all of them get every embedding back, in
order and bit for bit what one process computes (`embed_records(..., accelerator=...)`, or every
call inside `with embedding_processes(launched_processes()):`).

Usage:
    keys = embed_records(model, processor, key_dataset, "dna")
    similarities, indices = search(queries, keys, k=5)                 # exact
    similarities, indices = search(queries, keys, k=5, backend="faiss-ivf", cache=cache)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .constants import SEARCH_BACKENDS
from .data.collate import ContrastiveCollator
from .modeling_clibd import CLIBDModel
from .processing import CLIBDProcessor

if TYPE_CHECKING:
    import datasets
    from accelerate import PartialState

# The processes that `embed_records` shares its work among when a call names none: code that
# embeds deep inside library functions (`run_evaluation`, `build_index`) opts in around the call
# instead of threading an argument through every signature.
_PROCESSES: ContextVar[PartialState | None] = ContextVar("clibd_embedding_processes", default=None)


@contextmanager
def embedding_processes(processes: PartialState | None) -> Iterator[None]:
    """Within the block, `embed_records` calls that name no `accelerator` share their work among
    `processes` (an `accelerate.PartialState` or `Accelerator`; None: each process embeds alone).
    Every process must make the same calls in the same order: each one waits for the others.

    Usage:
        with embedding_processes(launched_processes()):
            run_evaluation("runs/demo/best", data, out_dir)
    """
    token = _PROCESSES.set(processes)
    try:
        yield
    finally:
        _PROCESSES.reset(token)


def active_processes() -> PartialState | None:
    """The processes set by the enclosing `embedding_processes` block, if any."""
    return _PROCESSES.get()


def launched_processes() -> PartialState | None:
    """accelerate's state (GPUs if there are any, else gloo on the CPU) when this program was
    started as one of several processes (`accelerate launch --num_processes N`, torchrun); None
    for a plain run, which then touches no distributed state.

    Usage:
        processes = launched_processes(); is_main = processes is None or processes.is_main_process
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@torch.no_grad()
def embed_records(
    model: CLIBDModel, processor: CLIBDProcessor, dataset: datasets.Dataset | Sequence[dict], modality: str,
    batch_size: int = 256, num_workers: int = 0, progress: bool = False, accelerator: PartialState | None = None,
    warn_truncated: bool = True,
) -> torch.Tensor:
    """L2-normalised float32 CPU embeddings [N, D] of every record for one modality (the
    model's `get_<modality>_features`, all embedding parts included), in batches on the model's device.

    With `accelerator` (an `accelerate.Accelerator` or `PartialState`; by default the one an
    enclosing `embedding_processes` set) of several processes, each process embeds a contiguous
    run of whole batches on its own device (the model is moved there) and every process returns
    all N rows in order: the same bits one process computes, because every batch holds the same
    records. Every process must call it with the same dataset. One process: the plain path.
    `dataset`: a `datasets.Dataset` of the record schema, or its rows (`clibd.data.record_rows`).
    `warn_truncated`: log the ids of barcodes cut to the tower's length, batch by batch.

    Usage:
        keys = embed_records(model, processor, records_to_dataset(records), "dna")
        keys = embed_records(model, processor, dataset, "dna", accelerator=launched_processes())
    """
    processes = accelerator if accelerator is not None else _PROCESSES.get()
    if processes is not None and processes.num_processes > 1:
        return _embed_across(model, processor, dataset, modality, processes, batch_size, num_workers, progress,
                             warn_truncated)
    return _embed_batches(model, processor, dataset, modality, batch_size, num_workers, progress, warn_truncated)


def _embed_batches(model: CLIBDModel, processor: CLIBDProcessor, dataset: datasets.Dataset | Sequence[dict], modality: str,
                   batch_size: int, num_workers: int, progress: bool, warn_truncated: bool = True) -> torch.Tensor:
    """`embed_records` in this process alone."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=ContrastiveCollator(processor, [modality], warn_truncated=warn_truncated))
    feature_fn = {"image": model.get_image_features, "dna": model.get_dna_features,
                  "text": model.get_text_features}[modality]
    chunks = []
    for batch in tqdm(loader, desc=f"embed {modality}", disable=not progress):
        chunks.append(feature_fn(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
    if not chunks:
        return torch.empty(0, model.embedding_dim(modality))
    return torch.cat(chunks)


def _embed_across(model: CLIBDModel, processor: CLIBDProcessor, dataset: datasets.Dataset | Sequence[dict], modality: str,
                  processes: PartialState, batch_size: int, num_workers: int, progress: bool,
                  warn_truncated: bool = True) -> torch.Tensor:
    """Each process embeds ceil(batches / processes) whole batches, in order (the last processes
    fewer or none), pads its rows to that many and all are gathered: the padding is all at the
    end, so the first N gathered rows are the embeddings in the dataset's order. A failure in one
    process is told to all, which raise its message too, so none waits forever in the gather and
    all of them name the same record (`embed_checked` then looks for it the same way in each)."""
    from accelerate.utils import gather, gather_object

    n = len(dataset)
    if n == 0:
        return torch.empty(0, model.embedding_dim(modality))
    rows = math.ceil(math.ceil(n / batch_size) / processes.num_processes) * batch_size
    start, stop = min(n, processes.process_index * rows), min(n, (processes.process_index + 1) * rows)
    model.to(processes.device)
    failure, error = 0, None
    try:
        own = Subset(dataset, range(start, stop))  # a Dataset's or a list's rows alike, read as batched
        local = _embed_batches(model, processor, own, modality, batch_size, num_workers,
                               progress and processes.is_local_main_process, warn_truncated)
    except ValueError as raised:  # a record the processor refuses: `embed_checked` looks for it
        failure, error = 1, raised
    except Exception as raised:
        failure, error = 2, raised
    failed = [(kind, message) for kind, message in gather_object([(failure, str(error or ""))]) if kind]
    if failed:  # the first failure's message, so that every process reports the same
        raise (ValueError if all(kind == 1 for kind, _ in failed) else RuntimeError)(failed[0][1]) from error
    padded = torch.zeros(rows, local.shape[1])
    padded[: local.shape[0]] = local
    return gather(padded.to(processes.device)).cpu()[:n]


def topk_search(queries: torch.Tensor, keys: torch.Tensor, k: int, query_chunk: int = 256,
                key_block: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products [Q, k] (values, indices), in query chunks x key blocks with a
    running top-k, so memory stays at the keys plus one key block and one score block whatever the
    library size. Half precision keys are widened block by block, each block once for every query
    chunk: CPUs multiply fp32 several times faster. k is capped at the number of keys.

    Usage:
        similarities, indices = topk_search(queries, keys, k=5)
    """
    k = min(k, keys.shape[0])
    compute = torch.float32 if keys.device.type == "cpu" else keys.dtype
    queries = queries.to(compute)
    chunks = [queries[q0 : q0 + query_chunk] for q0 in range(0, queries.shape[0], query_chunk)]
    if not chunks:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    best = [(torch.full((len(chunk), 0), float("-inf")), torch.empty((len(chunk), 0), dtype=torch.long))
            for chunk in chunks]
    for k0 in range(0, keys.shape[0], key_block):
        block = keys[k0 : k0 + key_block].to(compute).T  # widened once for every query chunk
        for n, chunk in enumerate(chunks):
            scores = (chunk @ block).float()
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            values = torch.cat([best[n][0], top.values], dim=1)
            indices = torch.cat([best[n][1], top.indices + k0], dim=1)
            keep = torch.topk(values, min(k, values.shape[1]), dim=1)
            best[n] = keep.values, indices.gather(1, keep.indices)
    return torch.cat([values for values, _ in best]), torch.cat([indices for _, indices in best])


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


# What `approximate_faiss_index` builds. Inverted files persisted in index folders are keyed to it
# (`clibd.index_store`): change it whenever the function changes, so that they are rebuilt.
APPROXIMATE_RECIPE = "IVF sqrt(N) cells, SQ8 codes, 16 probed, seed 0"


def approximate_faiss_index(keys: torch.Tensor):
    """The `faiss-ivf` backend's index: sqrt(N) cells, 16 probed per query, 8-bit scalar-quantised
    keys (`APPROXIMATE_RECIPE`)."""
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
