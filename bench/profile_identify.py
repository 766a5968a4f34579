"""Where `clibd identify` spends its time on barcodes, past start-up (issue 17, item 4).

    python bench/profile_identify.py                  # split 42's test stage, configs/bold_dna.yaml
    python bench/profile_identify.py --split 1 --top 30

Builds the test-stage index of one species split (references: seen + validation-unseen keys,
with the species check), embeds the queries (test-unseen + seen test records), times
`Identifier.identify_embeddings` with the species check on 2 threads and on 1, then prints
cProfile's cumulative top of one more call. The model must exist (bench/vs_alignment.py trains it).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch
from species_check import stage_identifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bold_dna.yaml")
    parser.add_argument("--split", type=int, default=42)
    parser.add_argument("--top", type=int, default=20, help="how many functions of the profile to print")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        identifier, references, novel, seen = stage_identifier(args.config, args.split, "test", Path(tmp) / "refs")
        queries = novel + seen
        start = time.perf_counter()
        embeddings = identifier.embed(queries)
        print(f"{len(queries)} queries, {len(references)} references; embed {time.perf_counter() - start:.2f} s")
        ids, barcodes = [q["id"] for q in queries], [q["dna"] for q in queries]
        threads = torch.get_num_threads()
        for count in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(count)
            start = time.perf_counter()
            identifier.identify_embeddings(embeddings, ids, 5, barcodes=barcodes)
            print(f"identify_embeddings (species check on {count} thread(s)): {time.perf_counter() - start:.2f} s")
        torch.set_num_threads(threads)
        profile = cProfile.Profile()
        profile.runcall(identifier.identify_embeddings, embeddings, ids, 5, barcodes=barcodes)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
