"""Exact top-k search throughput (queries/s) and memory over synthetic 768-d libraries, batched
(chunked matrix products with a running top-k) versus a naive per-query loop in the same run;
approximate search (faiss inverted file over 8-bit codes, `--search faiss-ivf`) with its recall
against exact search; then end-to-end `identify` throughput for barcodes with a saved model.

    python bench/search.py --keys 100000 1000000 --queries 512
    python bench/search.py --keys 1000000 --dtypes --approximate --queries 2000
    python bench/search.py --keys 100000 --identify-model runs/demo/best
    python bench/search.py --keys 100000 --dtypes float32 --identify-photos 128

Figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from clibd.retrieval import topk_search


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def bench_search(n_keys: int, n_queries: int, dtype: torch.dtype, loop_queries: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    keys = torch.empty(n_keys, 768, dtype=dtype)
    for start in range(0, n_keys, 100_000):  # build in blocks: no fp32 copy of the whole library
        block = F.normalize(torch.randn(min(100_000, n_keys - start), 768, generator=generator), dim=-1)
        keys[start : start + block.shape[0]] = block.to(dtype)
    queries = F.normalize(torch.randn(n_queries, 768, generator=generator), dim=-1)
    topk_search(queries[:8], keys, 5)  # warm-up
    before = rss_mb()
    start = time.perf_counter()
    values, indices = topk_search(queries, keys, 5)
    batched = n_queries / (time.perf_counter() - start)
    peak = rss_mb()
    start = time.perf_counter()
    for q in queries[:loop_queries]:
        naive = torch.topk((keys.float() @ q) if dtype == torch.float32 else (keys @ q.to(dtype)).float(), 5)
    loop = loop_queries / (time.perf_counter() - start)
    assert torch.equal(naive.indices, indices[loop_queries - 1])
    return {"keys": n_keys, "dtype": str(dtype).replace("torch.", ""), "batched": batched, "loop": loop,
            "library_mb": keys.numel() * keys.element_size() / 2**20, "rss_mb": peak, "rss_before_mb": before}


def clustered_library(n_keys: int, n_queries: int, dim: int = 768, species: int = 50_000,
                      block: int = 100_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit vectors shaped like a reference library: 5,000 "genera" of 10 "species", specimens
    scattered around their species (fp16 keys, built in blocks), and queries that are new
    specimens of random species. Nearest-neighbour structure, unlike uniform random vectors.
    Returns keys, queries and the species of each key."""
    generator = torch.Generator().manual_seed(0)
    genera = torch.randn(species // 10, dim, generator=generator)
    centres = genera.repeat_interleave(10, dim=0) + 0.7 * torch.randn(species, dim, generator=generator)

    def specimens(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        of = torch.randint(0, species, (n,), generator=generator)
        return F.normalize(centres[of] + 0.5 * torch.randn(n, dim, generator=generator), dim=-1), of

    keys = torch.empty(n_keys, dim, dtype=torch.float16)
    key_species = torch.empty(n_keys, dtype=torch.long)
    for start in range(0, n_keys, block):
        vectors, of = specimens(min(block, n_keys - start))
        keys[start : start + block], key_species[start : start + block] = vectors.half(), of
    return keys, specimens(n_queries)[0], key_species


# A process that only holds the saved index and searches it: the memory the search itself needs.
SEARCH_ONLY = """
import re, sys, time
import faiss, numpy as np
index, queries = faiss.read_index(sys.argv[1]), np.load(sys.argv[2])
faiss.extract_index_ivf(index).nprobe = int(sys.argv[3])
index.search(queries[:16], 5)
start = time.perf_counter()
index.search(queries, 5)
peak_kb = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)  # reset by exec, unlike ru_maxrss
print(len(queries) / (time.perf_counter() - start), int(peak_kb) / 1024)
"""


def bench_approximate(n_keys: int, n_queries: int, nprobes: list[int]) -> list[dict]:
    """faiss IVF-SQ8 as `ReferenceIndex.search(backend="faiss-ivf")` builds it,
    against exact search on the same keys: queries/s, recall of the exact top-1 and top-5, how
    often the top-1 has the exact top-1's species (what identification reads), memory."""
    import gc

    import faiss

    from clibd.retrieval import approximate_faiss_index, faiss_search

    process_mb = rss_mb()
    keys, queries, key_species = clustered_library(n_keys, n_queries)
    exact = topk_search(queries, keys, 5)[1]
    start = time.perf_counter()
    index = approximate_faiss_index(keys)
    build_s = time.perf_counter() - start
    nlist = faiss.extract_index_ivf(index).nlist
    del keys
    gc.collect()
    rows = []
    for nprobe in nprobes:
        faiss.extract_index_ivf(index).nprobe = nprobe
        faiss_search(queries[:16], index, 5)  # warm-up
        start = time.perf_counter()
        _, found = faiss_search(queries, index, 5)
        rate = n_queries / (time.perf_counter() - start)
        top1 = (found[:, 0] == exact[:, 0]).float().mean().item()
        same_species = (key_species[found[:, 0]] == key_species[exact[:, 0]]).float().mean().item()
        top5 = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True)) / exact.numel()
        rows.append({"keys": n_keys, "nlist": nlist, "nprobe": nprobe, "qps": rate, "recall1": top1, "recall5": top5,
                     "species": same_species, "rss_mb": rss_mb(), "process_mb": process_mb, "build_s": build_s})
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, f"{tmp}/ivf.index")
        index_mb = os.path.getsize(f"{tmp}/ivf.index") / 2**20
        np.save(f"{tmp}/queries.npy", queries.numpy())
        del index
        gc.collect()
        for row in rows:
            result = subprocess.run([sys.executable, "-c", SEARCH_ONLY, f"{tmp}/ivf.index", f"{tmp}/queries.npy",
                                     str(row["nprobe"])], capture_output=True, text=True, check=True)
            row["alone_qps"], row["alone_peak_mb"] = (float(x) for x in result.stdout.split())
            row["index_mb"] = index_mb
    return rows


