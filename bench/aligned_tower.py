"""Experiment for the novel-species goal: DNA towers over *aligned* barcodes instead of k-mer counts.

    python bench/aligned_tower.py --stage val                  # choose on validation-unseen species
    python bench/aligned_tower.py --stage val --split-seed 1
    python bench/aligned_tower.py --stage test                 # report on the novel test species

Each barcode is placed on the 658 positions of the COI-5P region by `clibd.processing.aligned_onehot`
(pieces of it slid along the base-frequency profile of the training barcodes; no pairwise
alignment): a [658, 4] one-hot matrix, zeros where it has no base. On it, with the same species split, references, queries and scoring as
bench/kmer_profile_tower.py (`--stage`), this script trains and scores:

- `aligned MLP`: flattened one-hot -> Linear(2632, 1024) -> GELU -> Linear(1024, 256), the
  hierarchical supervised contrastive loss of configs/bold_dna.yaml (species / genus / family
  positives, weights 1 / 0.5 / 0.25, temperature 0.1), 20 epochs;
- `positional`: a model with few parameters that cannot memorise genera: a learned weight per
  position and a learned 4 x 4 base map per codon position, cosine of the weighted, mapped
  one-hot; same loss, 10 epochs;
- the 7-mer tower of configs/bold_dna.yaml (`--kmer-tower`) with its 1024-d sketch, for reference;
- raw cosines (aligned one-hot, 7-mer counts) and sums of the learned cosines;
- with `--codon12`, positional models that see 1st and 2nd codon positions only;
- with `--order-weight W`, every loss also takes records of one order as positives (weight W).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from kmer_profile_tower import supervised_contrastive
from novel_species import auroc, genus_by_trained_congeners, placement, stage_datasets

from clibd.modeling_clibd import CLIBDPositionalBranch
from clibd.processing import COI_BARCODE_LENGTH, aligned_onehot, coi_base_profile, kmer_profiles
from clibd.training import ExperimentConfig, load_splits

LEVELS = (("species", 1.0), ("genus", 0.5), ("family", 0.25))
WIDTH = COI_BARCODE_LENGTH


def crop(onehot: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Half of the barcodes cut to one random window of 250-658 positions (a partial barcode)."""
    count = len(onehot)
    length = torch.randint(250, WIDTH + 1, (count,), generator=generator)
    start = (torch.rand(count, generator=generator) * (WIDTH - length + 1)).long()
    position = torch.arange(WIDTH)[None]
    keep = (position >= start[:, None]) & (position < (start + length)[:, None])
    keep |= torch.rand(count, 1, generator=generator) < 0.5
    return onehot * keep[:, :, None]


