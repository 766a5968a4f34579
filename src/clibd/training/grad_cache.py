"""Gradient caching: the contrastive loss of a large batch with the memory of a small chunk.

1. embed the batch chunk by chunk without autograd (remembering each chunk's RNG state);
2. compute the loss on all embeddings and its gradient with respect to them;
3. re-embed each chunk with autograd (same RNG state, so the same dropout) and backpropagate
   that chunk's slice of the embedding gradient.
The parameter gradients equal those of one backward pass through the whole batch.

Usage:
    loss = grad_cache_step(model, batch, chunk_size=128, backward=accelerator.backward, no_sync=accelerator.no_sync)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..loss import contrastive_loss

EMBED_KEYS = {"image": "image_embeds", "dna": "dna_embeds", "text": "text_embeds"}


def _chunk(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {key: value[start:stop] for key, value in batch.items()}


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def grad_cache_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_size: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Accumulate the gradients of the contrastive loss over `batch` into `model`; return the loss."""
    logit_scale_param = getattr(model, "module", model).logit_scale
    device = logit_scale_param.device
    size = next(iter(batch.values())).shape[0]
    bounds = [(i, min(i + chunk_size, size)) for i in range(0, size, chunk_size)]
    states, parts = [], {}
    with torch.no_grad():
        for start, stop in bounds:
            states.append(_rng_state(device))
            out = model(**_chunk(batch, start, stop))
            for modality, key in EMBED_KEYS.items():
                if out[key] is not None:
                    parts.setdefault(modality, []).append(out[key])
    embeds = {m: torch.cat(p).detach().float().requires_grad_() for m, p in parts.items()}
    # The temperature's gradient is taken here on a detached copy and added in the last chunk's
    # backward, so that every parameter gradient flows through the model's own forward (DDP-safe).
    logit_scale = logit_scale_param.detach().clone().requires_grad_()
    loss = contrastive_loss(embeds, logit_scale)
    loss.backward()
    after = _rng_state(device)
    for index, (start, stop) in enumerate(bounds):
        last = index == len(bounds) - 1
        _set_rng_state(states[index], device)
        context = no_sync(model) if (no_sync is not None and not last) else contextlib.nullcontext()
        with context:
            out = model(**_chunk(batch, start, stop))
            surrogate = sum((out[EMBED_KEYS[m]].float() * embeds[m].grad[start:stop]).sum() for m in embeds)
            if last:
                surrogate = surrogate + logit_scale_param * logit_scale.grad
            backward(surrogate)
    _set_rng_state(after, device)
    return loss.detach()
