"""Which parameters train: whole towers, frozen encoders (projection still trains), or LoRA.

Usage:
    configure_trainable(model, frozen=["text"])          # text encoder frozen, its projection trains
    configure_trainable(model, lora_rank=4)              # peft LoRA on attention q and v, rest frozen
"""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from ..constants import MODALITIES
from ..modeling_clibd import CLIBDModel

# Attention projections adapted by LoRA in each tower. timm's ViT fuses q, k and v into one `qkv`
# linear, which peft adapts as a whole (the official code adapts only the q and v rows of it).
LORA_TARGETS = {"image": ["qkv"], "dna": ["query", "value"], "text": ["query", "value"]}


def encoder_modules(model: CLIBDModel, tower: str) -> list[nn.Module]:
    """The pretrained part of a tower (everything but its projection to the shared space)."""
    if tower == "image":
        return [model.image_encoder]
    module = getattr(model, f"{tower}_encoder")
    return module.encoder_modules() if tower == "dna" else [module.bert]


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


def _inject_lora(model: CLIBDModel, tower: str, rank: int) -> None:
    targets = LORA_TARGETS[tower]
    for module in encoder_modules(model, tower):
        if any(name.split(".")[-1] in targets for name, _ in module.named_modules()):
            config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
            inject_adapter_in_model(config, module)


def configure_trainable(model: CLIBDModel, frozen: list[str] = (), lora_rank: int | None = None) -> dict[str, int]:
    """Freeze the encoders named in `frozen`; with `lora_rank`, freeze every encoder and train
    rank-`lora_rank` LoRA adapters (alpha = rank: no scaling, as the official wrapper). Projections
    and the temperature always train. Returns trainable parameter counts per tower."""
    towers = [t for t in MODALITIES if getattr(model, f"{t}_encoder") is not None]
    for tower in towers:
        if lora_rank is not None:
            _inject_lora(model, tower, lora_rank)
        if tower in frozen or lora_rank is not None:
            for name, parameter in _body_parameters(model, tower):
                parameter.requires_grad = "lora_" in name
    for parameter in [model.logit_scale, *projection_parameters(model)]:
        parameter.requires_grad = True  # peft marks everything but adapters frozen when it injects
    counts = {t: sum(p.numel() for p in getattr(model, f"{t}_encoder").parameters() if p.requires_grad)
              for t in towers}
    return counts
