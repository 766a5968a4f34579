"""Records with photos AND barcodes for the multi-modal library tests.

No real image + DNA pairs exist in the shared data (the BIOSCAN photos are order-labelled, the
barcodes come without photos), so the pairs are synthetic: every barcode record of an order gets a
photo cut from that order's real BIOSCAN photo, at a crop box fixed per species (so photos of one
species look alike and differ from other species') and a brightness fixed per specimen.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image, ImageEnhance

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.data import read_records

PHOTO_ORDERS = ("Coleoptera", "Diptera", "Hymenoptera", "Lepidoptera")
DNA = {"tokenizer_flavour": "barcodebert", "pooling": "mean"}


def save_model(path, text_tokenizer, modalities=("image", "dna", "text")):
    """A tiny untrained model of `modalities` (seeded: the same weights whichever test runs first)."""
    torch.manual_seed(0)
    config = CLIBDConfig.tiny(modalities=list(modalities), dna_config=DNA)
    CLIBDModel(config).save_pretrained(path)
    CLIBDProcessor.from_model_config(config, text_tokenizer).save_pretrained(path)
    return path


def _number(text: str, modulo: int) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % modulo


def synthetic_photo(photo_dir: Path, record: dict, out_dir: Path, size: int = 48) -> str:
    """The path of a photo for `record`: its order's BIOSCAN photo, cropped per species, brightened per specimen."""
    source = Image.open(photo_dir / "images" / f"order_{record['order']}.jpg").convert("RGB")
    width, height = source.size
    side = 96 + _number(record["species"], 64)
    left, top = _number(record["species"] + "x", width - side), _number(record["species"] + "y", height - side)
    photo = source.crop((left, top, left + side, top + side)).resize((size, size))
    photo = ImageEnhance.Brightness(photo).enhance(0.9 + _number(record["id"], 20) / 100)
    path = out_dir / f"{record['id']}.png"
    photo.save(path)
    return str(path)


def with_photos(records: list[dict], photo_dir: Path, out_dir: Path) -> list[dict]:
    """The records of the orders that have a BIOSCAN photo, each with a synthetic photo (see the module doc)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [{**r, "image": synthetic_photo(photo_dir, r, out_dir)} for r in records if r["order"] in PHOTO_ORDERS]


def species_photo_records(data_dir: Path, out_dir: Path, limit: int) -> list[dict]:
    """Up to `limit` shared barcode records, up to 4 of each species with at least 3, with synthetic photos."""
    by_species: dict[str, list[dict]] = {}
    for row in read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv"):
        by_species.setdefault(row["species"], []).append(row)
    rows = [row for group in by_species.values() if len(group) >= 3 for row in group[:4]][:limit]
    return with_photos(rows, data_dir / "bioscan1m_examples", out_dir)