def train(model: torch.nn.Module, x: torch.Tensor, labels: dict, epochs: int, lr: float, weight_decay: float,
          augment=None, levels: tuple[tuple[str, float], ...] = LEVELS) -> None:
    """AdamW, batches of 512, the hierarchical supcon loss on each of the model's outputs (one
    tensor, or a tuple of branches each with its own loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(order) - 511, 512):
            batch = order[i : i + 512]
            out = model(augment(x[batch]) if augment else x[batch])
            loss = sum(weight * supervised_contrastive(F.normalize(z, dim=-1), labels[rank][batch])
                       for z in (out if isinstance(out, tuple) else (out,)) for rank, weight in levels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bold_dna.yaml")
    parser.add_argument("--split-seed", type=int, help="another species split than the config's")
    parser.add_argument("--stage", choices=("val", "test"), default="test",
                        help="val: tune on validation-unseen species (references: seen + test-unseen keys)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kmer-tower", action="store_true", help="skip the 7-mer tower (4 CPU minutes)")
    parser.add_argument("--order-weight", type=float, default=0.0,
                        help="also make records of one order positives, with this weight, in every loss")
    parser.add_argument("--codon12", action="store_true",
                        help="also: positional models on 1st and 2nd codon positions only (species- or "
                             "family-weighted loss), alone and added to the four-part sum")
    parser.add_argument("--variants", action="store_true",
                        help="also: the aligned MLP trained on cropped barcodes; both aligned towers trained "
                             "with one loss on their concatenated embedding")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    levels = LEVELS + ((("order", args.order_weight),) if args.order_weight else ())

    data_config = ExperimentConfig.from_yaml(args.config).data
    if args.split_seed is not None:
        data_config.split_seed = args.split_seed
    training, keys, novel, seen = stage_datasets(load_splits(data_config), args.stage)
    key_records, novel_records = list(keys), list(novel)
    key_taxa = {rank: set(keys[rank]) for rank in ("order", "family", "genus", "species")}
    trained = list(training.select_columns(["genus", "species"]))
    labels = {rank: torch.from_numpy(np.unique(training[rank], return_inverse=True)[1])
              for rank in ("order", "family", "genus", "species")}
    print(f"split seed {data_config.split_seed}, stage {args.stage}: {len(training)} training records, "
          f"{len(keys)} references, {len(novel)} novel queries", flush=True)

    start = time.perf_counter()
    profile = coi_base_profile(list(training["dna"]))
    x_train, x_keys, x_novel, x_seen = (aligned_onehot(list(d["dna"]), profile) for d in (training, keys, novel, seen))
    print(f"aligned in {time.perf_counter() - start:.0f} s; novel queries cover "
          f"{100 * x_novel.sum(dim=(1, 2)).mean() / WIDTH:.1f} % of the {WIDTH} positions; aligned to the "
          f"built-in consensus instead (what clibd's processor does), "
          f"{100 * (aligned_onehot(list(training['dna'])) == x_train).all(dim=(1, 2)).float().mean():.1f} % of the "
          f"training barcodes land identically", flush=True)

    cosines: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (novel x keys, seen x keys)

    def add(name: str, embed) -> None:
        with torch.no_grad():
            k, n, s = (F.normalize(embed(x), dim=-1) for x in (x_keys, x_novel, x_seen))
        cosines[name] = (n @ k.T, s @ k.T)

    add("raw aligned one-hot", lambda x: x.flatten(1))
    start = time.perf_counter()
    mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH * 4, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    train(mlp, F.normalize(x_train.flatten(1), dim=-1), labels, epochs=20, lr=1e-3, weight_decay=0.01, levels=levels)
    add("aligned MLP", lambda x: mlp(F.normalize(x.flatten(1), dim=-1)))
    positional = CLIBDPositionalBranch()
    train(positional, x_train, labels, epochs=10, lr=1e-2, weight_decay=0.0, levels=levels)
    add("positional", positional)
    weights, codon = positional.log_weight.detach().exp(), positional.codon_positions()
    print(f"aligned towers trained in {time.perf_counter() - start:.0f} s; positional weight by codon position "
          f"(1st / 2nd / 3rd): " + " / ".join(f"{weights[codon == c].mean():.2f}" for c in (0, 1, 2)))
    novel_best, seen_best = (sims.max(dim=1).values for sims in cosines["positional"])
    low = seen_best < novel_best.quantile(0.95)  # seen queries that look novel
    coverage = x_seen.sum(dim=(1, 2))
    print(f"positional: {int(low.sum())} seen queries score below the novel queries' 95th percentile; they cover a "
          f"median {coverage[low].median():.0f} of the {WIDTH} positions (all seen queries: {coverage.median():.0f})")

    if args.variants:
        generator = torch.Generator().manual_seed(args.seed)
        cropped = torch.nn.Sequential(torch.nn.Linear(WIDTH * 4, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
        train(cropped, x_train, labels, epochs=20, lr=1e-3, weight_decay=0.01,
              augment=lambda x: F.normalize(crop(x, generator).flatten(1), dim=-1))
        add("aligned MLP on cropped barcodes", lambda x: cropped(F.normalize(x.flatten(1), dim=-1)))

        class Joint(torch.nn.Module):  # both aligned towers, one loss on the concatenation
            def __init__(self) -> None:
                super().__init__()
                self.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH * 4, 1024), torch.nn.GELU(),
                                               torch.nn.Linear(1024, 256))
                self.positional = CLIBDPositionalBranch()

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.cat([F.normalize(self.mlp(F.normalize(x.flatten(1), dim=-1)), dim=-1),
                                  self.positional(x)], dim=-1)

        joint = Joint()
        train(joint, x_train, labels, epochs=20, lr=1e-3, weight_decay=0.01)
        add("aligned MLP and positional, one loss on both", joint)

    if args.codon12:
        first_two = (CLIBDPositionalBranch.codon_positions() < 2).float()[None, :, None]
        for name, levels in (("codon-1/2 positional", LEVELS),
                             ("codon-1/2 positional, deep loss", (("genus", 0.5), ("family", 1.0), ("order", 0.5)))):
            branch = CLIBDPositionalBranch()
            train(branch, x_train * first_two, labels, epochs=10, lr=1e-2, weight_decay=0.0, levels=levels)
            add(name, lambda x, branch=branch: branch(x * first_two))
        add("raw codon-1/2 one-hot", lambda x: (x * first_two).flatten(1))

    if not args.no_kmer_tower:
        start = time.perf_counter()
        p_train, p_keys, p_novel, p_seen = (kmer_profiles(d["dna"], 7) for d in (training, keys, novel, seen))
        kmer_tower = torch.nn.Sequential(torch.nn.Linear(4**7, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
        train(kmer_tower, p_train, labels, epochs=20, lr=1e-3, weight_decay=0.01, levels=levels)
        with torch.no_grad():
            k, n, s = (F.normalize(kmer_tower(x), dim=-1) for x in (p_keys, p_novel, p_seen))
        cosines["7-mer tower"] = (n @ k.T, s @ k.T)
        projection = torch.randn(4**7, 1024, generator=torch.Generator().manual_seed(0))
        k, n, s = (F.normalize(x @ projection, dim=-1) for x in (p_keys, p_novel, p_seen))
        cosines["7-mer sketch"] = (n @ k.T, s @ k.T)
        cosines["raw 7-mer counts"] = (p_novel @ p_keys.T, p_seen @ p_keys.T)
        print(f"7-mer tower trained in {time.perf_counter() - start:.0f} s")

    rows = [[name] for name in cosines] + [["aligned MLP", "positional"]]
    if not args.no_kmer_tower:
        rows += [["7-mer tower", "7-mer sketch"], ["aligned MLP", "positional", "7-mer tower"],
                 ["aligned MLP", "positional", "7-mer tower", "7-mer sketch"]]
        if args.codon12:
            rows += [["aligned MLP", "positional", "7-mer tower", "7-mer sketch", name]
                     for name in ("codon-1/2 positional", "codon-1/2 positional, deep loss")]
    print("| cosine (sum of) | order | family | genus | genus by trained congeners 0 / 1 / 2+ | AUROC seen vs novel |")
    print("|---|---:|---:|---:|---|---:|")
    for names in rows:
        novel_sims = sum(cosines[name][0] for name in names)
        seen_sims = sum(cosines[name][1] for name in names)
        predicted = [key_records[j] for j in novel_sims.argmax(dim=1).tolist()]
        placed = placement(novel_records, predicted, key_taxa)
        groups = genus_by_trained_congeners(novel_records, predicted, key_taxa, trained)
        area = auroc(seen_sims.max(dim=1).values.tolist(), novel_sims.max(dim=1).values.tolist())
        print(f"| {' + '.join(names)} | {100 * placed['order']:.1f} | {100 * placed['family']:.1f} | "
              f"{100 * placed['genus']:.1f} | " + " / ".join(f"{100 * groups[g][0]:.1f}" for g in ("0", "1", "2+"))
              + f" | {area:.3f} |", flush=True)


if __name__ == "__main__":
    main()
