"""clibd identify against the alignment tools ecologists use (VSEARCH, BLAST+, SINTAX) on species
held out of training and of the references.

    python bench/vs_alignment.py                               # splits 42, 1, 2; every tool (about 3 h on 2 cores)
    python bench/vs_alignment.py --limit 50 --splits 42        # a quick run: 50 novel + 50 seen queries
    python bench/vs_alignment.py --tools clibd blast sintax    # leave out the exhaustive VSEARCH (most of the time)
    python bench/vs_alignment.py --tools clibd --precision 0.98    # clibd's answers at a stated precision

A thin driver over `clibd.evaluation.tool_comparison` (whose docstring defines the scores) and
`clibd.evaluation.alignment_tools` (the tool runners, parsers and cut-offs): for each species
split, trains the config's model if it is missing (as bench/novel_species.py does), stages the
novel-species split (references: seen + validation-unseen keys; queries: the test-unseen species
and the seen test records), runs every tool on the same machine in the same run, and prints one
table (the mean over the splits and each split) and the timings. Tools whose binaries are missing
are skipped with a message: `apt-get install vsearch ncbi-blast+`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from clibd.data import load_splits
from clibd.evaluation.tool_comparison import TOOLS, compare_tools, format_comparison
from clibd.training import ExperimentConfig, train

DEFAULT_TOOLS = ("clibd", "vsearch", "vsearch-default", "blast", "sintax")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bold_dna.yaml")
    parser.add_argument("--splits", type=int, nargs="+", default=[42, 1, 2],
                        help="species split seeds; the config's own seed uses its output_dir, another N "
                             "OUTPUT_DIR-splitN (trained if missing)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(DEFAULT_TOOLS))
    parser.add_argument("--limit", type=int, help="at most this many novel and this many seen queries (quick run)")
    parser.add_argument("--threads", type=int, default=2, help="threads for VSEARCH and BLAST+ (default 2)")
    parser.add_argument("--workdir", help="keep the tools' files here (default: a temporary folder)")
    parser.add_argument("--precision", type=float, help="clibd: index build --precision (default: balanced thresholds)")
    parser.add_argument("--no-species-check", action="store_true", help="clibd: index build --no-species-check")
    return parser.parse_args()


def model_for_split(config_path: str, seed: int) -> tuple[ExperimentConfig, Path]:
    """The config with split seed `seed` and its trained model folder, trained first if missing."""
    config = ExperimentConfig.from_yaml(config_path)
    if seed != config.data.split_seed:
        config.data.split_seed = seed
        config.train.output_dir = f"{config.train.output_dir}-split{seed}"
    model_dir = Path(config.train.output_dir) / "best"
    if not model_dir.exists():
        print(f"{model_dir} not found: training {config_path} (split seed {seed}) first", file=sys.stderr)
        train(config, resume=True)
        if not model_dir.exists():  # a run that never evaluated on validation keeps its last epoch only
            model_dir = model_dir.with_name("final")
    return config, model_dir


def clibd_options(args: argparse.Namespace) -> dict:
    """`build_index` keywords for clibd's index, from the command line."""
    options = {"precision": args.precision} if args.precision else {}
    return options | ({"species_check": False} if args.no_species_check else {})


def main() -> None:
    args = parse_args()
    per_split = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.splits:
            config, model_dir = model_for_split(args.config, seed)
            print(f"split {seed}, model {model_dir}:", file=sys.stderr)
            per_split[str(seed)] = compare_tools(
                model_dir, load_splits(config.data), args.tools, Path(args.workdir or tmp) / f"split{seed}",
                threads=args.threads, limit=args.limit, train_splits=config.data.train_splits,
                log=lambda line: print("  " + line, file=sys.stderr, flush=True), clibd_options=clibd_options(args))
    limit = f", at most {args.limit} novel + {args.limit} seen queries" if args.limit else ""
    print(format_comparison(per_split, title=f"config {args.config}, splits {' '.join(map(str, args.splits))}"
                                             f"{limit}, {args.threads} threads"), end="")


if __name__ == "__main__":
    main()
