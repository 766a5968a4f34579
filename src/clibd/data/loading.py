"""Where records come from and how they are split: the `data` section of an experiment config.

Usage:
    splits = load_splits(DataSection(path="../shared/data/insect_bold_coi/insect_bold_coi.tsv"))
    splits["train_seen"], splits["seen_keys"], splits["test_unseen"]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets

from .bioscan import official_splits, read_bioscan
from .records import read_records, records_to_dataset, resolve_data_path
from .split import paper_split

TRAIN_SPLITS = ("pretrain", "train_seen")  # the splits trained on by default: no unseen species


@dataclass
class DataSection:
    """Where records come from and how they are split (the `data` section of a YAML config).

    Usage:
        DataSection(path="../shared/data/insect_bold_coi/insect_bold_coi.tsv", split_seed=1)
    """

    source: str = "table"  # table (TSV/CSV), fasta, bioscan1m, bioscan5m
    path: str = ""
    split: str = "paper"  # paper: split by species here; official: the release's own partition
    split_seed: int = 42
    train_splits: list[str] = field(default_factory=lambda: list(TRAIN_SPLITS))
    image_package: str = "cropped_256"
    num_workers: int = 0
    limit: int | None = None
    # BIOSCAN-1M labels exactly as released (no genus filled in from the species binomial), as
    # the authors' code reads them; see `read_bioscan`
    release_labels: bool = False

    def validate(self) -> None:
        if self.source not in ("table", "fasta", "bioscan1m", "bioscan5m"):
            raise ValueError(f"data.source must be table, fasta, bioscan1m or bioscan5m, got {self.source!r}")
        if self.split not in ("paper", "official"):
            raise ValueError(f"data.split must be 'paper' or 'official', got {self.split!r}")
        if not self.path:
            raise ValueError("data.path is required")


# Official partitions renamed to the paper-split names used everywhere else in clibd.
OFFICIAL_NAMES = {
    "no_split": "pretrain",  # BIOSCAN-1M, CLIBD partitioning
    "train": "train_seen", "val": "val_seen", "test": "test_seen",  # BIOSCAN-5M
    "key_unseen": "test_unseen_keys",
}


def load_splits(data: DataSection) -> datasets.DatasetDict:
    """Records of the configured source, split as configured: the paper's split by species
    (`train_seen`, `seen_keys`, `val_unseen`, ...) or the release's own partition.

    Usage:
        splits = load_splits(ExperimentConfig.from_yaml("configs/demo.yaml").data)
    """
    if data.source in ("bioscan1m", "bioscan5m"):
        dataset = read_bioscan(resolve_data_path(data.path), version=data.source[-2:], image_package=data.image_package,
                               partitioning="clibd" if data.source == "bioscan1m" and data.split == "official"
                               else None, release_labels=data.release_labels)
        if data.limit is not None:
            dataset = dataset.select(range(min(data.limit, len(dataset))))
    else:
        dataset = records_to_dataset(read_records(resolve_data_path(data.path), limit=data.limit))
    if data.split == "paper":
        return paper_split(dataset, seed=data.split_seed)
    splits = datasets.DatasetDict({OFFICIAL_NAMES.get(name, name): part
                                   for name, part in official_splits(dataset).items()})
    if "seen_keys" not in splits and "train_seen" in splits:
        # BIOSCAN-5M has no separate seen keys: its train partition is the reference for seen species.
        splits["seen_keys"] = splits["train_seen"]
    return splits


