"""DNA queries through a multi-modal library's DNA keys, with and without their species check.

    python bench/library_species_check.py --model runs/demo/best --out /tmp/library_check_refs

The split is the model's own (`<run>/splits`, the paper's split by species). Library: DNA + text
keys of `seen_keys` and `val_unseen_keys` (`clibd.library_build.build_library`, which calibrates
the DNA keys' species check). Queries: `test_seen` barcodes (species the keys hold) and
`test_unseen` barcodes (species neither trained on nor in the keys), identified against the DNA
keys (`--query dna --keys dna`) once with their barcodes (the check aligns the nearest keys) and
once from the same embeddings without them (the embedding alone, as libraries answered before).
Prints, per setting: species named right / named / left unnamed for the known-species queries,
and species named for the novel-species queries, and of those by alignment (a key at least the
cut-off identical: another species under 3 % apart, the alignment tools' own error). A thin driver over `clibd.identify`.
"""

from __future__ import annotations

from dna_to_text import library_run

from clibd.identify import Identifier
from clibd.library_build import build_library


def rates(predictions, known: list[dict], novel: list[dict], cutoff: float) -> dict[str, float]:
    """Shares (%) of the known-species queries named right / named / left unnamed, and of the novel
    ones named, and named by alignment (a key at least `cutoff` identical)."""
    known_p, novel_p = predictions[: len(known)], predictions[len(known):]
    right = sum(p.answer["species"] == q["species"] for p, q in zip(known_p, known, strict=True))
    aligned = sum(bool(p.answer["species"]) and (p.identity or 0.0) >= cutoff for p in novel_p)
    return {"known named right": 100 * right / len(known),
            "known named": 100 * sum(bool(p.answer["species"]) for p in known_p) / len(known),
            "known left unnamed": 100 * sum(not p.answer["species"] for p in known_p) / len(known),
            "novel named": 100 * sum(bool(p.answer["species"]) for p in novel_p) / len(novel),
            "novel named by alignment": 100 * aligned / len(novel)}


def main() -> None:
    args, splits = library_run(__doc__.splitlines()[0], "library_check_refs")
    keys = [dict(r) for name in ("seen_keys", "val_unseen_keys") for r in splits[name]]
    library = build_library(args.model, keys, ["dna", "text"], args.out, batch_size=args.batch_size)
    known, novel = [dict(r) for r in splits["test_seen"]], [dict(r) for r in splits["test_unseen"]]
    queries = known + novel
    identifier = Identifier.load(library.directory, batch_size=args.batch_size)
    plan = identifier.plan_for(queries, keys=["dna"], query="dna")
    embeddings = identifier.embed(queries, plan.query)
    ids, barcodes = [q["id"] for q in queries], [q["dna"] for q in queries]
    settings = {"with the species check": identifier.identify_embeddings(embeddings, ids, 5, plan, barcodes),
                "embedding alone": identifier.identify_embeddings(embeddings, ids, 5, plan)}
    check = library.key_sets["dna"].species_check
    print(f"{len(library.key_sets['dna'].records)} DNA keys; {len(known)} known-species and {len(novel)} "
          f"novel-species queries; check: {check}")
    columns = list(rates(settings["embedding alone"], known, novel, check.identity_cutoff))
    print("| setting | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name, predictions in settings.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in rates(predictions, known, novel, check.identity_cutoff).values()) + " |")


if __name__ == "__main__":
    main()
