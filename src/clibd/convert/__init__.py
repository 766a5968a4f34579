"""Conversion of the authors' released checkpoints: CLIBD models (`official`) and BarcodeBERT (`barcodebert`)."""

from .barcodebert import BARCODEBERT_RELEASES, convert_barcodebert, load_barcodebert_checkpoint
from .official import RELEASED, convert_official, convert_state_dict, resolve_checkpoint

__all__ = ["BARCODEBERT_RELEASES", "RELEASED", "convert_barcodebert", "convert_official", "convert_state_dict",
           "load_barcodebert_checkpoint", "resolve_checkpoint"]
