"""Retrieval evaluation: embed queries and keys, exact cosine top-k, micro/macro accuracy per rank.

Usage:
    metrics = evaluate_retrieval(model, processor, splits, stage="val", pairs=[("dna", "dna"), ("dna", "text")])
    metrics["dna"]["dna"]["unseen"]["genus"]["micro_top1"]

Keys are the paper's pool: seen keys plus the unseen keys of validation and test together, so an
unseen query can be (wrongly) matched to a seen species, as in real use.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.collate import ContrastiveCollator
from ..modeling_clibd import CLIBDModel
from ..processing import RANKS, CLIBDProcessor

KEY_SPLITS = ("seen_keys", "val_unseen_keys", "test_unseen_keys")
TOP_K = (1, 3, 5)


@torch.no_grad()
def embed_records(
    model: CLIBDModel, processor: CLIBDProcessor, dataset: datasets.Dataset, modality: str,
    batch_size: int = 256, num_workers: int = 0, progress: bool = False,
) -> torch.Tensor:
    """L2-normalised float32 CPU embeddings of every record for one modality."""
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
        return torch.empty(0, model.config.projection_dim)
    return torch.cat(chunks)


def topk_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int = 4096) -> torch.Tensor:
    """Indices [Q, k] of the k most cosine-similar keys (inputs L2-normalised), in query chunks."""
    k = min(k, keys.shape[0])
    out = [torch.topk(queries[i : i + chunk_size] @ keys.T, k, dim=1).indices
           for i in range(0, queries.shape[0], chunk_size)]
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def topk_accuracy(true: Sequence[str], predicted: Sequence[Sequence[str]], k: int) -> tuple[float, float]:
    """(micro, macro) top-k accuracy; queries with an empty true label are left out. Macro is the
    mean over the true classes present among the queries of their per-class accuracy."""
    per_class: dict[str, list[bool]] = defaultdict(list)
    for label, guesses in zip(true, predicted, strict=True):
        if label:
            per_class[label].append(label in guesses[:k])
    hits = [h for v in per_class.values() for h in v]
    if not hits:
        return float("nan"), float("nan")
    micro = sum(hits) / len(hits)
    macro = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    return micro, macro


def rank_metrics(query_labels: dict[str, list[str]], key_labels: dict[str, list[str]],
                 topk: torch.Tensor) -> dict[str, dict[str, float]]:
    """{rank: {"micro_top1": ..., "macro_top1": ..., ... top3, top5}} from top-k key indices."""
    metrics: dict[str, dict[str, float]] = {}
    indices = topk.tolist()
    for rank in RANKS:
        keys = key_labels[rank]
        predicted = [[keys[j] for j in row] for row in indices]
        metrics[rank] = {}
        for k in TOP_K:
            micro, macro = topk_accuracy(query_labels[rank], predicted, k)
            metrics[rank][f"micro_top{k}"] = micro
            metrics[rank][f"macro_top{k}"] = macro
    return metrics


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _unique_taxonomy(dataset: datasets.Dataset) -> datasets.Dataset:
    """One record per distinct taxonomy (text keys: duplicates would only repeat a label)."""
    seen: set[tuple[str, ...]] = set()
    keep = []
    for i, row in enumerate(zip(*(dataset[r] for r in RANKS), strict=True)):
        if row not in seen:
            seen.add(row)
            keep.append(i)
    return dataset.select(keep)


def evaluate_retrieval(
    model: CLIBDModel, processor: CLIBDProcessor, splits: datasets.DatasetDict, stage: str = "val",
    pairs: Sequence[tuple[str, str]] = (("dna", "dna"),), batch_size: int = 256, progress: bool = False,
) -> dict:
    """Metrics `{query_modality: {key_modality: {seen|unseen|hm: {rank: {metric: value}}}}}`."""
    key_pool = datasets.concatenate_datasets([splits[name] for name in KEY_SPLITS if name in splits])
    query_sets = {"seen": splits[f"{stage}_seen"], "unseen": splits[f"{stage}_unseen"]}
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def embeddings(name: str, dataset: datasets.Dataset, modality: str) -> torch.Tensor:
        if (name, modality) not in cache:
            cache[(name, modality)] = embed_records(model, processor, dataset, modality, batch_size, progress=progress)
        return cache[(name, modality)]

    results: dict = {}
    for query_modality, key_modality in pairs:
        keys_dataset = _unique_taxonomy(key_pool) if key_modality == "text" else key_pool
        keys = embeddings(f"keys-{key_modality}", keys_dataset, key_modality)
        key_labels = {rank: keys_dataset[rank] for rank in RANKS}
        entry = {}
        for split_name, queries_dataset in query_sets.items():
            queries = embeddings(split_name, queries_dataset, query_modality)
            topk = topk_indices(queries, keys, max(TOP_K))
            entry[split_name] = rank_metrics({rank: queries_dataset[rank] for rank in RANKS}, key_labels, topk)
        entry["hm"] = {rank: {m: harmonic_mean(entry["seen"][rank][m], entry["unseen"][rank][m])
                              for m in entry["seen"][rank]} for rank in RANKS}
        results.setdefault(query_modality, {})[key_modality] = entry
    return results


def selection_score(metrics: dict) -> float:
    """The paper's rule for the best checkpoint: mean top-1 micro and macro accuracy over every
    query/key pair, seen and unseen, and all four ranks."""
    values = [ranks[rank][m] for by_key in metrics.values() for entry in by_key.values()
              for split, ranks in entry.items() if split != "hm"
              for rank in RANKS for m in ("micro_top1", "macro_top1") if ranks[rank][m] == ranks[rank][m]]
    return sum(values) / len(values) if values else 0.0


def format_table(metrics: dict, metric: str = "micro_top1") -> str:
    """A markdown table (paper Table 1 layout): one row per query->key pair, seen/unseen/H.M. per rank."""
    header = "| query -> key | " + " | ".join(f"{rank} seen | {rank} unseen | {rank} H.M." for rank in RANKS) + " |"
    lines = [header, "|---|" + "---:|" * (3 * len(RANKS))]
    for query_modality, by_key in metrics.items():
        for key_modality, entry in by_key.items():
            cells = [f"{100 * entry[s][rank][metric]:.1f}" for rank in RANKS for s in ("seen", "unseen", "hm")]
            lines.append(f"| {query_modality} -> {key_modality} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
