"""Gradient caching: the loss of a large batch with the memory of a small chunk, for any objective.

1. embed the batch chunk by chunk without autograd (remembering each chunk's RNG state);
2. compute the objective on all embeddings and its gradient with respect to them;
3. re-embed each chunk with autograd (same RNG state, so the same dropout) and backpropagate
   that chunk's slice of the embedding gradient.
The parameter gradients equal those of one backward pass through the whole batch.

Usage:
    loss = grad_cache_step(model, batch, objective, chunk_size=128, backward=accelerator.backward,
                           no_sync=accelerator.no_sync)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..objectives import Objective, output_embeds, split_labels


def _chunk(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {key: value[start:stop] for key, value in batch.items()}


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _embed_without_grad(model: nn.Module, inputs: dict[str, torch.Tensor], bounds: list[tuple[int, int]],
                        device: torch.device) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    """Every chunk's embeddings, concatenated per modality, and the RNG state before each chunk."""
    states, pieces = [], {}
    with torch.no_grad():
        for start, stop in bounds:
            states.append(_rng_state(device))
            for modality, value in output_embeds(model(**_chunk(inputs, start, stop))).items():
                pieces.setdefault(modality, []).append(value)
    return {m: torch.cat(p).detach().requires_grad_() for m, p in pieces.items()}, states


def grad_cache_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    objective: Objective,
    chunk_size: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Accumulate the gradients of `objective` over `batch` (labels included) into `model`; return the loss."""
    inputs, labels = split_labels(batch)
    logit_scale_param = getattr(model, "module", model).logit_scale
    device = logit_scale_param.device
    size = next(iter(inputs.values())).shape[0]
    bounds = [(i, min(i + chunk_size, size)) for i in range(0, size, chunk_size)]
    embeds, states = _embed_without_grad(model, inputs, bounds, device)
    # The temperature's gradient is taken here on a detached copy and added in the last chunk's
    # backward, so that every parameter gradient flows through the model's own forward (DDP-safe).
    logit_scale = logit_scale_param.detach().clone().requires_grad_(logit_scale_param.requires_grad)
    loss = objective(embeds, labels, logit_scale)
    loss.backward()
    used = [m for m in embeds if embeds[m].grad is not None]  # an objective may leave a modality out
    after = _rng_state(device)
    for index, (start, stop) in enumerate(bounds):
        last = index == len(bounds) - 1
        _set_rng_state(states[index], device)
        context = no_sync(model) if (no_sync is not None and not last) else contextlib.nullcontext()
        with context:
            chunk_embeds = output_embeds(model(**_chunk(inputs, start, stop)))
            surrogate = sum((chunk_embeds[m] * embeds[m].grad[start:stop]).sum() for m in used)
            if last and logit_scale.grad is not None:
                surrogate = surrogate + logit_scale_param * logit_scale.grad
            backward(surrogate)
    _set_rng_state(after, device)
    return loss.detach()
