"""Opening and searching a reference index of a million references: before (embeddings through
`safetensors.load_file`, records as a list of dicts, the faiss index built in every process)
against now (`ReferenceIndex.load`: embeddings memory-mapped, records as columns, the faiss-ivf
index persisted in the folder and memory-mapped), each run in a fresh process.

    python bench/scale_index.py --keys 1000000 --dim 768 --folder /tmp/scale-index

Writes an index folder of clustered synthetic unit keys (fp16, `bench/search.py`'s generator:
5,000 "genera" x 10 "species", specimens around their species) with labelled records, unless it
is there already; queries are new specimens. Per (backend, loading): seconds to open the index,
seconds from the process's start of loading to the first batch's answers (what `clibd identify`
waits before its first output), queries/s after that, peak resident memory (VmHWM) and the
resident memory at the end split into file-backed pages (mapped files: shared between processes,
dropped by the kernel under pressure) and the process's own, and the top-1 agreement with exact
search. Figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from clibd.constants import RANKS

BENCH = Path(__file__).resolve().parent
ROWS = [("torch", "before"), ("torch", "in RAM"), ("torch", "mapped"), ("faiss", "before"), ("faiss", "mapped"),
        ("faiss-ivf", "before"), ("faiss-ivf", "mapped, first run"), ("faiss-ivf", "mapped, later run")]


def memory_mb() -> dict[str, float]:
    """VmHWM (peak), VmRSS, RssFile, RssAnon of this process, MB."""
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024
            for key in ("VmHWM", "VmRSS", "RssFile", "RssAnon")}


def write_folder(folder: Path, n_keys: int, dim: int, n_queries: int) -> None:
    """An index folder as `build_index` writes it (no model: only searched), and the queries."""
    sys.path.insert(0, str(BENCH))
    from search import clustered_library  # bench/search.py

    keys, queries, species = clustered_library(n_keys, n_queries, dim=dim)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"dna": keys}, folder / "embeddings.safetensors")
    np.save(folder / "queries.npy", queries.numpy())
    with open(folder / "records.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["id", *RANKS, "source"])
        for i, s in enumerate(species.tolist()):
            genus = s // 10
            writer.writerow([f"ref{i:08d}", f"Order{genus % 25}", f"Family{genus % 700}", f"Genus{genus}",
                             f"Genus{genus} species{s}", "synthetic"])
    meta = {"clibd_version": "bench", "model": "none", "model_hash": "none", "modality": "dna", "dim": dim,
            "count": n_keys, "parts": [{"name": "embedding", "dim": dim, "weight": 1.0, "trained": True,
                                        "scores_novelty": True}], "thresholds": {}}
    (folder / "index.json").write_text(json.dumps(meta, indent=2))


def child(folder: Path, backend: str, loading: str, batch: int) -> dict:
    """One (backend, loading) in this fresh process: open, answer the first batch, then the rest."""
    from clibd.index import ReferenceIndex
    from clibd.retrieval import search

    queries = torch.from_numpy(np.load(folder / "queries.npy"))
    memory = memory_mb()
    start = time.perf_counter()
    if loading == "before" or loading == "in RAM":  # what `ReferenceIndex.load` did
        from safetensors.torch import load_file

        meta = json.loads((folder / "index.json").read_text())
        embeddings = load_file(folder / "embeddings.safetensors")[meta["modality"]]
        if loading == "in RAM":  # every byte read into the process's own memory
            embeddings = embeddings.clone()
        with open(folder / "records.tsv", newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t"))
        index = ReferenceIndex(folder, meta, embeddings, records)
        cache: dict = {}
        run = lambda q: search(q, index.embeddings, 5, backend, cache=cache)  # noqa: E731 (the old search)
    else:
        index = ReferenceIndex.load(folder)
        run = lambda q: index.search(q, 5, backend)  # noqa: E731
    opened = time.perf_counter() - start
    first = run(queries[:batch])[1]
    to_first = time.perf_counter() - start
    rest_start = time.perf_counter()
    rest = run(queries[batch:])[1]
    rate = (len(queries) - batch) / (time.perf_counter() - rest_start)
    end = memory_mb()
    return {"open_s": opened, "first_s": to_first, "qps": rate, "peak_mb": end["VmHWM"], "file_mb": end["RssFile"],
            "anon_mb": end["RssAnon"], "before_mb": memory["VmRSS"], "records": len(index.records),
            "top1": torch.cat([first, rest])[:, 0].tolist()}


def run_child(folder: Path, backend: str, loading: str, batch: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", backend, loading, "--folder", str(folder),
                             "--batch", str(batch)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768, help="the paper's width (our DNA-only model: 4,168)")
    parser.add_argument("--queries", type=int, default=1024, help="all queries; the first --batch is timed apart")
    parser.add_argument("--batch", type=int, default=256, help="identify's default batch")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/clibd-scale-index"))
    parser.add_argument("--rows", nargs="*", help="only these backends (torch, faiss, faiss-ivf)")
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "LOADING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.folder, *args.child, args.batch)))
        return
    meta_path = args.folder / "index.json"
    if not (meta_path.exists() and json.loads(meta_path.read_text())["count"] == args.keys
            and json.loads(meta_path.read_text())["dim"] == args.dim):
        start = time.perf_counter()
        write_folder(args.folder, args.keys, args.dim, args.queries)
        print(f"wrote {args.folder} in {time.perf_counter() - start:.0f} s", flush=True)
    for stale in args.folder.glob("faiss-ivf*"):
        stale.unlink()
    sizes = {p.name: p.stat().st_size / 2**20 for p in args.folder.iterdir() if p.is_file()}
    print(f"{args.keys:,} keys x {args.dim} (fp16), {args.queries} queries, first batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; files MB: "
          + ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(sizes.items())), flush=True)
    print("| backend | loading | open s | to first answers s | q/s after | peak RSS MB | RSS at end: files / own MB "
          "| process before MB | top-1 = exact |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    exact = None
    for backend, loading in ROWS:
        if args.rows and backend not in args.rows:
            continue
        r = run_child(args.folder, backend, loading, args.batch)
        exact = r["top1"] if exact is None and backend == "torch" else exact
        agree = "n/a" if exact is None else f"{100 * np.mean(np.array(r['top1']) == np.array(exact)):.1f} %"
        print(f"| {backend} | {loading} | {r['open_s']:.2f} | {r['first_s']:.1f} | {r['qps']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['file_mb']:.0f} / {r['anon_mb']:.0f} | {r['before_mb']:.0f} | {agree} |", flush=True)
    ivf = args.folder / "faiss-ivf.index"
    if ivf.exists():
        print(f"persisted {ivf.name}: {ivf.stat().st_size / 2**20:.0f} MB")
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
