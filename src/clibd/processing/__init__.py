"""Turning raw specimens (photos, barcodes, taxonomy) into model inputs."""

from .alignment import (
    COI_BARCODE_LENGTH,
    INSECT_COI5P_CONSENSUS,
    align_barcode,
    aligned_onehot,
    coi_base_profile,
    consensus_profile,
)
from .barcodes import BarcodeEncoding, BarcodeTokenizer, kmer_profiles, normalise_barcode
from .images import image_transform, load_image, to_rgb
from .processor import CLIBDProcessor
from .taxonomy import taxonomy_ranks, taxonomy_text

__all__ = [
    "COI_BARCODE_LENGTH",
    "INSECT_COI5P_CONSENSUS",
    "BarcodeEncoding",
    "BarcodeTokenizer",
    "CLIBDProcessor",
    "align_barcode",
    "aligned_onehot",
    "coi_base_profile",
    "consensus_profile",
    "image_transform",
    "kmer_profiles",
    "load_image",
    "normalise_barcode",
    "taxonomy_ranks",
    "taxonomy_text",
    "to_rgb",
]
