"""Which parameters train: whole towers, frozen encoders (projection still trains), or LoRA.

Usage:
    configure_trainable(model, frozen=["text"])          # text encoder frozen, its projection trains
    configure_trainable(model, lora_rank=4)              # LoRA on attention q and v, rest frozen
"""

from __future__ import annotations

from torch import nn

from ..constants import MODALITIES
from ..lora import LORA_MARK
from ..modeling_clibd import CLIBDModel


def encoder_modules(model: CLIBDModel, tower: str) -> list[nn.Module]:
    """The pretrained part of a tower (everything but its projection to the shared space)."""
    return model.encoder_modules(tower)


def projection_parameters(model: CLIBDModel) -> list[nn.Parameter]:
    """Parameters that map each tower into the shared space (timm's `head` for the image tower)."""
    heads = [model.image_encoder.get_classifier() if model.image_encoder is not None else None,
             model.dna_encoder.projection if model.dna_encoder is not None else None,
             model.text_encoder.projection if model.text_encoder is not None else None]
    return [p for head in heads if head is not None for p in head.parameters()]


def _body_parameters(model: CLIBDModel, tower: str):
    skip = {id(p) for p in projection_parameters(model)}
    for module in encoder_modules(model, tower):
        for name, parameter in module.named_parameters():
            if id(parameter) not in skip:
                yield name, parameter


def configure_trainable(model: CLIBDModel, frozen: list[str] = (), lora_rank: int | None = None) -> dict[str, int]:
    """Freeze the encoders named in `frozen`; with `lora_rank`, add rank-`lora_rank` LoRA adapters
    (`CLIBDModel.add_lora`; a model that has them already keeps them) and train only them in the
    encoders, as the official LoRA run. Projections and the temperature always train. Returns
    trainable parameter counts per tower."""
    if lora_rank is not None and model.config.lora_rank != lora_rank:
        if model.config.lora_rank is not None:
            raise ValueError(f"the model has rank-{model.config.lora_rank} LoRA adapters; train.lora_rank is "
                             f"{lora_rank}")
        model.add_lora(lora_rank)
    towers = [t for t in MODALITIES if getattr(model, f"{t}_encoder") is not None]
    for tower in towers:
        if tower in frozen or lora_rank is not None:
            for name, parameter in _body_parameters(model, tower):
                parameter.requires_grad = LORA_MARK in name
    for parameter in [model.logit_scale, *projection_parameters(model)]:
        parameter.requires_grad = True  # peft marks everything but adapters frozen when it injects
    counts = {t: sum(p.numel() for p in getattr(model, f"{t}_encoder").parameters() if p.requires_grad)
              for t in towers}
    return counts
