"""The newcomer's first run: embed the shared real barcodes and photos, print nearest neighbours,
then build a small multi-modal reference library and identify photos against it.

Usage:
    clibd demo                     # reads ../shared/data (or $CLIBD_SHARED_DATA)
    clibd demo --library demo-lib  # keeps the model and library there for `clibd identify`

The model here is an untrained tiny CLIBD (random weights, fixed seed): the tables show the whole
pipeline on real data (records -> processor -> towers -> cosine search -> identify), not trained
accuracy. The library holds the shared BOLD barcodes (DNA keys) and the order-labelled BIOSCAN
photos (image keys); the unlabelled specimen photos are identified against both.
"""

from __future__ import annotations

import csv
import math
import tempfile
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


def _print_predictions(out: TextIO, title: str, predictions: list) -> None:
    out.write(f"\n{title}\n{'photo':<42} {'route':<6} {'nearest key':<34} {'its order':<14} {'cosine':>6}  answer\n")
    for p in predictions:
        hit = p.hits[0]
        answer = " / ".join(v for v in p.answer.values() if v) or "(no rank clears its threshold)"
        out.write(f"  {p.query_id[:40]:<40} {p.route:<6} {hit.id[:33]:<34} {hit.taxonomy.get('order', '')[:13]:<14} "
                  f"{hit.similarity:6.3f}  {answer}\n")


def run_library_demo(data_dir: Path, out: TextIO, library_dir: Path | None = None, limit: int | None = 200,
                     seed: int = 0) -> dict:
    """Build a multi-modal library (barcodes: DNA keys; order-labelled photos: image keys) with an
    untrained tiny image + DNA model and identify the unlabelled specimen photos photo -> DNA,
    photo -> image and by IS+DU. `library_dir`: where the model (`model/`) and library (`refs/`)
    are kept (default: a temporary folder). Returns the predictions by run.

    Usage:
        run_library_demo(Path("../shared/data"), sys.stdout, Path("demo-lib"))
    """
    from .identify import Identifier
    from .library_build import build_library

    photo_table = data_dir / "bioscan1m_examples" / "images.csv"
    if not photo_table.exists():
        raise FileNotFoundError(f"{photo_table} not found: point --data-dir (or $CLIBD_SHARED_DATA) at shared/data")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(library_dir or scratch)
        torch.manual_seed(seed)
        config = CLIBDConfig.tiny(modalities=["image", "dna"],
                                  dna_config={"tokenizer_flavour": "barcodebert", "pooling": "mean"})
        CLIBDModel(config).save_pretrained(work / "model")
        CLIBDProcessor.from_model_config(config).save_pretrained(work / "model")
        photos = read_records(photo_table)  # images.csv has no id column: ids are the file names
        labelled = [p for p in photos if p["order"]]
        barcodes = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv", limit=limit)
        library = build_library(work / "model", barcodes + labelled, ["image", "dna"], work / "refs", progress=False)
        queries = [{"id": p["id"], "image": p["image"]} for p in photos if not p["order"]]
        identifier = Identifier.load(library.directory, on_bad_input="skip")
        out.write(f"\nA multi-modal library from UNTRAINED weights (tiny CLIBD, seed {seed}): {len(barcodes)} barcodes "
                  f"(DNA keys) + {len(labelled)} order-labelled photos (image keys) in {library.directory}\n")
        runs = {"photo -> DNA": identifier.identify(queries, keys=["dna"], query="image", top_k=3),
                "photo -> image": identifier.identify(queries, keys=["image"], query="image", top_k=3)}
        threshold = library.is_du_threshold()
        note = "calibrated on the library"
        if math.isnan(threshold):  # no record has both a photo and a barcode here
            threshold, note = 0.5, "0.5 given: no record has both a photo and a barcode to calibrate it on"
        runs[f"IS+DU (threshold {threshold:.3f}, {note})"] = identifier.identify(
            queries, strategy="is-du", is_du_threshold=threshold, top_k=3)
        for title, predictions in runs.items():
            _print_predictions(out, title, predictions)
        out.write("\nThe weights are untrained: these matches show the pipeline, not identifications. Real weights: "
                  "clibd convert-official bioscan-1m-image-dna-text --out clibd-1m, then the same commands (README).\n")
        return runs
