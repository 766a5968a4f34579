"""Evaluate a saved CLIBD model the way the paper does (thin shell over clibd.evaluation).

    python evaluate_retrieval.py --model runs/demo/best --config configs/demo.yaml --out runs/demo/eval
    python evaluate_retrieval.py --untrained --config configs/bioscan1m_image_dna_text.yaml --out runs/untrained
    python evaluate_retrieval.py --render runs/demo/eval          # re-render metrics.md from metrics.json
    accelerate launch --num_processes 4 evaluate_retrieval.py --model ... --config ... --out ...

Every query (image, DNA, text, image+DNA averaged, image+DNA concatenated) x key (the same and
`all`) pair whose widths match (the authors' set), micro and macro top-1/3/5 at order, family,
genus and species, seen / unseen / harmonic mean, on val and test; IS+DU with the nearest-neighbour
and the linear classifier and Table 9 when the model has image and DNA towers. Writes metrics.json
(test), metrics_val.json, evaluation.json and metrics.md (Tables 1, 5, 3/10 and 9 of the paper).
`--untrained`: the unaligned baseline of Tables 1/5, the config's starting towers (pretrained
encoders, projections as training starts them from the config's seed) without contrastive
training. `--compat`: count as the authors' code does (a missing label is the class
`not_classified`; one text key per key record). `--linear-is-du fine-tune`: train IS+DU's linear
classifier as the authors do, with its own copy of the image encoder (default: the head alone on
the frozen embeddings).
Under `accelerate launch` the processes (GPUs, or gloo on the CPU) share every embedding, each
taking a contiguous run of batches; the metrics are the same as one process gives.
"""

import argparse
import tempfile

from accelerate.utils import set_seed
from transformers import AutoTokenizer

from clibd import CLIBDModel, CLIBDProcessor
from clibd.evaluation.report import LINEAR_IS_DU, run_evaluation
from clibd.evaluation.tables import render_folder
from clibd.retrieval import embedding_processes, launched_processes
from clibd.training import ExperimentConfig


def untrained_model(config: ExperimentConfig) -> tuple[CLIBDModel, CLIBDProcessor]:
    """The model `train.py` would start from with `config` (seeded as training seeds it, so the
    random projections are the same) and its processor: the paper's unaligned baseline."""
    set_seed(config.train.seed)
    model = (CLIBDModel.from_pretrained(config.model.init_from) if config.model.init_from
             else CLIBDModel.from_pretrained_towers(config.model_config()))
    source = config.text_tokenizer_source()
    tokenizer = AutoTokenizer.from_pretrained(source) if source else None
    return model.eval(), CLIBDProcessor.from_model_config(model.config, tokenizer)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved CLIBD model folder")
    parser.add_argument("--untrained", action="store_true",
                        help="evaluate the config's starting towers without contrastive training (no --model)")
    parser.add_argument("--config", help="the experiment config whose data and split (and with --untrained, model) to use")
    parser.add_argument("--out", help="folder for metrics.json and metrics.md")
    parser.add_argument("--render", metavar="FOLDER", help="only re-render FOLDER/metrics.md from its metrics.json")
    parser.add_argument("--compat", action="store_true",
                        help="count as the authors' code: not_classified is a class, one text key per key record")
    parser.add_argument("--linear-is-du", choices=LINEAR_IS_DU, default="head",
                        help="IS+DU's linear classifier: a head on the frozen train_seen image embeddings "
                             "(default), the head and the image encoder fine-tuned together as the authors "
                             "(a GPU job), or none")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.render is None and (not args.config or not args.out or bool(args.model) == args.untrained):
        parser.error("give --config, --out and either --model or --untrained (or only --render FOLDER)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render is not None:
        print(render_folder(args.render))
        return
    processes = launched_processes()
    main_process = processes is None or processes.is_main_process
    config = ExperimentConfig.from_yaml(args.config)
    model, processor = untrained_model(config) if args.untrained else (args.model, None)
    # every process computes the same metrics from the gathered embeddings; only the main one
    # writes them where asked (two writers of one file would collide), the others to a scratch folder
    with embedding_processes(processes), tempfile.TemporaryDirectory() as scratch:
        run_evaluation(model, config.data, args.out if main_process else scratch, batch_size=args.batch_size,
                       progress=main_process, processor=processor, compat=args.compat,
                       linear_is_du=args.linear_is_du, aligned=not args.untrained)
    if main_process:
        with open(f"{args.out}/metrics.md") as f:
            print(f.read())


if __name__ == "__main__":
    main()
