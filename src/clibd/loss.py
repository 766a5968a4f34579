"""The loss functions: the CLIBD loss (symmetric InfoNCE over every pair of present modalities)
and a supervised contrastive loss, both correct across processes. `clibd.objectives` builds the
training objective from them.

Usage:
    loss = contrastive_loss({"image": x, "dna": d, "text": t}, logit_scale)   # x, d, t L2-normalised
    loss = supervised_contrastive_loss(d, species_ids, temperature=0.1)

Under `torch.distributed` each process holds a shard of the global batch. Features are gathered
with gradients, each process scores its own rows against every gathered row (open_clip's "local
loss"), so the mean of the per-process losses equals the single-process loss on the whole batch
and, once DDP averages gradients, so do the gradients.

Both losses run in float32 with autocast off, whatever precision the towers ran in (as the
official training: towers under bf16 autocast, the loss on fp32 features outside it): the logits
of a bf16 matmul would lose the small differences between similarities that the softmax reads.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from .constants import MODALITIES


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off on `device` for the block (a device without autocast: nothing to turn off).

    Usage:
        with full_precision(features.device):
            logits = scale * features.float() @ others.float().T      # a float32 matmul
    """
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if not (available(device.type) if available else device.type in ("cpu", "cuda")):
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All rows of every process, in rank order; gradients flow back to each process's rows."""
    _, world_size = _distributed()
    if world_size == 1:
        return features
    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([features.shape[0]], device=features.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every process needs the same local batch size for the contrastive loss, "
                         f"got {[int(s) for s in sizes]}; drop or pad the last batch")
    return torch.cat(dist_fn.all_gather(features), dim=0)


def modality_pairs(modalities: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Every unordered pair of the given modalities, in the fixed order of `MODALITIES` (image, dna, text)."""
    ordered = [m for m in MODALITIES if m in modalities]
    return list(itertools.combinations(ordered, 2))


def contrastive_loss(embeds: Mapping[str, torch.Tensor], logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the cross-entropies a->b and b->a over every pair (a, b) of modalities in `embeds`.

    `logit_scale` is in log space (the model multiplies similarities by its exp, without clamp).
    Computed in float32 with autocast off (module docstring).

    Usage:
        loss = contrastive_loss({"dna": dna_embeds, "text": text_embeds}, model.logit_scale)
    """
    present = {name: value.float() for name, value in embeds.items() if value is not None}
    pairs = modality_pairs(list(present))
    if not pairs:
        raise ValueError(f"the contrastive loss needs at least two modalities, got {sorted(present)}")
    rank, _ = _distributed()
    with full_precision(next(iter(present.values())).device):
        scale = logit_scale.float().exp()
        gathered = {name: gather_with_grad(value) for name, value in present.items()}
        local_size = next(iter(present.values())).shape[0]
        labels = torch.arange(local_size, device=logit_scale.device) + rank * local_size
        terms = []
        for a, b in pairs:
            terms.append(F.cross_entropy(scale * present[a] @ gathered[b].T, labels))
            terms.append(F.cross_entropy(scale * present[b] @ gathered[a].T, labels))
        return torch.stack(terms).mean()


def supervised_contrastive_loss(embeds: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020): for each anchor, -mean log p of the other
    records with the same label among all other records of the global batch. Labels < 0 (unknown)
    are never positives; anchors without a positive are left out. Gathered across processes like
    `contrastive_loss`, so the mean over processes equals the single-process loss.

    Usage:
        loss = supervised_contrastive_loss(dna_embeds, species_ids, temperature=0.1)   # ids: LongTensor [B]
    """
    rank, _ = _distributed()
    embeds = embeds.float()
    with full_precision(embeds.device):
        all_embeds = gather_with_grad(embeds)
        all_labels = gather_with_grad(labels)
        local = embeds.shape[0]
        own = torch.arange(local, device=embeds.device) + rank * local
        logits = embeds @ all_embeds.T / temperature
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(local), own] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positive = (labels[:, None] == all_labels[None, :]) & (labels[:, None] >= 0) & ~is_self
        anchors = positive.any(dim=1)
        if not anchors.any():
            return (embeds * 0).sum()
        summed = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
        per_anchor = summed[anchors] / positive.sum(dim=1)[anchors]
        # Mean over this process's anchors, scaled so that averaging over processes weights every anchor alike.
        return -per_anchor.sum() / local
