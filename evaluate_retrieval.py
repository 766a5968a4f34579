"""Evaluate a saved CLIBD model the way the paper does (thin shell over clibd.evaluation).

    python evaluate_retrieval.py --model runs/demo/best --config configs/demo.yaml --out runs/demo/eval
    accelerate launch --num_processes 4 evaluate_retrieval.py --model ... --config ... --out ...

Every query (image, DNA, image+DNA) x key (image, DNA, text, all) pair, micro and macro top-1/3/5
at order, family, genus and species, seen / unseen / harmonic mean, on val and test; IS+DU when
the model has image and DNA towers. Writes metrics.json (test), metrics_val.json and metrics.md.
Under `accelerate launch` the processes (GPUs, or gloo on the CPU) share every embedding, each
taking a contiguous run of batches; the metrics are the same as one process gives.
"""

import argparse
import tempfile

from clibd.evaluation.report import run_evaluation
from clibd.retrieval import embedding_processes, launched_processes
from clibd.training import ExperimentConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved CLIBD model folder")
    parser.add_argument("--config", required=True, help="the experiment config whose data and split to use")
    parser.add_argument("--out", required=True, help="folder for metrics.json and metrics.md")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    processes = launched_processes()
    main_process = processes is None or processes.is_main_process
    data = ExperimentConfig.from_yaml(args.config).data
    # every process computes the same metrics from the gathered embeddings; only the main one
    # writes them where asked (two writers of one file would collide), the others to a scratch folder
    with embedding_processes(processes), tempfile.TemporaryDirectory() as scratch:
        run_evaluation(args.model, data, args.out if main_process else scratch, batch_size=args.batch_size,
                       progress=main_process)
    if main_process:
        with open(f"{args.out}/metrics.md") as f:
            print(f.read())


if __name__ == "__main__":
    main()
