"""Novel species: barcodes of species that are neither in training nor in the reference library.

    python bench/novel_species.py                      # configs/bold_dna.yaml, trained first if needed (6 min)
    python bench/novel_species.py --split-seed 1       # another species split (trained afresh)
    python bench/novel_species.py --config configs/demo.yaml --model runs/demo/best   # the demo model

A thin driver over `clibd.evaluation.novel_species` (whose docstring defines the split and the
scores): trains the config if its model is missing, loads the config's species split, builds an
index of the references with `clibd index build`'s code, identifies the novel and seen queries
with `clibd identify`'s code, and prints per-rank placement, seen-versus-novel AUROC, how
`identify` answered and genus placement by trained congeners, next to 1-NN on raw k-mer count
profiles for k = 5 and the best k in 3..KMAX.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clibd.data import load_splits
from clibd.evaluation.novel_species import evaluate_novel_species, format_report
from clibd.training import ExperimentConfig, train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bold_dna.yaml")
    parser.add_argument("--model", help="a trained model folder; default: the config's run, trained if missing")
    parser.add_argument("--no-species-check", action="store_true",
                        help="the embedding alone decides the species (no alignment of the nearest references)")
    parser.add_argument("--kmax", type=int, default=8, help="raw k-mer baselines for k = 3..KMAX (default 8)")
    parser.add_argument("--stage", choices=("test", "val"), default="test",
                        help="val: score the validation-unseen species instead (references: seen + test-unseen "
                             "keys), to choose settings without looking at the test species")
    parser.add_argument("--examples", action="store_true",
                        help="also print identify's answer for a known species and for novel ones it stops at "
                             "genus, family and order (the README's example)")
    parser.add_argument("--misses", action="store_true",
                        help="also list the novel species placed at the wrong order or genus")
    parser.add_argument("--split-seed", type=int,
                        help="another species split than the config's (trained into OUTPUT_DIR-splitN if missing)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
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
    report = evaluate_novel_species(model_dir, load_splits(config.data), stage=args.stage,
                                    train_splits=config.data.train_splits, kmax=args.kmax,
                                    index_options={"species_check": False} if args.no_species_check else None)
    print(format_report(report, title=f"config {args.config} (split seed {config.data.split_seed})",
                        examples=args.examples, misses=args.misses), end="")


if __name__ == "__main__":
    main()
