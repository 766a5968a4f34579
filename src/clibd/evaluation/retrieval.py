"""The paper's retrieval metrics: micro/macro top-k accuracy per rank, seen/unseen/H.M., IS+DU,
the best-checkpoint score and the Table 1 layout. Embedding and search come from `clibd.retrieval`.

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

from ..constants import MODALITIES, RANKS
from ..modeling_clibd import CLIBDModel
from ..processing import CLIBDProcessor
from ..retrieval import embed_records, topk_indices

KEY_SPLITS = ("seen_keys", "val_unseen_keys", "test_unseen_keys")
QUERY_MODALITIES = ("image", "dna")  # the paper's queries (and their mean); taxonomy text is a key only
TOP_K = (1, 3, 5)


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


class EmbeddingCache:
    """Embeddings of a split for a modality, computed once; `image_dna` is the normalised mean of
    the image and DNA embeddings (the paper's combined query). With `accelerator` (an
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
            if modality == "image_dna":
                mean = self(name, dataset, "image") + self(name, dataset, "dna")
                self.cache[(name, modality)] = torch.nn.functional.normalize(mean, dim=-1)
            else:
                self.cache[(name, modality)] = embed_records(self.model, self.processor, dataset, modality,
                                                             self.batch_size, progress=self.progress,
                                                             accelerator=self.accelerator,
                                                             # training counts long barcodes once; not per batch
                                                             warn_truncated=False)
        return self.cache[(name, modality)]


def _keys(embed: EmbeddingCache, pool: datasets.Dataset, modality: str, tower_modalities: list[str]):
    """Key embeddings and their labels; `all` stacks the keys of every tower of the model."""
    if modality == "all":
        parts = [_keys(embed, pool, m, tower_modalities) for m in MODALITIES if m in tower_modalities]
        return torch.cat([p[0] for p in parts]), {r: [v for p in parts for v in p[1][r]] for r in RANKS}
    dataset = _unique_taxonomy(pool) if modality == "text" else pool
    return embed(f"keys-{modality}", dataset, modality), {rank: dataset[rank] for rank in RANKS}


def evaluate_retrieval(
    model: CLIBDModel, processor: CLIBDProcessor, splits: datasets.DatasetDict, stage: str = "val",
    pairs: Sequence[tuple[str, str]] = (("dna", "dna"),), batch_size: int = 256, progress: bool = False,
    embed: EmbeddingCache | None = None,
) -> dict:
    """Metrics `{query_modality: {key_modality: {seen|unseen|hm: {rank: {metric: value}}}}}`.

    Query modalities: image, dna, image_dna; key modalities: image, dna, text, all.
    """
    embed = embed or EmbeddingCache(model, processor, batch_size, progress)
    key_pool = datasets.concatenate_datasets([splits[name] for name in KEY_SPLITS if name in splits])
    query_sets = {"seen": splits[f"{stage}_seen"], "unseen": splits[f"{stage}_unseen"]}
    results: dict = {}
    for query_modality, key_modality in pairs:
        keys, key_labels = _keys(embed, key_pool, key_modality, model.config.modalities)
        entry = {}
        for split_name, queries_dataset in query_sets.items():
            queries = embed(f"{stage}-{split_name}", queries_dataset, query_modality)
            topk = topk_indices(queries, keys, max(TOP_K))
            entry[split_name] = rank_metrics({rank: queries_dataset[rank] for rank in RANKS}, key_labels, topk)
        entry["hm"] = {rank: {m: harmonic_mean(entry["seen"][rank][m], entry["unseen"][rank][m])
                              for m in entry["seen"][rank]} for rank in RANKS}
        results.setdefault(query_modality, {})[key_modality] = entry
    return results


def is_du_accuracy(seen_sims: torch.Tensor, seen_labels: list[str], unseen_labels: list[str],
                   true: list[str], threshold: float) -> float:
    """Top-1 accuracy of IS+DU routing: the seen (image-key) answer when its similarity is strictly
    above `threshold`, else the unseen (DNA-key) answer. `seen_sims` [Q] is the top-1 similarity to
    the seen keys; the label lists are the top-1 labels from each key set."""
    use_seen = (seen_sims > threshold).tolist()
    predicted = [s if seen else u for s, u, seen in zip(seen_labels, unseen_labels, use_seen, strict=True)]
    return topk_accuracy(true, [[p] for p in predicted], 1)[0]


def is_du_search(candidates: dict[str, tuple[torch.Tensor, list[str], list[str], list[str]]],
                 thresholds: torch.Tensor | None = None) -> tuple[float, float]:
    """The threshold (of `thresholds`, default linspace(0, 1, 1000)) maximising the harmonic mean of
    seen and unseen species top-1 accuracy; returns (threshold, that harmonic mean)."""
    thresholds = torch.linspace(0, 1, 1000) if thresholds is None else thresholds
    best, best_hm = float(thresholds[0]), -1.0
    for threshold in thresholds.tolist():
        hm = harmonic_mean(*(is_du_accuracy(*candidates[s], threshold) for s in ("seen", "unseen")))
        if hm > best_hm:
            best, best_hm = threshold, hm
    return best, best_hm


def evaluate_is_du(model: CLIBDModel, processor: CLIBDProcessor, splits: datasets.DatasetDict,
                   embed: EmbeddingCache, threshold: float | None = None, stage: str = "val") -> dict:
    """IS+DU (paper 5.4): image queries; seen keys = image embeddings of the seen keys, unseen keys =
    DNA embeddings of the validation and test unseen keys. With `threshold=None` it is searched on
    this stage (use on val), otherwise applied (use the val threshold on test). Species level."""
    seen_keys = splits["seen_keys"]
    unseen_keys = datasets.concatenate_datasets([splits[n] for n in ("val_unseen_keys", "test_unseen_keys")
                                                 if n in splits])
    image_keys = embed("keys-image", seen_keys, "image")
    dna_keys = embed("unseen-keys-dna", unseen_keys, "dna")
    candidates = {}
    for split_name in ("seen", "unseen"):
        dataset = splits[f"{stage}_{split_name}"]
        queries = embed(f"{stage}-{split_name}", dataset, "image")
        seen_top = (queries @ image_keys.T).max(dim=1)
        unseen_top = (queries @ dna_keys.T).max(dim=1).indices
        candidates[split_name] = (seen_top.values, [seen_keys["species"][i] for i in seen_top.indices.tolist()],
                                  [unseen_keys["species"][i] for i in unseen_top.tolist()], dataset["species"])
    if threshold is None:
        threshold, _ = is_du_search(candidates)
    seen = is_du_accuracy(*candidates["seen"], threshold)
    unseen = is_du_accuracy(*candidates["unseen"], threshold)
    return {"threshold": threshold, "seen": seen, "unseen": unseen, "hm": harmonic_mean(seen, unseen)}


def evaluation_pairs(modalities: list[str]) -> list[tuple[str, str]]:
    """Queries: image, DNA and their mean; keys: every tower's embeddings and all of them stacked."""
    queries = [m for m in QUERY_MODALITIES if m in modalities]
    if len(queries) == 2:
        queries.append("image_dna")
    keys = [m for m in MODALITIES if m in modalities]
    return [(q, k) for q in queries for k in [*keys, "all"]]


def selection_score(metrics: dict) -> float:
    """The paper's rule for the best checkpoint: mean top-1 micro and macro accuracy over every
    query/key pair, seen and unseen, and all four ranks."""
    values = [ranks[rank][m] for by_key in metrics.values() for key, entry in by_key.items() if key != "is_du"
              for split, ranks in entry.items() if split != "hm"
              for rank in RANKS for m in ("micro_top1", "macro_top1") if ranks[rank][m] == ranks[rank][m]]
    return sum(values) / len(values) if values else 0.0


def format_table(metrics: dict, metric: str = "micro_top1") -> str:
    """A markdown table (paper Table 1 layout): one row per query->key pair, seen/unseen/H.M. per rank."""
    header = "| query -> key | " + " | ".join(f"{rank} seen | {rank} unseen | {rank} H.M." for rank in RANKS) + " |"
    lines = [header, "|---|" + "---:|" * (3 * len(RANKS))]
    names = {"image_dna": "image+DNA", "dna": "DNA"}
    for query_modality, by_key in metrics.items():
        for key_modality, entry in by_key.items():
            if key_modality == "is_du":
                continue
            cells = [f"{100 * entry[s][rank][metric]:.1f}" for rank in RANKS for s in ("seen", "unseen", "hm")]
            pair = f"{names.get(query_modality, query_modality)} -> {names.get(key_modality, key_modality)}"
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