def bench_identify(model_dir: str, n: int) -> float:
    from clibd.data import read_records, shared_data_dir
    from clibd.identify import Identifier, identify_to_tsv
    from clibd.index import build_index

    records = read_records(shared_data_dir() / "insect_bold_coi" / "insect_bold_coi.tsv")
    keys, queries = records[: len(records) // 2], records[len(records) // 2 :][:n]
    with tempfile.TemporaryDirectory() as tmp:
        build_index(model_dir, keys, "dna", f"{tmp}/refs", progress=False)
        start = time.perf_counter()  # as `clibd identify --out` does: load, identify, write the TSV
        identify_to_tsv(Identifier.load(f"{tmp}/refs"), queries, f"{tmp}/preds.tsv")
        return len(queries) / (time.perf_counter() - start)


def bench_identify_photos(n: int) -> float:
    """Photos end to end with a paper-size image tower (ViT-B/16, random weights: speed does not
    depend on them): the 19 order-labelled BIOSCAN-1M photos as references, BIOSCAN photos as queries."""
    import csv

    from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
    from clibd.data import shared_data_dir
    from clibd.identify import Identifier, identify_to_tsv, image_records
    from clibd.index import build_index

    data = shared_data_dir()
    config = CLIBDConfig(modalities=["image", "dna"], image_config={"pretrained": False})
    with open(data / "bioscan1m_examples" / "images.csv", newline="") as f:
        refs = [{"id": r["image_file"], "order": r["order"], "family": "", "genus": "", "species": "", "dna": "",
                 "image": str(data / "bioscan1m_examples" / r["image_file"])} for r in csv.DictReader(f) if r["order"]]
    queries = image_records([str(data / "bioscan_imgfilter_images" / "images")])[:n]
    with tempfile.TemporaryDirectory() as tmp:
        CLIBDModel(config).save_pretrained(f"{tmp}/model")
        CLIBDProcessor.from_model_config(config).save_pretrained(f"{tmp}/model")
        build_index(f"{tmp}/model", refs, "image", f"{tmp}/refs", progress=False, calibrate=False)
        start = time.perf_counter()
        identify_to_tsv(Identifier.load(f"{tmp}/refs", batch_size=32), queries, f"{tmp}/preds.tsv")
        return len(queries) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--loop-queries", type=int, default=32)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--approximate", action="store_true",
                        help="also faiss IVF-SQ8 (approximate) over clustered synthetic keys, with recall")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--identify-model", help="a saved model: also time identify on shared barcodes")
    parser.add_argument("--identify-photos", type=int, default=0, help="also time identify on this many photos")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 768-d unit vectors, top-5")
    print("| keys | dtype | batched q/s | loop q/s | speed-up | library MB | search working MB | process RSS MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n_keys in args.keys:
        for name in args.dtypes:
            r = bench_search(n_keys, args.queries, getattr(torch, name), args.loop_queries)
            print(f"| {r['keys']:,} | {r['dtype']} | {r['batched']:.0f} | {r['loop']:.1f} | "
                  f"{r['batched'] / r['loop']:.1f}x | {r['library_mb']:.0f} | {r['rss_mb'] - r['rss_before_mb']:.0f} | "
                  f"{r['rss_mb']:.0f} |", flush=True)
    if args.approximate:
        print("\n| keys | cells | cells probed | q/s | recall@1 | recall@5 | same species as exact top-1 | "
              "index MB | process RSS MB (before the library) | build s | search-only process: q/s, peak RSS MB |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n_keys in args.keys:
            for r in bench_approximate(n_keys, args.queries, args.nprobe):
                print(f"| {r['keys']:,} | {r['nlist']} | {r['nprobe']} | {r['qps']:.0f} | {100 * r['recall1']:.1f} | "
                      f"{100 * r['recall5']:.1f} | {100 * r['species']:.1f} | {r['index_mb']:.0f} | "
                      f"{r['rss_mb']:.0f} ({r['process_mb']:.0f}) | {r['build_s']:.0f} | "
                      f"{r['alone_qps']:.0f}, {r['alone_peak_mb']:.0f} |",
                      flush=True)
    if args.identify_model:
        print(f"identify (barcodes, end to end): {bench_identify(args.identify_model, 2000):.0f} queries/s")
    if args.identify_photos:
        rate = bench_identify_photos(args.identify_photos)
        print(f"identify (photos, ViT-B/16 on CPU, end to end): {rate:.2f} queries/s")


if __name__ == "__main__":
    main()
