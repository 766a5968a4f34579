"""Evaluate a saved CLIBD model the way the paper does (thin shell over clibd.evaluation).

    python evaluate_retrieval.py --model runs/demo/best --config configs/demo.yaml --out runs/demo/eval

Every query (image, DNA, image+DNA) x key (image, DNA, text, all) pair, micro and macro top-1/3/5
at order, family, genus and species, seen / unseen / harmonic mean, on val and test; IS+DU when
the model has image and DNA towers. Writes metrics.json (test), metrics_val.json and metrics.md.
"""

import argparse

from clibd.evaluation.report import run_evaluation
from clibd.training import ExperimentConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved CLIBD model folder")
    parser.add_argument("--config", required=True, help="the experiment config whose data and split to use")
    parser.add_argument("--out", required=True, help="folder for metrics.json and metrics.md")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    run_evaluation(args.model, ExperimentConfig.from_yaml(args.config).data, args.out, batch_size=args.batch_size)
    with open(f"{args.out}/metrics.md") as f:
        print(f.read())


if __name__ == "__main__":
    main()
