"""The paper's retrieval evaluation: every query feature x key feature pair (`pairs`), micro/macro
top-1/3/5 per rank for seen and unseen species and their H.M. (the `clibd_retrieval` metric).
Embedding and search come from `clibd.retrieval`; IS+DU is `is_du`, the report layouts `tables`.

Usage:
    metrics = evaluate_retrieval(model, processor, splits, stage="val", pairs=evaluation_pairs(model.config.modalities))
    metrics["dna"]["dna"]["unseen"]["genus"]["micro_top1"]

Keys are the paper's pool: seen keys plus the unseen keys of validation and test together, so an
unseen query can be (wrongly) matched to a seen species, as in real use.

`compat=True` counts as the authors' code counts: a missing label (`""` in clibd's records, the
release's `not_classified`) is the class `not_classified` for queries and keys alike (by default
such queries are left out of that rank), and there is one text key per key record (by default
one per distinct taxonomy).
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch

from ..constants import MODALITIES, RANKS
from ..modeling_clibd import CLIBDModel
from ..processing import CLIBDProcessor
from ..retrieval import embed_records, topk_indices
from .clibd_retrieval.retrieval_metrics import (
    harmonic_mean,
    rank_metrics,
    topk_accuracies,
    topk_accuracy,
    with_harmonic_mean,
)
from .pairs import ALL, AVERAGED, CONCATENATED, evaluation_pairs, selection_score
from .tables import format_table

KEY_SPLITS = ("seen_keys", "val_unseen_keys", "test_unseen_keys")
TOP_K = (1, 3, 5)
NOT_CLASSIFIED = "not_classified"  # the release's word for a missing label; compat mode's class

__all__ = ["KEY_SPLITS", "TOP_K", "EmbeddingCache", "evaluate_retrieval", "evaluation_pairs", "format_table",
           "harmonic_mean", "labels", "rank_metrics", "selection_score", "topk_accuracies", "topk_accuracy",
           "with_harmonic_mean"]


def labels(dataset: datasets.Dataset, compat: bool = False) -> dict[str, list[str]]:
    """{rank: the records' labels}; with `compat`, a missing label is `not_classified`.

    Usage:
        labels(splits["val_seen"], compat=True)["genus"]
    """
    return {rank: [v or NOT_CLASSIFIED for v in dataset[rank]] if compat else list(dataset[rank]) for rank in RANKS}


def _unique_taxonomy(dataset: datasets.Dataset) -> datasets.Dataset:
    """One record per distinct taxonomy (text keys: duplicates would only repeat a label)."""
    seen: set[tuple[str, ...]] = set()
    keep = []
    for i, row in enumerate(zip(*(dataset[r] for r in RANKS), strict=True)):
        if row not in seen:
            seen.add(row)
            keep.append(i)
    return dataset.select(keep)


class EmbeddingCache:
    """Embeddings of a split for a feature, computed once: a tower's (`image`, `dna`, `text`),
    `image_dna` (the normalised mean of the image and DNA embeddings, the authors' averaged
    feature) or `image_dna_concat` (the two concatenated, normalised: the authors' concatenated
    feature, whose cosine is the mean of the two cosines). With `accelerator` (an
    `accelerate.PartialState` / `Accelerator` of several processes, or an enclosing
    `clibd.retrieval.embedding_processes`) the processes share each embedding
    (`clibd.retrieval.embed_records`) and every one gets all of it."""

    def __init__(self, model: CLIBDModel, processor: CLIBDProcessor, batch_size: int, progress: bool,
                 accelerator=None):
        self.model, self.processor, self.batch_size, self.progress = model, processor, batch_size, progress
        self.accelerator = accelerator
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, name: str, dataset: datasets.Dataset, modality: str) -> torch.Tensor:
        if (name, modality) not in self.cache:
            if modality in (AVERAGED, CONCATENATED):
                image, dna = self(name, dataset, "image"), self(name, dataset, "dna")
                joined = image + dna if modality == AVERAGED else torch.cat([image, dna], dim=1)
                self.cache[(name, modality)] = torch.nn.functional.normalize(joined, dim=-1)
            else:
                self.cache[(name, modality)] = embed_records(self.model, self.processor, dataset, modality,
                                                             self.batch_size, progress=self.progress,
                                                             accelerator=self.accelerator,
                                                             # training counts long barcodes once; not per batch
                                                             warn_truncated=False)
        return self.cache[(name, modality)]


def _keys(embed: EmbeddingCache, pool: datasets.Dataset, feature: str, compat: bool):
    """Key embeddings and their labels; `all` stacks the image, DNA and text keys."""
    if feature == ALL:
        parts = [_keys(embed, pool, m, compat) for m in MODALITIES]
        return torch.cat([p[0] for p in parts]), {r: [v for p in parts for v in p[1][r]] for r in RANKS}
    if feature == "text" and not compat:
        dataset, name = _unique_taxonomy(pool), "keys-text-unique"
    else:
        dataset, name = pool, "keys"
    return embed(name, dataset, feature), labels(dataset, compat)


def key_pool(splits: datasets.DatasetDict) -> datasets.Dataset:
    """The paper's keys: seen keys, validation and test unseen keys, in that order.

    Usage:
        pool = key_pool(splits)
    """
    return datasets.concatenate_datasets([splits[name] for name in KEY_SPLITS if name in splits])


def evaluate_retrieval(
    model: CLIBDModel, processor: CLIBDProcessor, splits: datasets.DatasetDict, stage: str = "val",
    pairs: Sequence[tuple[str, str]] = (("dna", "dna"),), batch_size: int = 256, progress: bool = False,
    embed: EmbeddingCache | None = None, compat: bool = False,
) -> dict:
    """Metrics `{query_feature: {key_feature: {seen|unseen|hm: {rank: {metric: value}}}}}`, metric
    `micro_top1` ... `macro_top5`. Features: image, dna, text, image_dna (averaged),
    image_dna_concat (concatenated); keys also `all` (`clibd.evaluation.pairs`). `compat`: the
    authors' counting (module docstring).

    Usage:
        metrics = evaluate_retrieval(model, processor, splits, "test", evaluation_pairs(model.config.modalities))
    """
    embed = embed or EmbeddingCache(model, processor, batch_size, progress)
    pool = key_pool(splits)
    query_sets = {"seen": splits[f"{stage}_seen"], "unseen": splits[f"{stage}_unseen"]}
    results: dict = {}
    for query_feature, key_feature in pairs:
        keys, key_labels = _keys(embed, pool, key_feature, compat)
        queries = {name: embed(f"{stage}-{name}", dataset, query_feature) for name, dataset in query_sets.items()}
        if any(q.shape[1] != keys.shape[1] for q in queries.values()):
            continue  # the authors compare features only where the widths match (a multi-part DNA embedding)
        parts = {}
        for split_name, queries_dataset in query_sets.items():
            top = topk_indices(queries[split_name], keys, max(TOP_K)).tolist()
            predicted = {rank: [[key_labels[rank][j] for j in row] for row in top] for rank in RANKS}
            parts[split_name] = rank_metrics(labels(queries_dataset, compat), predicted, TOP_K)
        results.setdefault(query_feature, {})[key_feature] = with_harmonic_mean(parts["seen"], parts["unseen"])
    return results
