"""Where `clibd identify` spends its time on barcodes, past start-up (issue 17, item 4).

    python bench/profile_identify.py                  # split 42's test stage, configs/bold_dna.yaml
    python bench/profile_identify.py --split 1 --top 30 --passes 9
    PYTHONPATH=OTHER_CHECKOUT/src python bench/profile_identify.py    # another commit's code, the same inputs

Builds the test-stage index of one species split (references: seen + validation-unseen keys,
with the species check) and embeds the queries (test-unseen + seen test records), timed: the
first time, as `clibd identify` does, each barcode is placed on COI-5P (for models with aligned
branches; a processor remembers placements). Then each of `--passes` passes times, in turn:
embedding the queries again (`Identifier.embed`, placements remembered), the search as deep
as identify's margins look (`MARGIN_DEPTH` nearest keys), the species check's alignments of each
query's candidates (`clibd.species_check.choose_candidates`, on the threads torch may use) and
the whole `Identifier.identify_embeddings` (search, alignments, margins, thresholds and
answers), on torch's threads (the machine's cores: 2 here) and on 1. Prints the median and the fastest pass of each step, queries/s
at the median, what identify spends besides its search and alignments (the medians' difference)
and the 1-minute load average before and after (other work on this shared machine slows every
step: compare commits pass by pass, on an idle machine), then cProfile's cumulative top of one
more call. The model must exist (bench/vs_alignment.py trains it).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from species_check import stage_identifier

from clibd.novelty import MARGIN_DEPTH
from clibd.species_check import choose_candidates

SEARCH, ALIGN, WHOLE = f"search ({MARGIN_DEPTH} nearest)", "species check alignments", "identify_embeddings"


def on_threads(count: int, step: Callable[[], object]) -> Callable[[], object]:
    """`step` run with torch (and so the species check's pool) on `count` threads."""
    def run() -> object:
        threads = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            return step()
        finally:
            torch.set_num_threads(threads)
    return run


def time_passes(steps: dict[str, Callable[[], object]], passes: int) -> dict[str, list[float]]:
    """Seconds of each step in each pass, the steps in turn within a pass."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(passes):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bold_dna.yaml")
    parser.add_argument("--split", type=int, default=42)
    parser.add_argument("--passes", type=int, default=5, help="timed passes over every step")
    parser.add_argument("--top", type=int, default=20, help="how many functions of the profile to print")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        identifier, references, novel, seen = stage_identifier(args.config, args.split, "test", Path(tmp) / "refs")
        queries, index = novel + seen, identifier.index
        ids, barcodes, check = [q["id"] for q in queries], [q["dna"] for q in queries], index.species_check
        start = time.perf_counter()
        embeddings = identifier.embed(queries)  # the first time: each barcode placed on COI-5P
        first_embed = time.perf_counter() - start
        nearest = index.search(embeddings, MARGIN_DEPTH)[1][:, : check.candidates].tolist()
        candidates = [[index.barcodes[j] for j in row] for row in nearest]
        names = [[index.records[j]["id"] for j in row] for row in nearest]
        steps = {"embed queries (COI-5P placements remembered)": lambda: identifier.embed(queries),
                 SEARCH: lambda: index.search(embeddings, MARGIN_DEPTH),
                 ALIGN: lambda: choose_candidates(barcodes, candidates, check.identity_cutoff, ids, names),
                 WHOLE: lambda: identifier.identify_embeddings(embeddings, ids, 5, barcodes=barcodes),
                 f"{WHOLE}, 1 thread": on_threads(1, lambda: identifier.identify_embeddings(
                     embeddings, ids, 5, barcodes=barcodes))}
        load = os.getloadavg()[0]
        seconds = time_passes(steps, args.passes)
        print(f"\nsplit {args.split}: {len(references)} references, {len(queries)} queries, {args.passes} passes, "
              f"{torch.get_num_threads()} threads; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n")
        median = {name: statistics.median(values) for name, values in seconds.items()}
        print("| step | median s | fastest s | queries/s at the median |\n|---|---:|---:|---:|")
        print(f"| embed queries, the first time (one pass) | {first_embed:.2f} | | {len(queries) / first_embed:.0f} |")
        for name, values in seconds.items():
            print(f"| {name} | {median[name]:.2f} | {min(values):.2f} | {len(queries) / median[name]:.0f} |")
        print(f"| {WHOLE} less search and alignments (margins, thresholds, answers) | "
              f"{median[WHOLE] - median[SEARCH] - median[ALIGN]:.2f} | | |\n")
        profile = cProfile.Profile()
        profile.runcall(identifier.identify_embeddings, embeddings, ids, 5, barcodes=barcodes)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
