"""Novel species: barcodes of species that are neither in training nor in the reference library.

    python bench/novel_species.py                      # configs/bold_dna.yaml, trained first if needed (6 min)
    python bench/novel_species.py --split-seed 1       # another species split (trained afresh)
    python bench/novel_species.py --config configs/demo.yaml --model runs/demo/best   # the demo model

The species split is the config's (the paper's, by species, seeded). References: the seen species'
keys plus the validation-unseen keys (species absent from training but present in the library).
Novel queries: the test-unseen species' records, whose species no reference holds. Seen queries:
the test-seen records (`--stage val`: the validation-unseen species against the seen and
test-unseen keys, for choosing settings without the test species). The script builds the index
with `clibd index build`'s code, identifies with `clibd identify`'s code, and prints for the novel
queries the per-rank placement accuracy (micro, over queries whose taxon at that rank exists
among the references), the AUROC of seen-versus-novel detection from `identify`'s
novelty_similarity, how `identify` answered (flagged novel, the deepest rank it gave), and, on
the identical split, 1-NN on raw overlapping k-mer count profiles (cosine, no learning) for
k = 5 and the best k in 3..8.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import torch

from clibd.identify import identify
from clibd.index import build_index
from clibd.processing import RANKS, kmer_profiles
from clibd.training import ExperimentConfig, load_splits, train


def nearest(queries: torch.Tensor, keys: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    top = (queries @ keys.T).max(dim=1)
    return top.indices.numpy(), top.values.numpy()


def stage_datasets(splits: dict, stage: str) -> tuple[datasets.Dataset, ...]:
    """(training, references, novel queries, seen queries) of a stage: `test` scores the
    test-unseen species against seen + validation-unseen keys; `val` (for choosing settings)
    scores the validation-unseen species against seen + test-unseen keys."""
    other = "test" if stage == "val" else "val"
    keys = datasets.concatenate_datasets([splits["seen_keys"], splits[f"{other}_unseen_keys"]])
    return splits["train_seen"], keys, splits[f"{stage}_unseen"], splits[f"{stage}_seen"]


def placement(true: list[dict], predicted: list[dict], key_taxa: dict[str, set]) -> dict[str, float]:
    """Per-rank accuracy over queries whose taxon at that rank exists among the references."""
    out = {}
    for rank in RANKS:
        pairs = [(t[rank], p[rank]) for t, p in zip(true, predicted, strict=True) if t[rank] in key_taxa[rank]]
        out[rank] = sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")
    return out


def genus_by_trained_congeners(true: list[dict], predicted: list[dict], key_taxa: dict[str, set],
                               trained: list[dict]) -> dict[str, tuple[float, int, int]]:
    """Genus placement split by how many species of the query's genus the model was trained on
    (0, 1, 2+): {group: (accuracy, queries, species)}, over queries whose genus has references."""
    trained_species: dict[str, set] = {}
    for r in trained:
        trained_species.setdefault(r["genus"], set()).add(r["species"])
    groups: dict[str, list] = {"0": [], "1": [], "2+": []}
    for t, p in zip(true, predicted, strict=True):
        if t["genus"] in key_taxa["genus"]:
            n = len(trained_species.get(t["genus"], ()))
            groups["2+" if n >= 2 else str(n)].append((t["species"], t["genus"] == p["genus"]))
    return {name: (sum(ok for _, ok in rows) / len(rows) if rows else float("nan"), len(rows),
                   len({species for species, _ in rows})) for name, rows in groups.items()}


def species_misses(true: list[dict], predicted: list[dict], other: list[dict], answered: list[dict],
                   keys: list[dict], rank: str) -> list[tuple]:
    """Novel species with a query placed at the wrong `rank`: (species, queries, wrong, wrong by
    `other`, wrong in `identify`'s answer (which may leave the rank empty), references of its
    taxon at that rank, the commonest wrong answer), most misses first."""
    references = Counter(key[rank] for key in keys)
    by_species: dict[str, list] = {}
    for t, p, o, a in zip(true, predicted, other, answered, strict=True):
        if t[rank] in references:
            row = by_species.setdefault(t["species"], [0, 0, 0, 0, references[t[rank]], Counter()])
            row[0] += 1
            row[1] += p[rank] != t[rank]
            row[2] += o[rank] != t[rank]
            row[3] += bool(a[rank]) and a[rank] != t[rank]
            if p[rank] != t[rank]:
                row[5][p[rank]] += 1
    return sorted(((name, *row[:5], row[5].most_common(1)[0][0]) for name, row in by_species.items() if row[1]),
                  key=lambda r: -r[2])


def vote_placement(sims: np.ndarray, keys: list[dict], novel: list[dict], key_taxa: dict, k: int,
                   temperature: float = 0.05) -> dict[str, float]:
    """Placement by a similarity-weighted vote (weights exp(sim / temperature)) among the top-k
    references at each rank, instead of the single nearest one (hierarchical consensus)."""
    top = np.argsort(-sims, axis=1)[:, :k]
    predicted = []
    for q in range(sims.shape[0]):
        answer = {}
        for rank in RANKS:
            votes: dict[str, float] = {}
            for j in top[q]:
                votes[keys[j][rank]] = votes.get(keys[j][rank], 0.0) + float(np.exp(sims[q, j] / temperature))
            answer[rank] = max(votes, key=votes.get)
        predicted.append(answer)
    return placement(novel, predicted, key_taxa)


def learned_similarities(model_dir: Path, queries: list[dict], key_embeddings: torch.Tensor) -> np.ndarray:
    """[Q, K] cosine of the model's DNA embeddings of `queries` with the index's keys (what identify searches)."""
    from clibd import CLIBDModel, CLIBDProcessor
    from clibd.data import records_to_dataset
    from clibd.evaluation.retrieval import embed_records

    model, processor = CLIBDModel.from_pretrained(model_dir).eval(), CLIBDProcessor.from_pretrained(model_dir)
    return (embed_records(model, processor, records_to_dataset(queries), "dna") @ key_embeddings.float().T).numpy()


def taxon_placement(sims: np.ndarray, keys: list[dict], novel: list[dict], key_taxa: dict, best: int) -> dict:
    """Placement at each rank by the taxon whose `best` highest similarities have the highest mean
    (average linkage to the taxon's nearest references instead of the single nearest one)."""
    out = {}
    for rank in RANKS[:3]:
        labels = sorted(key_taxa[rank])
        position = {label: i for i, label in enumerate(labels)}
        members = np.array([position[key[rank]] for key in keys])
        scores = np.full((sims.shape[0], len(labels)), -np.inf)
        for i in range(len(labels)):
            top = -np.sort(-sims[:, members == i], axis=1)[:, :best]
            scores[:, i] = np.concatenate([top, np.repeat(top[:, -1:], best - top.shape[1], axis=1)], axis=1).mean(1)
        predicted = [{rank: labels[j]} for j in scores.argmax(axis=1)]
        pairs = [(t[rank], p[rank]) for t, p in zip(novel, predicted, strict=True) if t[rank] in key_taxa[rank]]
        out[rank] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def codon12_similarities(queries: list[dict], keys: list[dict]) -> np.ndarray:
    """[Q, K] cosine of the aligned one-hot barcodes at 1st and 2nd codon positions only (the
    conserved ones: a raw, unlearned view of the amino-acid sequence)."""
    from clibd.modeling_clibd import CLIBDPositionalBranch
    from clibd.processing import aligned_onehot

    keep = (CLIBDPositionalBranch.codon_positions() < 2)[None, :, None]

    def embed(records: list[dict]) -> torch.Tensor:
        return torch.nn.functional.normalize((aligned_onehot([r["dna"] for r in records]) * keep).flatten(1), dim=-1)

    return (embed(queries) @ embed(keys).T).numpy()


def rank_variants(learned: np.ndarray, keys: list[dict], novel: list[dict], key_taxa: dict,
                  learned_hits: list[dict], order_threshold: float) -> None:
    """Print placement by other read-outs of the same similarities (ideas tried for order)."""
    codon12 = codon12_similarities(novel, keys)
    rows = {"clibd, nearest reference": placement(novel, learned_hits, key_taxa)}
    for best in (3, 5):
        rows[f"clibd, best {best} per taxon"] = taxon_placement(learned, keys, novel, key_taxa, best)
    rows["codon-1/2 cosine alone"] = placement(novel, [keys[j] for j in codon12.argmax(1)], key_taxa)
    for weight in (0.0625, 0.125, 0.25):
        mixed = learned + weight * codon12
        rows[f"clibd + {weight} x codon-1/2 cosine"] = placement(novel, [keys[j] for j in mixed.argmax(1)], key_taxa)
    far = learned.max(1) < order_threshold  # queries whose order identify would not give
    routed = np.where(far, codon12.argmax(1), learned.argmax(1))
    rows[f"codon-1/2 cosine where clibd's best < the order threshold ({far.sum()} queries)"] = placement(
        novel, [keys[j] for j in routed], key_taxa)
    print("| read-out | order | family | genus |\n|---|---:|---:|---:|")
    for name, cells in rows.items():
        print(f"| {name} | {100 * cells['order']:.1f} | {100 * cells['family']:.1f} | {100 * cells['genus']:.1f} |")
    nearest = codon12.argmax(1)
    missed = sorted({t["species"] for t, p in zip(novel, learned_hits, strict=True) if t["order"] != p["order"]})
    print("\nNovel species clibd places in a wrong order, and where the codon-1/2 cosine puts them:")
    for species in missed:
        answers = Counter((keys[j]["order"], keys[j]["family"]) for t, j in zip(novel, nearest, strict=True)
                          if t["species"] == species)
        truth = next(t for t in novel if t["species"] == species)
        family_references = sum(key["family"] == truth["family"] for key in keys)
        print(f"- {species} ({truth['order']}, {truth['family']}: {family_references} references): "
              + ", ".join(f"{o} {f} x{n}" for (o, f), n in answers.most_common(3)))
    print()


def print_examples(rows: dict[str, dict], seen: list[dict], novel: list[dict]) -> None:
    """identify's first answer of each kind: a known species named, novel ones stopped at genus,
    family and order."""
    kinds = {"known species": (seen, "species"), "novel, stops at genus": (novel, "genus"),
             "novel, stops at family": (novel, "family"), "novel, stops at order": (novel, "order")}
    print("\n| query_id | order | family | genus | species | similarity | novel | novelty_similarity | "
          "the specimen is |\n|---|---|---|---|---|---:|---|---:|---|")
    for kind, (queries, deepest) in kinds.items():
        deeper = RANKS[RANKS.index(deepest) + 1 :]
        truth = next((q for q in queries if rows[q["id"]][deepest] and not any(rows[q["id"]][r] for r in deeper)), None)
        if truth is None:
            continue
        row = rows[truth["id"]]
        print(f"| {truth['id']} | " + " | ".join(row[r] for r in RANKS) + f" | {row['similarity']} | {row['novel']} | "
              f"{row['novelty_similarity']} | *{truth['species']}* ({kind}) |")
    print()


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    pos, neg = np.asarray(positive), np.asarray(negative)
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bold_dna.yaml")
    parser.add_argument("--model", help="a trained model folder; default: the config's run, trained if missing")
    parser.add_argument("--kmax", type=int, default=8)
    parser.add_argument("--stage", choices=("test", "val"), default="test",
                        help="val: score the validation-unseen species instead (references: seen + test-unseen "
                             "keys), to choose read-outs without looking at the test species")
    parser.add_argument("--votes", action="store_true", help="also score top-k similarity-weighted votes")
    parser.add_argument("--variants", action="store_true",
                        help="also score placement by the best-m similarities per taxon and with codon-1/2 identity")
    parser.add_argument("--examples", action="store_true",
                        help="also print identify's answer for a known species and for novel ones it stops at "
                             "genus, family and order (the README's example)")
    parser.add_argument("--misses", action="store_true",
                        help="also list the novel species placed at the wrong order or genus")
    parser.add_argument("--split-seed", type=int,
                        help="another species split than the config's (trained into OUTPUT_DIR-splitN if missing)")
    args = parser.parse_args()

    config = ExperimentConfig.from_yaml(args.config)
    if args.split_seed is not None:
        config.data.split_seed = args.split_seed
        config.train.output_dir = f"{config.train.output_dir}-split{args.split_seed}"
    model_dir = Path(args.model) if args.model else Path(config.train.output_dir) / "best"
    if not model_dir.exists():
        print(f"{model_dir} not found: training {args.config} first", file=sys.stderr)
        train(config, resume=True)
        if not model_dir.exists():  # a run that never evaluated on validation keeps its last epoch only
            model_dir = model_dir.with_name("final")
    splits = load_splits(config.data)
    keys, novel, seen = (list(part) for part in stage_datasets(splits, args.stage)[1:])
    key_taxa = {rank: {r[rank] for r in keys} for rank in RANKS}

    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(model_dir, keys, "dna", Path(tmp) / "refs", progress=False)
        out = Path(tmp) / "preds.tsv"
        identify(Path(tmp) / "refs", novel + seen, out, top_k=5, progress=False)
        with open(out, newline="") as f:
            rows = {r["query_id"]: r for r in csv.DictReader((x for x in f if not x.startswith("# ")), delimiter="\t")}
    # per-rank answer of the nearest reference (1-NN), as the k-mer baseline is scored
    id_to_key = {k["id"]: k for k in keys}
    learned_hits = [id_to_key[rows[r["id"]]["hit1_id"]] for r in novel]
    learned = placement(novel, learned_hits, key_taxa)
    learned_auroc, placing_auroc = (auroc([float(rows[r["id"]][column]) for r in seen],
                                          [float(rows[r["id"]][column]) for r in novel])
                                    for column in ("novelty_similarity", "similarity"))
    flagged = sum(rows[r["id"]]["novel"] == "true" for r in novel) / len(novel)
    false_alarms = sum(rows[r["id"]]["novel"] == "true" for r in seen) / len(seen)
    deepest = {rank: sum(bool(rows[r["id"]][rank]) and not any(rows[r["id"]][d] for d in RANKS[RANKS.index(rank) + 1:])
                         for r in novel) / len(novel) for rank in RANKS}
    given_right = {rank: sum(rows[r["id"]][rank] == r[rank] for r in novel if rows[r["id"]][rank])
                   / max(1, sum(bool(rows[r["id"]][rank]) for r in novel)) for rank in RANKS}

    baselines = {}
    for k in sorted({*range(3, args.kmax + 1), 5}):  # k = 5 is always reported
        key_profiles = kmer_profiles([r["dna"] for r in keys], k)
        best, _ = nearest(kmer_profiles([r["dna"] for r in novel], k), key_profiles)
        _, seen_sims = nearest(kmer_profiles([r["dna"] for r in seen], k), key_profiles)
        _, novel_sims = nearest(kmer_profiles([r["dna"] for r in novel], k), key_profiles)
        baselines[k] = (placement(novel, [keys[i] for i in best], key_taxa), auroc(list(seen_sims), list(novel_sims)),
                        [keys[i] for i in best])
    best_k = max(baselines, key=lambda k: baselines[k][0]["genus"])
    learned_sims = learned_similarities(model_dir, novel, index.embeddings) if args.votes or args.variants else None
    if args.variants:
        rank_variants(learned_sims, keys, novel, key_taxa, learned_hits, index.thresholds["order"])
    if args.votes:
        sources = {"clibd": learned_sims}
        for k in sorted({5, best_k}):
            sources[f"{k}-mer"] = (kmer_profiles([r["dna"] for r in novel], k)
                                   @ kmer_profiles([r["dna"] for r in keys], k).T).numpy()
        print("| votes among top-k | " + " | ".join(f"{name} order/family/genus" for name in sources) + " |")
        print("|---:|" + "---|" * len(sources))
        for k in (1, 3, 5, 10, 20):
            cells = [vote_placement(sims, keys, novel, key_taxa, k) for sims in sources.values()]
            print(f"| {k} | " + " | ".join(f"{100 * c['order']:.1f} / {100 * c['family']:.1f} / {100 * c['genus']:.1f}"
                                           for c in cells) + " |")
        print()

    print(f"config {args.config} (split seed {config.data.split_seed}, stage {args.stage}), model {model_dir}; {len(keys)} references ({len(key_taxa['species'])} species), "
          f"{len(novel)} novel-species queries ({len({r['species'] for r in novel})} species), {len(seen)} seen queries")
    print(f"thresholds: {', '.join(f'{r}={v:.3f}' for r, v in index.thresholds.items())}")
    if index.novelty_dim < index.embeddings.shape[1]:
        print(f"novelty scored on the first {index.novelty_dim} of {index.embeddings.shape[1]} dimensions "
              f"(the k-mer parts); AUROC of the whole embedding's similarity: {placing_auroc:.3f}")
    print()
    print("| method | order | family | genus | AUROC seen vs novel |")
    print("|---|---:|---:|---:|---:|")
    print(f"| clibd (learned DNA tower, 1-NN) | {100 * learned['order']:.1f} | {100 * learned['family']:.1f} | "
          f"{100 * learned['genus']:.1f} | {learned_auroc:.3f} |")
    for k in sorted({5, best_k}):
        place, area, _ = baselines[k]
        print(f"| raw {k}-mer counts, 1-NN{' (best k)' if k == best_k else ''} | {100 * place['order']:.1f} | "
              f"{100 * place['family']:.1f} | {100 * place['genus']:.1f} | {area:.3f} |")
    print(f"\nclibd identify on the novel queries: {100 * flagged:.1f} % flagged novel "
          f"(seen queries flagged: {100 * false_alarms:.1f} %); deepest rank given: "
          + ", ".join(f"{r} {100 * deepest[r]:.1f} %" for r in RANKS)
          + "; correct when given: " + ", ".join(f"{r} {100 * given_right[r]:.1f} %" for r in RANKS[:3]))
    train_records = [r for name in config.data.train_splits if name in splits for r in splits[name]]
    ours = genus_by_trained_congeners(novel, learned_hits, key_taxa, train_records)
    theirs = genus_by_trained_congeners(novel, baselines[best_k][2], key_taxa, train_records)
    print("\n| species of the query's genus in training | queries (species) | clibd genus | "
          f"raw {best_k}-mer genus |\n|---|---:|---:|---:|")
    for group, (accuracy, n, species) in ours.items():
        print(f"| {group} | {n} ({species}) | {100 * accuracy:.1f} | {100 * theirs[group][0]:.1f} |")
    if args.examples:
        print_examples(rows, seen, novel)
    if args.misses:
        for rank in ("order", "genus"):
            misses = species_misses(novel, learned_hits, baselines[best_k][2], [rows[r["id"]] for r in novel],
                                    keys, rank)
            print(f"\nNovel species placed at the wrong {rank} by clibd: {len(misses)} species, "
                  f"{sum(m[2] for m in misses)} queries\n| species | queries | clibd wrong | raw {best_k}-mer wrong | "
                  f"wrong in identify's answer | references of its {rank} | clibd's commonest wrong {rank} |\n"
                  "|---|---:|---:|---:|---:|---:|---|")
            for name, n, wrong, other_wrong, answered_wrong, refs, placed in misses:
                print(f"| {name} | {n} | {wrong} | {other_wrong} | {answered_wrong} | {refs} | {placed} |")


if __name__ == "__main__":
    main()
