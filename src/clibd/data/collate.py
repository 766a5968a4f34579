"""Batches for contrastive training: rows of the record schema -> processor tensors, in workers.

Usage:
    collate = ContrastiveCollator(processor, ["dna", "text"], train=True, seed=42)
    loader = DataLoader(dataset, batch_size=500, collate_fn=collate, num_workers=4)
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from ..constants import RANKS
from ..processing import CLIBDProcessor

if TYPE_CHECKING:
    import datasets


def has_modalities(dataset: datasets.Dataset, modalities: list[str]) -> datasets.Dataset:
    """The records that carry every modality in `modalities` (text needs at least one rank)."""

    def keep(row: dict) -> bool:
        return ((("dna" not in modalities) or bool(row["dna"]))
                and (("image" not in modalities) or bool(row["image"]))
                and (("text" not in modalities) or any(row[r] for r in RANKS)))

    return dataset.filter(keep)

def unreadable_barcodes(dataset: datasets.Dataset, settings: dict) -> list[str]:
    """Ids of the records whose barcode the DNA tower of processor `settings`
    (`dna_config.processor_settings()`) cannot read at all (`clibd.processing.barcodes.readable`):
    left out of training and evaluation, where one would stop the run mid-epoch.

    Usage:
        unreadable_barcodes(splits["train_seen"], config.model_config().dna_config.processor_settings())
    """
    from ..processing.barcodes import normalise_barcode, readable

    profile_k = settings.get("dna_profile_kmer_size")
    k, words = (profile_k, False) if profile_k else (settings["kmer_size"], True)
    limit = None if profile_k else settings.get("max_sequence_length")

    def unreadable(record_id: str, dna: str) -> bool:
        try:
            return not readable(normalise_barcode(dna, record_id), k, words, limit)
        except ValueError:  # only N, or not nucleotides (BIOSCAN releases are not screened when read)
            return True

    return [record_id for record_id, dna in zip(dataset["id"], dataset["dna"], strict=True)
            if dna and unreadable(record_id, dna)]


LABEL_PREFIX = "labels_"  # batch keys of rank labels (`labels_species`, ...): not model inputs


class ContrastiveCollator:
    """Decode and encode a list of records. Image augmentations are seeded per (seed, epoch, record
    id), so a batch is the same whichever worker builds it and after a resume.

    Over-length barcodes are logged by record id once per batch (`warn_truncated`, default: when not
    training; training counts them once before the first epoch instead of every epoch)."""

    def __init__(self, processor: CLIBDProcessor, modalities: list[str], train: bool = False, seed: int = 0,
                 label_ranks: tuple[str, ...] = (), warn_truncated: bool | None = None):
        self.warn_truncated = not train if warn_truncated is None else warn_truncated
        self.label_ranks = tuple(label_ranks)
        self.processor = processor
        self.modalities = list(modalities)
        self.train = train
        self.seed = seed
        self.epoch = 0

    def _images(self, rows: list[dict]) -> torch.Tensor:
        if not self.train:
            return self.processor.process_images([row["image"] for row in rows])
        out = []
        for row in rows:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + zlib.crc32(row["id"].encode()))
                out.append(self.processor.process_images([row["image"]], train=True)[0])
        return torch.stack(out)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [row["id"] for row in rows]
        batch: dict[str, torch.Tensor] = {}
        if "image" in self.modalities:
            batch["pixel_values"] = self._images(rows)
        if "dna" in self.modalities:
            batch.update(self.processor.process_barcodes([row["dna"] for row in rows], ids,
                                                         warn_truncated=self.warn_truncated))
        if "text" in self.modalities:
            batch.update(self.processor.process_taxonomy([{r: row[r] for r in RANKS} for row in rows], ids))
        for rank in self.label_ranks:  # ids equal across processes and workers; -1 = unknown
            batch[f"{LABEL_PREFIX}{rank}"] = torch.tensor([zlib.crc32(row[rank].encode()) if row[rank] else -1
                                                    for row in rows], dtype=torch.long)
        return batch
