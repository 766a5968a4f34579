"""Turning raw specimens (photos, barcodes, taxonomy) into model inputs."""

from .barcodes import BarcodeEncoding, BarcodeTokenizer, kmer_profiles, normalise_barcode
from .images import image_transform, load_image, to_rgb
from .processor import CLIBDProcessor
from .taxonomy import RANKS, taxonomy_ranks, taxonomy_text

__all__ = [
    "RANKS",
    "BarcodeEncoding",
    "BarcodeTokenizer",
    "CLIBDProcessor",
    "image_transform",
    "kmer_profiles",
    "load_image",
    "normalise_barcode",
    "taxonomy_ranks",
    "taxonomy_text",
    "to_rgb",
]
