"""The paper's split (CLIBD Appendix A), deterministic from a seed.

- records without a species label -> `pretrain` (contrastive training only);
- species with >= 9 records: 80 % of species *seen*, 20 % *unseen*;
- species with 2-8 records: unseen only; single-record species are excluded;
- unseen species go, evenly and exclusively, to validation or test; within each, records are
  split 50/50 into queries (`val_unseen`, `test_unseen`) and keys (`val_unseen_keys`, ...);
- seen species' records go 70/10/10/10 to `train_seen` / `val_seen` / `test_seen` / `seen_keys`
  (one key set shared by validation and test), each seen species in all four.

Usage:
    splits = paper_split(records_to_dataset(records), seed=42)
    print(split_statistics(splits))
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict

import datasets

SPLIT_NAMES = (
    "pretrain", "train_seen", "val_seen", "test_seen", "seen_keys",
    "val_unseen", "val_unseen_keys", "test_unseen", "test_unseen_keys",
)
MIN_SEEN_RECORDS = 9
SEEN_FRACTION = 0.8
logger = logging.getLogger(__name__)


def _allocate_seen(indices: list[int]) -> dict[str, list[int]]:
    """70/10/10/10 with at least one record in each of val, test and keys (n >= 9 guarantees it)."""
    n = len(indices)
    n_small = max(1, round(0.1 * n))
    val, test, keys = indices[:n_small], indices[n_small : 2 * n_small], indices[2 * n_small : 3 * n_small]
    return {"val_seen": val, "test_seen": test, "seen_keys": keys, "train_seen": indices[3 * n_small :]}


def _halves(species: list[str]) -> tuple[list[str], list[str]]:
    return species[0::2], species[1::2]


def paper_split(dataset: datasets.Dataset, seed: int = 42) -> datasets.DatasetDict:
    """Split records (the clibd record schema) by species as the paper does; see the module doc."""
    rng = random.Random(seed)
    ids = dataset["id"]
    by_species: dict[str, list[int]] = defaultdict(list)
    assignment: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for index, species in enumerate(dataset["species"]):
        if species:
            by_species[species].append(index)
        else:
            assignment["pretrain"].append(index)

    # Sorted first (species by name, records by id): the split depends on the seed, not on row order.
    for indices in by_species.values():
        indices.sort(key=lambda i: ids[i])
    names = sorted(by_species)
    large = [s for s in names if len(by_species[s]) >= MIN_SEEN_RECORDS]
    small = [s for s in names if 2 <= len(by_species[s]) < MIN_SEEN_RECORDS]
    single = [s for s in names if len(by_species[s]) == 1]
    if single:  # said, so that a count of species or records that comes out one short is explained
        logger.info("paper split: %d species with a single record left out, as the paper does: %s", len(single),
                    ", ".join(f"{s} ({ids[by_species[s][0]]})" for s in single[:5]) + (" ..." if len(single) > 5 else ""))
    rng.shuffle(large)
    rng.shuffle(small)
    n_seen = round(SEEN_FRACTION * len(large))
    seen, unseen_large = large[:n_seen], large[n_seen:]
    val_large, test_large = _halves(unseen_large)
    val_small, test_small = _halves(small)

    for species in seen:
        indices = by_species[species][:]
        rng.shuffle(indices)
        for name, part in _allocate_seen(indices).items():
            assignment[name].extend(part)
    for prefix, group in (("val", val_large + val_small), ("test", test_large + test_small)):
        for species in group:
            indices = by_species[species][:]
            rng.shuffle(indices)
            n_queries = len(indices) // 2
            assignment[f"{prefix}_unseen"].extend(indices[:n_queries])
            assignment[f"{prefix}_unseen_keys"].extend(indices[n_queries:])
    def part(indices: list[int]) -> datasets.Dataset:
        if indices:
            return dataset.select(sorted(indices))
        # an empty selection cannot be saved to disk by datasets; an empty table with the same columns can
        return datasets.Dataset.from_dict({c: [] for c in dataset.column_names}, features=dataset.features)

    return datasets.DatasetDict({name: part(idx) for name, idx in assignment.items()})


def split_statistics(splits: datasets.DatasetDict) -> str:
    """A markdown table: records, species, genera and families per split."""
    lines = ["| split | records | species | genera | families |", "|---|---:|---:|---:|---:|"]
    for name, part in splits.items():
        counts = [len({v for v in part[rank] if v}) for rank in ("species", "genus", "family")]
        lines.append(f"| {name} | {len(part)} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines)
