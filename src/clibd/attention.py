"""Attention rollout of the image tower (Abnar & Zuidema 2020): where a timm ViT looks, as in the
paper's Fig. 5 and 10 (the aligned model next to its unaligned, ImageNet-pretrained image tower).

Each block's attention probabilities are captured with a forward hook on its attention dropout
(timm computes them explicitly while `fused_attn` is off, which `attention_maps` arranges for the
call). Rollout: per block, the mean over heads plus the identity for the residual connection, rows
renormalised to sum to 1, multiplied from the first block to the last. The row of the class token
over the patch tokens, reshaped to the patch grid, is the map. The paper rolls out blocks 2 to 6
(`PAPER_BLOCKS`) after inspecting the maps for artefacts; `class_token_maps` takes the range.

Usage:
    rollout = attention_rollout(model.image_encoder, pixel_values)       # [B, tokens, tokens]
    maps = class_token_maps(model.image_encoder, pixel_values, (2, 6))   # [B, grid_h, grid_w]
    towers, note = attention_towers("runs/x/best")                       # {"unaligned: ...": vit, "aligned: best": vit}
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from torch import nn


def _attention_modules(vit: nn.Module) -> list[nn.Module]:
    """timm's self-attention modules, first block first (a module with `qkv` and `attn_drop`)."""
    modules = [m for m in vit.modules() if hasattr(m, "qkv") and hasattr(m, "attn_drop") and hasattr(m, "fused_attn")]
    if not modules:
        raise ValueError(f"{type(vit).__name__} has no timm attention blocks: attention rollout needs a timm ViT")
    return modules


@contextlib.contextmanager
def _explicit_attention(vit: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `vit` appends each block's attention probabilities
    [B, heads, tokens, tokens] to the yielded list, in block order."""
    captured: list[torch.Tensor] = []
    modules = _attention_modules(vit)
    saved = [m.fused_attn for m in modules]
    hooks = [m.attn_drop.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
             for m in modules]
    try:
        for m in modules:
            m.fused_attn = False  # the fused kernel never materialises the probabilities
        yield captured
    finally:
        for m, fused in zip(modules, saved, strict=True):
            m.fused_attn = fused
        for hook in hooks:
            hook.remove()


def attention_maps(vit: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention probabilities [B, heads, tokens, tokens] for `pixel_values`, in eval mode.

    Usage:
        maps = attention_maps(model.image_encoder, processor(images=[photo])["pixel_values"])
    """
    was_training = vit.training
    vit.eval()
    try:
        with torch.no_grad(), _explicit_attention(vit) as captured:
            vit(pixel_values)
    finally:
        vit.train(was_training)
    return [a.float() for a in captured]


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout of per-block attention [B, heads, N, N]: heads averaged, the
    identity added for the residual path (0.5 A + 0.5 I), rows renormalised, blocks multiplied
    (last block on the left). Every row of the result sums to 1.

    Usage:
        joint = rollout(attention_maps(vit, pixels))          # [B, N, N]
    """
    if not maps:
        raise ValueError("attention rollout needs the attention of at least one block")
    joint = None
    for attention in maps:
        mean = attention.mean(dim=1)
        identity = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
        step = 0.5 * mean + 0.5 * identity
        step = step / step.sum(dim=-1, keepdim=True)
        joint = step if joint is None else step @ joint
    return joint


def attention_rollout(vit: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The rollout [B, tokens, tokens] of a timm ViT on `pixel_values` (`rollout` of `attention_maps`).

    Usage:
        joint = attention_rollout(vit, pixel_values)   # [B, tokens, tokens]
    """
    return rollout(attention_maps(vit, pixel_values))


def patch_grid(vit: nn.Module) -> tuple[int, int]:
    """(rows, columns) of image patches of a timm ViT.

    Usage:
        rows, columns = patch_grid(vit)   # (14, 14) for a ViT-B/16 at 224 px
    """
    grid = getattr(getattr(vit, "patch_embed", None), "grid_size", None)
    if grid is None:
        raise ValueError(f"{type(vit).__name__} has no patch_embed.grid_size: attention maps need a timm ViT")
    return int(grid[0]), int(grid[1])


PAPER_BLOCKS = (2, 6)  # the paper's Fig. 5: "the forward outputs of the second to sixth attention blocks"


def select_blocks(maps: list[torch.Tensor], blocks: tuple[int, int] | None) -> list[torch.Tensor]:
    """The maps of blocks `first`..`last` (counted from 1, both included); None: every block.

    Usage:
        rollout(select_blocks(attention_maps(vit, pixel_values), PAPER_BLOCKS))
    """
    if blocks is None:
        return maps
    first, last = blocks
    if not 1 <= first <= last <= len(maps):
        raise ValueError(f"blocks {first}-{last}: this image tower has blocks 1-{len(maps)}")
    return maps[first - 1:last]


def class_token_maps(vit: nn.Module, pixel_values: torch.Tensor,
                     blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """How much the class token draws on each patch after rollout over `blocks` (first, last,
    counted from 1; None: all; `PAPER_BLOCKS` is the paper's choice): [B, grid_h, grid_w], each map
    summing to 1 (the prefix tokens' share left out, the rest renormalised).

    Usage:
        heat = class_token_maps(model.image_encoder, pixels, PAPER_BLOCKS)[0]   # [14, 14] for ViT-B/16
    """
    rows, columns = patch_grid(vit)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    joint = rollout(select_blocks(attention_maps(vit, pixel_values), blocks))
    if joint.shape[-1] != prefix + rows * columns:
        raise ValueError(f"{joint.shape[-1]} tokens, expected {prefix} prefix + {rows} x {columns} patches: "
                         "the image size does not match the model's")
    patches = joint[:, 0, prefix:]
    return (patches / patches.sum(dim=-1, keepdim=True)).reshape(-1, rows, columns)


def attention_towers(model_dir: str | os.PathLike, unaligned: str | os.PathLike | None = None,
                     ) -> tuple[dict[str, nn.Module], str | None]:
    """Image towers by panel title: the unaligned tower (first) and the image tower of the model in
    `model_dir`. The unaligned one is the image tower of the model folder `unaligned` (e.g. one
    saved before contrastive training), else the pretrained timm weights the model's config starts
    from. When those cannot be loaded (no network, not in the cache) only the model's tower is
    returned, and the second value says why and what to pass instead.

    Usage:
        towers, note = attention_towers("runs/bioscan1m/best")    # {"unaligned: timm ...": vit, "aligned: best": vit}
    """
    from .modeling_clibd import CLIBDModel

    model = CLIBDModel.from_pretrained(model_dir)
    aligned = {f"aligned: {Path(model_dir).name}": model._tower("image")}
    if unaligned is not None:
        if not (Path(unaligned) / "config.json").is_file():
            raise FileNotFoundError(f"unaligned model {unaligned}: not a saved clibd model folder (no config.json)")
        return {f"unaligned: {Path(unaligned).name}": CLIBDModel.from_pretrained(unaligned)._tower("image"),
                **aligned}, None
    image_config = model.config.image_config
    try:
        pretrained = timm.create_model(image_config.timm_model_name, pretrained=True, **image_config.timm_kwargs)
    except Exception as error:  # offline, not in the cache, no weights for this architecture
        note = (f"no unaligned image tower: the pretrained timm weights {image_config.timm_model_name!r} could "
                f"not be loaded ({type(error).__name__}: {error}); pass --unaligned MODEL_FOLDER (a clibd model "
                "saved before contrastive training) to compare, or put the weights in the Hugging Face cache")
        return aligned, note
    return {f"unaligned: timm {image_config.timm_model_name}": pretrained, **aligned}, None
