"""Figures of the paper: UMAP of embeddings coloured by order (Fig. 9), per-species accuracy
binned by the number of keys of the species (Fig. 4), and attention rollout maps over a photo
(Fig. 5 and 10). PNG via matplotlib (`pip install clibd[plots]`).

Usage:
    plot_umap(embeddings, orders, "umap.png")
    plot_accuracy_by_key_count(true_species, predicted_species, key_counts, "by_keys.png")
    plot_attention(pixels[0], {"unaligned": map_a, "aligned": map_b}, "attention.png")
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def umap_2d(embeddings: torch.Tensor, seed: int = 0) -> np.ndarray:
    """2-D UMAP with the paper's settings: cosine metric, min_dist 0.5, random init, random_state 0."""
    try:
        import umap
    except ImportError as error:
        raise ImportError("UMAP plots need umap-learn: pip install 'clibd[plots]'") from error
    reducer = umap.UMAP(n_components=2, metric="cosine", min_dist=0.5, init="random", random_state=seed)
    return reducer.fit_transform(embeddings.float().numpy())


def plot_umap(embeddings: torch.Tensor, labels: list[str], out: str | os.PathLike, title: str = "") -> np.ndarray:
    """Scatter the 2-D UMAP of `embeddings` coloured by `labels` (e.g. order); returns the points."""
    points = umap_2d(embeddings)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for label, _ in Counter(labels).most_common():
        mask = np.array([lab == label for lab in labels])
        ax.scatter(points[mask, 0], points[mask, 1], s=4, label=label or "unknown")
    ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(title or f"UMAP of {len(labels)} embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return points


KEY_COUNT_BINS = ((1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 10**9))


def accuracy_by_key_count(true: list[str], predicted: list[str], key_counts: dict[str, int]) -> list[tuple]:
    """(bin label, species in bin, mean per-species accuracy) for species binned by key count;
    species with no key form the first bin."""
    per_species: dict[str, list[bool]] = defaultdict(list)
    for t, p in zip(true, predicted, strict=True):
        if t:
            per_species[t].append(t == p)
    bins = [("0", lambda n: n == 0)] + [
        (f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi < 10**9 else f">{lo - 1}"), lambda n, lo=lo, hi=hi: lo <= n <= hi)
        for lo, hi in KEY_COUNT_BINS]
    rows = []
    for name, test in bins:
        accuracies = [sum(v) / len(v) for s, v in per_species.items() if test(key_counts.get(s, 0))]
        rows.append((name, len(accuracies), sum(accuracies) / len(accuracies) if accuracies else float("nan")))
    return rows


def plot_accuracy_by_key_count(true: list[str], predicted: list[str], key_counts: dict[str, int],
                               out: str | os.PathLike, title: str = "") -> list[tuple]:
    """Bar chart of per-species top-1 accuracy binned by the species' number of keys."""
    rows = accuracy_by_key_count(true, predicted, key_counts)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r[0] for r in rows]
    ax.bar(names, [0 if r[2] != r[2] else 100 * r[2] for r in rows])
    for i, r in enumerate(rows):
        ax.annotate(f"n={r[1]}", (i, 1), ha="center", fontsize=8)
    ax.set_xlabel("keys of the species in the reference library")
    ax.set_ylabel("per-species top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "Species accuracy by number of keys")
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return rows


def plot_attention(image: torch.Tensor, maps: dict[str, torch.Tensor], out: str | os.PathLike,
                   title: str = "") -> None:
    """The photo, then one panel per map: the map (e.g. `clibd.attention.class_token_maps`, on the
    patch grid) upsampled to the photo and laid over it, each scaled to its own range.

    Usage:
        plot_attention(pixels[0], {"unaligned: timm": unaligned_map, "aligned: best": aligned_map}, "attn.png")
    """
    import torch.nn.functional as F

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a [3, H, W] tensor in [0, 1], got shape {tuple(image.shape)}")
    photo = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3.2 * (1 + len(maps)), 3.6), squeeze=False)
    axes[0, 0].imshow(photo)
    axes[0, 0].set_title(title or "photo", fontsize=9)
    for ax, (name, grid) in zip(axes[0, 1:], maps.items(), strict=True):
        heat = F.interpolate(grid[None, None].float().cpu(), size=photo.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0]
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
        ax.imshow(photo)
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
        ax.set_title(name, fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
