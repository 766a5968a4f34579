"""Train a CLIBD model from a YAML config (thin shell over clibd.training).

    python train.py --config configs/demo.yaml
    accelerate launch --num_processes 4 train.py --config configs/bioscan1m_image_dna_text.yaml --resume
"""

import argparse
import logging

from clibd.training import ExperimentConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--output-dir", help="override train.output_dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clibd").setLevel(logging.INFO)
    config = ExperimentConfig.from_yaml(args.config)
    if args.output_dir:
        config.train.output_dir = args.output_dir
    result = train(config, resume=args.resume)
    if result.table:
        print(f"\nTest retrieval (%; seen / unseen species / harmonic mean in each table):\n{result.table}")
        print(f"\nModel, processor and metrics in {result.run_dir}")


if __name__ == "__main__":
    main()
