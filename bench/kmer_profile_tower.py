"""Experiment for the novel-species goal: a DNA tower over k-mer count profiles, trained with a
hierarchical supervised contrastive loss (species, genus and family labels of the seen species).

    python bench/kmer_profile_tower.py --k 6 --epochs 30
    python bench/kmer_profile_tower.py --k 5 --epochs 20

Same split and scoring as bench/novel_species.py (the demo config's paper split; references = seen
keys + validation-unseen keys; novel queries = test-unseen species, in no reference and never
trained on). The tower: L2-normalised overlapping k-mer counts -> Linear(4^k, 1024) -> GELU ->
Linear(1024, 256) -> L2 norm. The loss, per batch of 512 seen-species records: supervised
contrastive (temperature 0.1; every other record with the same label is a positive) at the species
(weight 1), genus (0.5) and family (0.25) levels. Not yet a clibd tower: this script measures the
idea before it is built into CLIBDModel.
"""

from __future__ import annotations

import argparse
import time

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from novel_species import auroc, placement

from clibd.processing import kmer_profiles
from clibd.training import ExperimentConfig, load_splits

LEVELS = (("species", 1.0), ("genus", 0.5), ("family", 0.25))


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean over anchors with a positive of -mean log p(positive | anchor) among the other records."""
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    anchors = positive.any(dim=1)
    summed = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
    return -(summed[anchors] / positive.sum(dim=1)[anchors]).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--stage", choices=("val", "test"), default="test",
                        help="val: tune on validation-unseen species (references: seen + test-unseen keys)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    splits = load_splits(ExperimentConfig.from_yaml(args.config).data)
    train = splits["train_seen"]
    other = "test" if args.stage == "val" else "val"
    keys = datasets.concatenate_datasets([splits["seen_keys"], splits[f"{other}_unseen_keys"]])
    novel, seen = splits[f"{args.stage}_unseen"], splits[f"{args.stage}_seen"]
    key_records, novel_records = list(keys), list(novel)
    key_taxa = {rank: set(keys[rank]) for rank in ("order", "family", "genus", "species")}

    def profiles(dataset):
        return kmer_profiles(dataset["dna"], args.k)

    x_train, x_keys, x_novel, x_seen = profiles(train), profiles(keys), profiles(novel), profiles(seen)
    labels = {rank: torch.from_numpy(np.unique(train[rank], return_inverse=True)[1]) for rank, _ in LEVELS}
    tower = torch.nn.Sequential(torch.nn.Linear(4**args.k, args.hidden), torch.nn.GELU(),
                                torch.nn.Linear(args.hidden, 256))
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-3, weight_decay=0.01)

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(tower(x), dim=-1)

    print(f"k={args.k}: {len(train)} training records, {len(keys)} references, {len(novel)} novel queries")
    print("| epoch | order | family | genus | AUROC seen vs novel | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        tower.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order) - 511, 512):
            batch = order[i : i + 512]
            z = F.normalize(tower(x_train[batch]), dim=-1)
            loss = sum(weight * supervised_contrastive(z, labels[rank][batch]) for rank, weight in LEVELS)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % args.report_every == 0 or epoch == args.epochs:
            tower.eval()
            references = embed(x_keys)
            novel_sims = embed(x_novel) @ references.T
            best = novel_sims.argmax(dim=1).tolist()
            placed = placement(novel_records, [key_records[j] for j in best], key_taxa)
            area = auroc((embed(x_seen) @ references.T).max(dim=1).values.tolist(),
                         novel_sims.max(dim=1).values.tolist())
            print(f"| {epoch} | {100 * placed['order']:.1f} | {100 * placed['family']:.1f} | "
                  f"{100 * placed['genus']:.1f} | {area:.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
