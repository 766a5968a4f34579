"""Choose the species check's settings on validation species (issue 17, item 2).

    python bench/species_check.py                              # splits 42, 1, 2 of configs/bold_dna.yaml
    python bench/species_check.py --novel-named 0.005 0.01 --cutoffs 0.97
    python bench/species_check.py --candidates 1 5 20 --novel-named 0.005
    python bench/species_check.py --novel-named 0.005 0.01 --margin-weights 0 1 2 4
    python bench/species_check.py --novel-named 0.02 --margin-weights 1 --new-species

For each species split: the validation stage of the novel-species split (references: seen keys +
test-unseen keys; queries: validation-unseen species, which no reference holds, and the seen
validation records), the index built once, then identify run again for each setting of
`clibd.species_check` (identity cut-off, the share of held-out calibration specimens the
embedding may name: `novel_named`, and the weight of the species margin in the embedding's
confidence: `margin_weight`), once without the check (the embedding alone) and once with
alignment alone (a species only from a reference at least the cut-off identical: the rule of
VSEARCH / BLAST users, over the embedding's nearest candidates). Prints, per setting, the mean
over the splits of: known species named right / named at all / flagged novel, and novel species
named as a held one. Test species are never looked at.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

from clibd.data import load_splits
from clibd.evaluation.novel_species import stage_datasets
from clibd.identify import Identifier
from clibd.index import build_index
from clibd.species_check import SpeciesCheck, calibrate_species_check
from clibd.towers.parts import select_parts
from clibd.training import ExperimentConfig


def split_model(config_path: str, seed: int) -> tuple[ExperimentConfig, Path]:
    config = ExperimentConfig.from_yaml(config_path)
    if seed != config.data.split_seed:
        config.data.split_seed = seed
        config.train.output_dir = f"{config.train.output_dir}-split{seed}"
    return config, Path(config.train.output_dir) / "best"


def stage_identifier(config_path: str, seed: int, stage: str, folder: Path, **build_options
                     ) -> tuple[Identifier, list[dict], list[dict], list[dict]]:
    """(identifier, references, novel queries, seen queries) of one split's `stage` ("val" or
    "test"): its model (trained already) and an index of the stage's references built in `folder`."""
    config, model_dir = split_model(config_path, seed)
    if not model_dir.exists():
        raise SystemExit(f"{model_dir} not found: train it first (python bench/vs_alignment.py does)")
    _, references, novel, seen = (list(part) for part in stage_datasets(load_splits(config.data), stage,
                                                                       config.data.train_splits))
    build_index(model_dir, references, "dna", folder, progress=False, **build_options)
    return Identifier.load(folder, model_dir=model_dir), references, novel, seen


def over_val_splits(args: argparse.Namespace, run: Callable[..., dict], **build_options) -> list[dict]:
    """`run(identifier, references, novel, seen)` on the validation stage of each of `args.splits`
    (an index built per split in a temporary folder, `build_options` as `build_index` takes them)."""
    per_split = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.splits:
            identifier, references, novel, seen = stage_identifier(args.config, seed, "val", Path(tmp) / f"split{seed}",
                                                                   **build_options)
            per_split.append(run(identifier, references, novel, seen))
            print(f"split {seed}: {len(references)} references, {len(novel)} novel, {len(seen)} seen queries")
    return per_split


def rates(predictions, novel: list[dict], seen: list[dict]) -> dict[str, float]:
    novel_p, seen_p = predictions[: len(novel)], predictions[len(novel) :]
    return {"known right": sum(p.answer["species"] == q["species"] for p, q in zip(seen_p, seen, strict=True)) / len(seen),
            "known named": sum(bool(p.answer["species"]) for p in seen_p) / len(seen),
            "known flagged novel": sum(p.novel for p in seen_p) / len(seen),
            "novel named": sum(bool(p.answer["species"]) for p in novel_p) / len(novel)}


