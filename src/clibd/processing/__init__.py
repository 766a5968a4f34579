"""Turning raw specimens (photos, barcodes, taxonomy) into model inputs.

Names are imported on first use (`clibd.lazy`): `clibd tokenize` needs the barcode tokenizer,
not transformers.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("COI_BARCODE_LENGTH", "INSECT_COI5P_CONSENSUS", "align_barcode", "aligned_onehot",
                     "coi_base_profile", "consensus_profile"), ".alignment"),
    **dict.fromkeys(("BarcodeEncoding", "BarcodeTokenizer", "kmer_profiles", "normalise_barcode"), ".barcodes"),
    **dict.fromkeys(("image_transform", "load_image", "to_rgb"), ".images"),
    "CLIBDProcessor": ".processor",
    **dict.fromkeys(("taxonomy_ranks", "taxonomy_text"), ".taxonomy"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:  # for type checkers and linters; at run time see _EXPORTS
    from .alignment import COI_BARCODE_LENGTH as COI_BARCODE_LENGTH
    from .alignment import INSECT_COI5P_CONSENSUS as INSECT_COI5P_CONSENSUS
    from .alignment import align_barcode as align_barcode
    from .alignment import aligned_onehot as aligned_onehot
    from .alignment import coi_base_profile as coi_base_profile
    from .alignment import consensus_profile as consensus_profile
    from .barcodes import BarcodeEncoding as BarcodeEncoding
    from .barcodes import BarcodeTokenizer as BarcodeTokenizer
    from .barcodes import kmer_profiles as kmer_profiles
    from .barcodes import normalise_barcode as normalise_barcode
    from .images import image_transform as image_transform
    from .images import load_image as load_image
    from .images import to_rgb as to_rgb
    from .processor import CLIBDProcessor as CLIBDProcessor
    from .taxonomy import taxonomy_ranks as taxonomy_ranks
    from .taxonomy import taxonomy_text as taxonomy_text
