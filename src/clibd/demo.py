"""The newcomer's first run: embed the shared real barcodes and photos, print nearest neighbours.

Usage:
    clibd demo                     # reads ../shared/data (or $CLIBD_SHARED_DATA)

The model here is an untrained tiny CLIBD (random weights, fixed seed): the table shows the whole
pipeline on real data (records -> processor -> towers -> cosine search), not trained accuracy.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TextIO

import torch

from .configuration_clibd import CLIBDConfig
from .constants import RANKS
from .data import read_records, records_to_dataset
from .modeling_clibd import CLIBDModel
from .processing import CLIBDProcessor
from .retrieval import embed_records


def nearest_other(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the most cosine-similar other row and its similarity."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    return similarity.max(dim=1)


def run_demo(data_dir: Path, out: TextIO, limit: int | None = None, show: int = 12, seed: int = 0) -> dict:
    """Embed the shared barcodes and order-labelled photos; print tables; return agreement rates."""
    barcode_file = data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv"
    photo_dir = data_dir / "bioscan1m_examples"
    if not barcode_file.exists():
        raise FileNotFoundError(f"{barcode_file} not found: point --data-dir (or $CLIBD_SHARED_DATA) at shared/data")
    torch.manual_seed(seed)
    config = CLIBDConfig.tiny(modalities=["image", "dna"],
                              dna_config={"tokenizer_flavour": "barcodebert", "pooling": "mean"})
    model = CLIBDModel(config).eval()
    processor = CLIBDProcessor.from_model_config(config)

    records = read_records(barcode_file, limit=limit)
    dna = embed_records(model, processor, records_to_dataset(records), "dna", batch_size=64, progress=True)
    neighbour_sim, neighbour = nearest_other(dna)
    out.write(f"\nUntrained tiny CLIBD (seed {seed}), {len(records)} real BOLD barcodes from {barcode_file.name}\n")
    out.write(f"{'query':<16} {'species':<28} {'nearest':<16} {'its species':<28} {'cosine':>6}\n")
    for i in range(min(show, len(records))):
        j = int(neighbour[i])
        out.write(f"{records[i]['id']:<16} {records[i]['species'][:27]:<28} {records[j]['id']:<16} "
                  f"{records[j]['species'][:27]:<28} {float(neighbour_sim[i]):6.3f}\n")
    agreement = {rank: sum(records[i][rank] == records[int(neighbour[i])][rank] for i in range(len(records)))
                 / len(records) for rank in RANKS}
    out.write("1-NN rank agreement: " + ", ".join(f"{r} {100 * a:.1f}%" for r, a in agreement.items()) + "\n")

    photos = []
    if (photo_dir / "images.csv").exists():
        with open(photo_dir / "images.csv", newline="") as f:
            photos = [row for row in csv.DictReader(f) if row["order"]]
    if photos:
        photo_records = [{"id": p["image_file"], "image": str(photo_dir / p["image_file"])} for p in photos]
        images = embed_records(model, processor, records_to_dataset(photo_records), "image", batch_size=64,
                               progress=True)
        image_sim, image_neighbour = nearest_other(images)
        out.write(f"\n{len(photos)} order-labelled BIOSCAN-1M photos, nearest other photo:\n")
        for i, photo in enumerate(photos[:show]):
            j = int(image_neighbour[i])
            out.write(f"{photo['order']:<16} -> {photos[j]['order']:<16} {float(image_sim[i]):6.3f}\n")
    out.write("\nThese weights are random: train a model (see README) for real identifications.\n")
    return agreement
