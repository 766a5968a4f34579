"""Alignments/s of the species check, sequential against a thread pool (issue 17, item 4).

    python bench/species_check_speed.py                          # 1,000 queries, their 5 nearest by 5-mer cosine
    python bench/species_check_speed.py --candidates random --threads 2 4

Queries: `--queries` records of the shared BOLD table (seed 0); references: every other record
with a barcode. Each query's candidates are its `--k` nearest references by the cosine of 5-mer
count profiles (a stand-in for the embedding search: most queries of held species settle on the
first candidate, as in identify) or, with `--candidates random`, `--k` random references (none
settles: every candidate is aligned, the worst case). Then `clibd.species_check.choose_candidates`
with threads=1 and each `--threads`, alternating, `--repeats` times; prints the best time of each,
alignments/s (the alignments `choose_candidate` runs: it stops at the first candidate that clears
the cut-off), the ratio to threads=1 and the cores the run got (its CPU seconds / wall seconds),
then the 1-minute load average before and after and the share of CPU idle in the second before:
other work on the machine takes cores from the pool.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import numpy as np
import torch

from clibd.data import read_records, shared_data_dir
from clibd.processing.barcodes import normalise_barcode
from clibd.species_check import IDENTITY_CUTOFF, choose_candidates, named_position

K = 5  # k-mer size of the profiles


def kmer_profiles(barcodes: list[str]) -> torch.Tensor:
    """Unit-length 5-mer count profiles [N, 4**5]; k-mers with N or other codes left out."""
    code = np.full(256, -1, dtype=np.int64)
    code[[ord(b) for b in "ACGT"]] = range(4)
    profiles = np.zeros((len(barcodes), 4**K), dtype=np.float32)
    for row, barcode in enumerate(barcodes):
        digits = code[np.frombuffer(normalise_barcode(barcode, f"record #{row}").encode(), dtype=np.uint8)]
        if len(digits) < K:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(digits, K)
        windows = windows[(windows >= 0).all(axis=1)]
        np.add.at(profiles[row], windows @ (4 ** np.arange(K - 1, -1, -1)), 1.0)
    return torch.nn.functional.normalize(torch.from_numpy(profiles), dim=1)


def candidates_for(queries: list[str], references: list[str], k: int, how: str, seed: int) -> list[list[str]]:
    if how == "random":
        rng = random.Random(seed)
        return [rng.sample(references, k) for _ in queries]
    nearest = (kmer_profiles(queries) @ kmer_profiles(references).T).topk(k, dim=1).indices
    return [[references[j] for j in row] for row in nearest.tolist()]


def idle_share(seconds: float = 1.0) -> float:
    """Share of the machine's CPU time left idle over `seconds` (/proc/stat; NaN elsewhere): the
    load average lags a short run, this says whether other work holds cores right now."""
    def sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except OSError:
        return float("nan")
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return (spent[3] + spent[4]) / max(sum(spent), 1)  # idle + iowait


def timed(queries: list[str], candidates: list[list[str]], threads: int) -> tuple[float, float, list]:
    """(wall seconds, cores used: this process's CPU seconds / wall seconds, outcomes)."""
    start, cpu = time.perf_counter(), time.process_time()
    outcomes = choose_candidates(queries, candidates, IDENTITY_CUTOFF, threads=threads)
    seconds = time.perf_counter() - start
    return seconds, (time.process_time() - cpu) / seconds, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(shared_data_dir() / "insect_bold_coi" / "insect_bold_coi.tsv"))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5, help="candidates per query (the check's default: 5)")
    parser.add_argument("--candidates", choices=["kmer", "random"], default="kmer")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    barcodes = [r["dna"] for r in read_records(args.data) if r.get("dna")]
    chosen = set(random.Random(args.seed).sample(range(len(barcodes)), args.queries))
    queries = [b for i, b in enumerate(barcodes) if i in chosen]
    references = [b for i, b in enumerate(barcodes) if i not in chosen]
    candidates = candidates_for(queries, references, args.k, args.candidates, args.seed)
    choose_candidates(queries[:1], candidates[:1], threads=1)  # parasail loaded and its matrix made
    load_before, idle_before = os.getloadavg()[0], idle_share()
    best: dict[int, tuple[float, float]] = {}
    expected = None
    for _ in range(args.repeats):
        for threads in [1, *args.threads]:
            seconds, cores, outcomes = timed(queries, candidates, threads)
            expected = expected or outcomes
            assert outcomes == expected, f"threads={threads} gave other results than threads=1"
            best[threads] = min(best.get(threads, (float("inf"), 0.0)), (seconds, cores))
    named = [named_position(outcome, IDENTITY_CUTOFF) is not None for outcome in expected]
    alignments = sum(o[0] + 1 if hit else len(c) for o, c, hit in zip(expected, candidates, named, strict=True))
    settled = sum(named)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"CPU idle the second before: {idle_before:.0%}")
    print(f"{len(queries)} queries, {args.k} {args.candidates} candidates each: {alignments} alignments, "
          f"{settled} queries settled (>= {IDENTITY_CUTOFF:.0%}); best of {args.repeats}")
    print("| threads | seconds | alignments/s | ratio to 1 thread | cores used |\n|---:|---:|---:|---:|---:|")
    for threads, (seconds, cores) in best.items():
        print(f"| {threads} | {seconds:.3f} | {alignments / seconds:,.0f} | {best[1][0] / seconds:.2f} | {cores:.2f} |")


if __name__ == "__main__":
    main()
