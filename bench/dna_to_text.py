"""Barcodes of species held out of training AND of the library, against taxon-name (text) keys:
how often the nearest name key has the right genus and family, next to the nearest DNA key.

    python bench/dna_to_text.py --model runs/demo/best --out /tmp/dna_text_refs

The split is the model's own (`<run>/splits`, the paper's split by species). Library: the DNA keys
of `seen_keys` and `val_unseen_keys`; text keys for every taxon of those records at every rank
plus, as a checklist of names, the genus and family (not the species) of every record of the
split. Queries: `test_unseen` barcodes, whose species are in neither training nor the keys (their
genus and family names are keys; their genus has DNA keys only where a congener was barcoded).
A thin driver over `clibd.library_build` and `clibd.identify`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets

from clibd.constants import RANKS
from clibd.identify import Identifier
from clibd.library_build import build_library


def _records(dataset: datasets.Dataset) -> list[dict]:
    return [dict(row) for row in dataset]


def accuracy(predictions, truths: list[dict], rank: str, where=lambda truth: True) -> tuple[float, int]:
    """(share of the queries (those `where` keeps) whose nearest key has their `rank` label, count)."""
    pairs = [(p.hits[0].taxonomy[rank], t[rank]) for p, t in zip(predictions, truths, strict=True)
             if t[rank] and where(t)]
    return (sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")), len(pairs)


def library_run(description: str, default_out: str) -> tuple[argparse.Namespace, datasets.DatasetDict]:
    """(arguments, the run's splits) of a bench that builds a library with a training run's model:
    --model, --splits, --out, --batch-size."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="runs/demo/best", help="a DNA + text CLIBD model folder of a training run")
    parser.add_argument("--splits", help="the run's splits folder (default: <model>/../splits)")
    parser.add_argument("--out", default=default_out, help="where the library is built")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    return args, datasets.load_from_disk(args.splits or str(Path(args.model).parent / "splits"))


def main() -> None:
    args, splits = library_run(__doc__.splitlines()[0], "dna_text_refs")
    keys = _records(splits["seen_keys"]) + _records(splits["val_unseen_keys"])
    everything = datasets.concatenate_datasets(list(splits.values()))
    names = {(r["order"], r["family"], r["genus"]) for r in everything if r["genus"]}
    checklist = [{"id": f"name-{i}", "order": o, "family": f, "genus": g, "species": "", "dna": "", "image": ""}
                 for i, (o, f, g) in enumerate(sorted(names))]
    library = build_library(args.model, keys + checklist, ["dna", "text"], args.out, batch_size=args.batch_size)
    queries = _records(splits["test_unseen"])
    identifier = Identifier.load(library.directory, batch_size=args.batch_size, progress=True)
    runs = {"DNA -> text (taxon names)": identifier.identify(queries, keys=["text"], query="dna", top_k=1),
            "DNA -> DNA": identifier.identify(queries, keys=["dna"], query="dna", top_k=1)}
    dna_genera = {r["genus"] for r in keys if r["genus"]}
    held = {r["species"] for r in queries} & {r["species"] for r in keys}
    print(f"{len(queries)} test_unseen barcodes of {len({r['species'] for r in queries})} species (in the keys: "
          f"{len(held)}); {len(library.key_sets['dna'].records)} DNA keys, {len(library.key_sets['text'].records)} "
          f"text keys; {sum(r['genus'] in dna_genera for r in queries)} queries have a congener among the DNA keys")
    print("| keys | genus right | family right | order right | genus right, genus with DNA keys | "
          "genus right, genus without |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, predictions in runs.items():
        cells = [accuracy(predictions, queries, rank) for rank in ("genus", "family", "order")]
        cells += [accuracy(predictions, queries, "genus", lambda t: t["genus"] in dna_genera),
                  accuracy(predictions, queries, "genus", lambda t: t["genus"] not in dna_genera)]
        print(f"| {name} | " + " | ".join(f"{100 * a:.1f} % (n={n})" for a, n in cells) + " |")
    deepest = _deepest(runs["DNA -> text (taxon names)"])
    print("nearest name key is a name of rank: " + ", ".join(f"{r} {n}" for r, n in zip(RANKS, deepest, strict=True)))


def _deepest(predictions) -> list[int]:
    """How many nearest name keys are order, family, genus and species names."""
    counts = dict.fromkeys(RANKS, 0)
    for p in predictions:
        filled = [rank for rank in RANKS if p.hits[0].taxonomy[rank]]
        counts[filled[-1]] += 1
    return [counts[rank] for rank in RANKS]


if __name__ == "__main__":
    main()
