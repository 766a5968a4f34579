"""Experiments for the novel-species goal: a DNA tower over k-mer count profiles, trained with a
hierarchical supervised contrastive loss (species, genus and family labels of the seen species).

    python bench/kmer_profile_tower.py --stage val --k 7 --epochs 20 --sketch 1024
    python bench/kmer_profile_tower.py --stage val --k 7 --mutate 0.05 --weights species=1,genus=1,family=0.5

Same split and scoring as bench/novel_species.py (the demo config's paper split). `--stage test`:
references = seen keys + validation-unseen keys, novel queries = test-unseen species; `--stage
val` (for choosing settings): references = seen keys + test-unseen keys, queries = the
validation-unseen species. The tower: L2-normalised overlapping k-mer counts -> Linear(4^k,
hidden) -> GELU -> Linear(hidden, 256) -> L2 norm, trained on batches of 512 seen-species
records. Besides 1-NN placement it scores, on the same embeddings, the nearest label centroid and
the learned cosine mixed with the raw profile cosine or with that of a random projection of the
profile (the sketch of `dna_config.profile_sketch_dim`). The shipped tower is clibd's
`dna_config.encoder: kmer_profile` (configs/bold_dna.yaml); this script is the quick test bed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from novel_species import auroc, placement, stage_datasets

from clibd.processing import kmer_profiles
from clibd.training import ExperimentConfig, load_splits


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                           excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over anchors with a positive of -mean log p(positive | anchor) among the other records;
    pairs in `excluded` are never positives (they stay in the denominator)."""
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    if excluded is not None:
        positive &= ~excluded
    anchors = positive.any(dim=1)
    summed = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
    return -(summed[anchors] / positive.sum(dim=1)[anchors]).mean()


def centroid_placement(queries: torch.Tensor, keys: torch.Tensor, key_records: list[dict],
                       query_records: list[dict], key_taxa: dict) -> dict[str, float]:
    """Per rank, the label whose mean reference embedding (normalised) is nearest the query."""
    predicted = [{} for _ in query_records]
    for rank in ("order", "family", "genus", "species"):
        names, index = np.unique([r[rank] for r in key_records], return_inverse=True)
        centroids = torch.zeros(len(names), keys.shape[1]).index_add_(0, torch.from_numpy(index), keys)
        best = (queries @ F.normalize(centroids, dim=-1).T).argmax(dim=1).tolist()
        for answer, j in zip(predicted, best, strict=True):
            answer[rank] = names[j]
    return placement(query_records, predicted, key_taxa)


