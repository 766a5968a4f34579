"""Conversion of the authors' released checkpoints."""

from .official import RELEASED, convert_official, convert_state_dict, resolve_checkpoint

__all__ = ["RELEASED", "convert_official", "convert_state_dict", "resolve_checkpoint"]
