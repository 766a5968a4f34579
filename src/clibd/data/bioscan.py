"""BIOSCAN-1M and BIOSCAN-5M, read through the authors' `bioscan-dataset` package.

The user downloads the release (metadata + an image package) as `bioscan-dataset` documents; this
module turns its metadata into clibd records and keeps the official partition in a `split` column.

Usage:
    dataset = read_bioscan("~/data", version="5m")              # datasets.Dataset, + "split"
    splits = official_splits(dataset)                         # DatasetDict by official partition
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from ..constants import RANKS
from .records import _clean

VERSIONS = {
    # version: (folder under root, metadata file under it, DNA column, official split column)
    "1m": ("bioscan1m", "BIOSCAN_Insect_Dataset_metadata.tsv", "nucraw", "split"),
    "5m": ("bioscan5m", os.path.join("metadata", "csv", "BIOSCAN_5M_Insect_Dataset_metadata.csv"),
           "dna_barcode", "split"),
}


def _image_paths_1m(frame, image_dir: Path) -> list[str]:
    return [os.fspath(image_dir / f"part{chunk}" / name)
            for chunk, name in zip(frame["chunk_number"], frame["image_file"], strict=True)]


def _image_paths_5m(frame, image_dir: Path) -> list[str]:
    return [os.fspath(image_dir / path) for path in frame["image_path"]]


def read_bioscan(
    root: str | os.PathLike,
    version: str = "5m",
    image_package: str = "cropped_256",
    partitioning: str | None = None,
    release_labels: bool = False,
) -> datasets.Dataset:
    """Records of a downloaded BIOSCAN release, with its official partition in column `split`.

    `release_labels` (1M): labels exactly as the release has them. bioscan-dataset fills a
    missing genus from the species binomial; the authors' CLIBD code reads the release's labels,
    where that genus is `not_classified` (clibd's "" for a missing label).

    `partitioning` (1M only) picks the BIOSCAN-1M partitioning version; "clibd" gives the paper's
    split when the `CLIBD_partitioning` folder is present. DNA is read in full (the processor
    truncates to 660 bp and says so).
    """
    import bioscan_dataset

    if version not in VERSIONS:
        raise ValueError(f"unknown BIOSCAN version {version!r}; use '1m' or '5m'")
    folder, metadata_name, dna_column, _ = VERSIONS[version]
    base = Path(root).expanduser() / folder
    metadata_path = base / metadata_name
    if not metadata_path.exists():
        raise FileNotFoundError(f"{metadata_path} not found: download BIOSCAN-{version.upper()} with "
                                f"bioscan-dataset (download=True) or point root at its parent folder")
    image_dir = base / "images" / image_package
    if version == "1m":
        frame = bioscan_dataset.load_bioscan1m_metadata(
            os.fspath(metadata_path), max_nucleotides=None,
            partitioning_version=partitioning or "large_diptera_family", split="all")
        split_column = "clibd_split" if partitioning == "clibd" else (partitioning or "large_diptera_family")
        image_paths = _image_paths_1m
    else:
        frame = bioscan_dataset.load_bioscan5m_metadata(os.fspath(metadata_path), max_nucleotides=None)
        split_column = "split"
        image_paths = _image_paths_5m

    def text(column: str) -> list[str]:
        return [_clean(v) for v in frame[column].astype("string").fillna("").tolist()]

    columns = {"id": text("processid"), **{rank: text(rank) for rank in RANKS},
               "dna": text(dna_column), "image": image_paths(frame, image_dir), "split": text(split_column)}
    if release_labels and version == "1m":
        columns["genus"] = _release_genus(metadata_path, columns["id"], columns["genus"])
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def _release_genus(metadata_path: Path, ids: list[str], genus: list[str]) -> list[str]:
    """`genus` with "" again where the release's own genus is missing (bioscan-dataset filled it
    from the species binomial)."""
    import pandas

    raw = pandas.read_csv(metadata_path, sep="\t", usecols=["processid", "genus"], dtype=str, keep_default_na=False)
    missing = {pid for pid, g in zip(raw["processid"], raw["genus"], strict=True) if _clean(g) == ""}
    return ["" if pid in missing else g for pid, g in zip(ids, genus, strict=True)]


def official_splits(dataset: datasets.Dataset) -> datasets.DatasetDict:
    """The records of each official partition (the `split` column), as a DatasetDict."""
    names = sorted(set(dataset["split"]))
    return datasets.DatasetDict({name: dataset.filter(lambda s, n=name: s == n, input_columns="split")
                                 for name in names})