def settings_for_split(identifier: Identifier, queries: list[dict], novel: list[dict], seen: list[dict],
                       cutoffs: list[float], candidates: list[int], novel_named: list[float],
                       margin_weights: list[float], new_species: bool = False) -> dict[str, dict[str, float]]:
    """Rates per setting; the index's embeddings and barcodes are reused, only the check changes."""
    index = identifier.index
    embeddings = index.embeddings.float()
    novelty = select_parts(embeddings, index.parts, "scores_novelty")
    records = index.records_with_barcodes()
    query_embeddings = identifier.embed(queries)
    ids, barcodes = [q["id"] for q in queries], [q["dna"] for q in queries]

    def run(check: SpeciesCheck) -> dict[str, float]:
        index.species_check = check  # this setting's check instead of the stored one
        return rates(identifier.identify_embeddings(query_embeddings, ids, 5, barcodes=barcodes), novel, seen)

    out = {"embedding alone (no check)": rates(identifier.identify_embeddings(query_embeddings, ids, 5), novel, seen)}
    for cutoff, count in itertools.product(cutoffs, candidates):  # alignment alone: the embedding names none
        out[f"alignment alone, cut-off {cutoff}, {count} candidates"] = run(
            SpeciesCheck(math.inf, identity_cutoff=cutoff, candidates=count))
    samples = [("", None)] + ([(", new species held out", index.meta["trained_species"])] if new_species else [])
    for cutoff, count, share, weight, (held, trained) in itertools.product(cutoffs, candidates, novel_named,
                                                                           margin_weights, samples):
        check = calibrate_species_check(embeddings, novelty, records, identity_cutoff=cutoff, candidates=count,
                                        novel_named=share, margin_weight=weight, trained_species=trained)
        out[f"cut-off {cutoff}, {count} candidates, novel_named {share}, margin weight {weight:g}{held} (embedding "
            f"threshold {check.embedding_threshold:.3f})"] = run(check)
    return out


def split_parser(description: str) -> argparse.ArgumentParser:
    """The options every validation bench over the species splits takes: --config, --splits."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bold_dna.yaml")
    parser.add_argument("--splits", type=int, nargs="+", default=[42, 1, 2])
    return parser


def main() -> None:
    parser = split_parser(__doc__)
    parser.add_argument("--cutoffs", type=float, nargs="+", default=[0.97])
    parser.add_argument("--candidates", type=int, nargs="+", default=[5],
                        help="how many of the embedding's nearest references are aligned (default 5)")
    parser.add_argument("--novel-named", type=float, nargs="+", default=[0.0025, 0.005, 0.01, 0.02])
    parser.add_argument("--margin-weights", type=float, nargs="+", default=[0.0, 1.0],
                        help="weights of the species margin in the embedding's confidence (default 0 1)")
    parser.add_argument("--new-species", action="store_true",
                        help="also calibrate each setting on the species the model did not train on only")
    args = parser.parse_args()
    per_split = over_val_splits(args, lambda identifier, _, novel, seen: settings_for_split(
        identifier, novel + seen, novel, seen, args.cutoffs, args.candidates, args.novel_named, args.margin_weights,
        args.new_species))
    columns = list(next(iter(per_split[0].values())))
    print(f"\nvalidation species, mean over splits {' '.join(map(str, args.splits))} (%)\n")
    print("| setting | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for setting in per_split[0]:
        # embedding thresholds differ per split: name the setting by its first split's
        cells = [100 * sum(split[key][c] for split, key in zip(per_split, _same_setting(per_split, setting),
                                                                 strict=True)) / len(per_split) for c in columns]
        print(f"| {setting} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def _same_setting(per_split: list[dict], setting: str) -> list[str]:
    """The key of `setting` (named in the first split) in every split: the n-th setting of each."""
    position = list(per_split[0]).index(setting)
    return [list(split)[position] for split in per_split]


if __name__ == "__main__":
    main()
