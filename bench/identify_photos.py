"""Photos/s of identify's query embedding (`clibd.query_plan.embed_queries`, what `Identifier`
runs per batch) for the paper-size image tower (ViT-B/16, 224 px; untrained weights: speed only).

    python bench/identify_photos.py --photos 48 --batch-size 16            # CPU (or the GPU if there is one)
    python bench/identify_photos.py --photos 10000 --batch-size 256 --device cuda

Uses the shared BIOSCAN photos (cycled to --photos). Prints photos/s, where the returned embeddings
live (always the CPU: each batch comes back at once) and, on a GPU, the peak device memory, which
stays that of one batch however many photos are identified.
"""

from __future__ import annotations

import argparse
import time

import torch

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.data import shared_data_dir
from clibd.query_plan import embed_queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = CLIBDConfig(modalities=["image", "dna"])  # the paper's image tower; DNA only to make a CLIBD model
    config.image_config.pretrained = False
    model = CLIBDModel(config).eval().to(args.device)
    processor = CLIBDProcessor.from_model_config(config)
    photos = sorted((shared_data_dir() / "bioscan1m_examples" / "images").glob("*.jpg"))
    records = [{"id": f"p{i}", "image": str(photos[i % len(photos)])} for i in range(args.photos)]
    embed_queries(model, processor, records[: args.batch_size], "image", args.batch_size)  # warm-up batch
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    embeddings, _ = embed_queries(model, processor, records, "image", args.batch_size)
    elapsed = time.perf_counter() - start
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device.startswith(
        "cuda") else ""
    print(f"{args.photos} photos, batch {args.batch_size}, {args.device} ({args.threads} threads): "
          f"{args.photos / elapsed:.1f} photos/s; embeddings {tuple(embeddings.shape)} on {embeddings.device}{peak}")


if __name__ == "__main__":
    main()