def mutate(sequences: list[str], max_rate: float, generator: np.random.Generator) -> list[str]:
    """Each sequence with a fraction of its bases (uniform in [0, max_rate]) replaced by random bases:
    a stand-in for the divergence between a species and its congeners."""
    out = []
    for sequence in sequences:
        bases = np.frombuffer(sequence.upper().encode(), dtype=np.uint8).copy()
        hits = generator.random(len(bases)) < generator.uniform(0, max_rate)
        bases[hits] = np.frombuffer(b"ACGT", dtype=np.uint8)[generator.integers(0, 4, hits.sum())]
        out.append(bases.tobytes().decode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--k", type=int, nargs="+", default=[6], help="several: concatenated profiles")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--weights", default="species=1,genus=0.5,family=0.25",
                        help="supervised contrastive levels and weights, e.g. species=1,genus=1,family=0.5,order=0.25")
    parser.add_argument("--other-species", action="store_true",
                        help="above species, only records of another species are positives (leave-species-out)")
    parser.add_argument("--csls", type=float, nargs="*", default=[],
                        help="also score subtracting these multiples of each reference's mean similarity to its "
                             "10 nearest references (hubness correction, as CSLS)")
    parser.add_argument("--genus-grouped", action="store_true",
                        help="half of each batch drawn genus by genus (many congeneric positives)")
    parser.add_argument("--mutate", type=float, default=0.0,
                        help="each epoch, substitute up to this fraction of each training barcode's bases")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--mix", type=float, nargs="+", default=[0.5, 1.0],
                        help="weights of the raw-profile or sketch cosine added to the learned cosine")
    parser.add_argument("--sketch", type=int, nargs="*", default=[],
                        help="also score mixing in the cosine of a random projection of the profile to these sizes")
    parser.add_argument("--stage", choices=("val", "test"), default="test",
                        help="val: tune on validation-unseen species (references: seen + test-unseen keys)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = np.random.default_rng(args.seed)
    levels = [(rank, float(weight)) for rank, weight in (item.split("=") for item in args.weights.split(","))]

    train, keys, novel, seen = stage_datasets(load_splits(ExperimentConfig.from_yaml(args.config).data), args.stage)
    key_records, novel_records = list(keys), list(novel)
    key_taxa = {rank: set(keys[rank]) for rank in ("order", "family", "genus", "species")}

    def profiles(sequences) -> torch.Tensor:
        return torch.cat([kmer_profiles(sequences, k) for k in args.k], dim=1) / len(args.k) ** 0.5

    train_dna = list(train["dna"])
    x_train, x_keys, x_novel, x_seen = (profiles(d["dna"]) for d in (train, keys, novel, seen))
    labels = {rank: torch.from_numpy(np.unique(train[rank], return_inverse=True)[1])
              for rank in {"species", *(rank for rank, _ in levels)}}
    tower = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], args.hidden), torch.nn.GELU(),
                                torch.nn.Linear(args.hidden, 256))
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-3, weight_decay=0.01)

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(tower(x), dim=-1)

    def sketch(dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fixed random projection of the reference, novel and seen profiles (unit vectors)."""
        projection = torch.randn(x_keys.shape[1], dim, generator=torch.Generator().manual_seed(0))
        return tuple(F.normalize(x @ projection, dim=-1) for x in (x_keys, x_novel, x_seen))

    # cosines that do not depend on training: computed once
    untrained = {"raw profile": (x_novel @ x_keys.T, x_seen @ x_keys.T, x_keys @ x_keys.T)}
    for dim in args.sketch:
        keys_, novel_, seen_ = sketch(dim)
        untrained[f"{dim}-d sketch"] = (novel_ @ keys_.T, seen_ @ keys_.T, keys_ @ keys_.T)

    print(f"k={args.k}, {args}: {len(train)} training records, {len(keys)} references, {len(novel)} novel queries")
    print("| epoch | order | family | genus | AUROC seen vs novel | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        tower.train()
        if args.mutate > 0:
            x_train = profiles(mutate(train_dna, args.mutate, generator))
        order = torch.randperm(len(x_train))
        if args.genus_grouped:  # half of each batch: consecutive records of a few whole genera
            genus_rank = torch.randperm(int(labels["genus"].max()) + 1)[labels["genus"]]
            grouped = torch.argsort(genus_rank * len(order) + torch.randperm(len(order)))
        for i in range(0, len(order) - 511, 512):
            batch = order[i : i + 512]
            if args.genus_grouped:
                batch = torch.unique(torch.cat([grouped[i : i + 256], order[i : i + 256]]))
            z = F.normalize(tower(x_train[batch]), dim=-1)
            species = labels["species"][batch]
            same_species = species[:, None] == species[None, :] if args.other_species else None
            loss = sum(
                weight * supervised_contrastive(z, labels[rank][batch], args.temperature,
                                                None if rank == "species" else same_species)
                for rank, weight in levels
            )
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
            if args.csls:  # hubness correction: subtract each reference's mean similarity to its 10 nearest
                base_novel, base_keys = novel_sims, references @ references.T
                if args.sketch:
                    sketch_novel, _, sketch_keys = untrained[f"{args.sketch[0]}-d sketch"]
                    base_novel, base_keys = base_novel + sketch_novel, base_keys + sketch_keys
                density = base_keys.fill_diagonal_(float("-inf")).topk(10, dim=1).values.mean(dim=1)
                for alpha in args.csls:
                    best = (base_novel - alpha * density).argmax(dim=1).tolist()
                    adjusted = placement(novel_records, [key_records[j] for j in best], key_taxa)
                    print(f"| {epoch} ({'sketch x1, ' if args.sketch else ''}- {alpha} x reference density) | {100 * adjusted['order']:.1f} | "
                          f"{100 * adjusted['family']:.1f} | {100 * adjusted['genus']:.1f} | | |", flush=True)
            by_centroid = centroid_placement(embed(x_novel), references, key_records, novel_records, key_taxa)
            seen_sims = embed(x_seen) @ references.T
            for name, (raw, raw_seen, _) in untrained.items():
                for mix in args.mix:
                    mixed_sims = novel_sims + mix * raw
                    best = mixed_sims.argmax(dim=1).tolist()
                    mixed = placement(novel_records, [key_records[j] for j in best], key_taxa)
                    area = auroc((seen_sims + mix * raw_seen).max(dim=1).values.tolist(),
                                 mixed_sims.max(dim=1).values.tolist())
                    print(f"| {epoch} (+{mix} x {name} cosine) | {100 * mixed['order']:.1f} | "
                          f"{100 * mixed['family']:.1f} | {100 * mixed['genus']:.1f} | {area:.3f} | |", flush=True)
            print(f"| {epoch} (centroids) | {100 * by_centroid['order']:.1f} | {100 * by_centroid['family']:.1f} | "
                  f"{100 * by_centroid['genus']:.1f} | | |", flush=True)


if __name__ == "__main__":
    main()
