"""Identify specimens against a reference index: one TSV row per query, streamed to disk.

Columns (fixed): query_id, order, family, genus, species, similarity, novel, then
order_support ... species_support (the fraction of the top-k references that agree with the
answer at that rank, like SINTAX's per-rank bootstrap), then novelty_similarity, then hit1_id,
hit1_species, hit1_similarity, ... for the top-k references. `similarity` is the best cosine,
which places the query; `novelty_similarity` is the best cosine on the part of the embedding
that scores novelty (the same number unless the model scores novelty apart:
`CLIBDModel.novelty_dim`). A query whose novelty similarity is below the index's species
threshold is `novel`; its answer stops at the deepest rank whose threshold its similarity clears,
deeper ranks are empty. Lines starting with `# ` are provenance.

Usage:
    identify("refs/", records, "preds.tsv", top_k=5)     # resumes if preds.tsv is partly written
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from . import __version__
from .data import records_to_dataset
from .evaluation.retrieval import embed_records
from .index import ReferenceIndex, model_hash
from .modeling_clibd import CLIBDModel
from .processing import RANKS, CLIBDProcessor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def prediction_columns(top_k: int) -> list[str]:
    hits = [f"hit{i}_{field}" for i in range(1, top_k + 1) for field in ("id", "species", "similarity")]
    return ["query_id", *RANKS, "similarity", "novel", *(f"{rank}_support" for rank in RANKS),
            "novelty_similarity", *hits]


def predict(similarities: list[float], indices: list[int], index: ReferenceIndex,
            novelty_similarity: float | None = None) -> dict[str, str]:
    """The answer for one query from its top-k references (nearest first) and its novelty
    similarity (`ReferenceIndex.novelty_similarity`; the best similarity when None)."""
    thresholds = index.thresholds
    best = index.records[indices[0]]
    novelty_similarity = similarities[0] if novelty_similarity is None else novelty_similarity
    row: dict[str, str] = {"similarity": f"{similarities[0]:.4f}", "novelty_similarity": f"{novelty_similarity:.4f}"}
    confident = True
    for rank in RANKS:
        threshold = thresholds.get(rank, float("nan"))
        score = novelty_similarity if rank == "species" else similarities[0]
        # A rank with no calibrated threshold (NaN) does not stop the answer.
        confident = confident and (math.isnan(threshold) or score >= threshold)
        label = best[rank] if confident else ""
        row[rank] = label
        agree = sum(index.records[j][rank] == best[rank] for j in indices)
        row[f"{rank}_support"] = f"{agree / len(indices):.2f}"
    species_threshold = thresholds.get("species", float("nan"))
    row["novel"] = str(not math.isnan(species_threshold) and novelty_similarity < species_threshold).lower()
    for i, (j, sim) in enumerate(zip(indices, similarities, strict=True), start=1):
        row[f"hit{i}_id"] = index.records[j]["id"]
        row[f"hit{i}_species"] = index.records[j]["species"]
        row[f"hit{i}_similarity"] = f"{sim:.4f}"
    return row


def image_records(paths: list[str]) -> list[dict[str, str]]:
    """Query records for photos: files as given, folders expanded to the image files inside."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return [{"id": str(p), "order": "", "family": "", "genus": "", "species": "", "dna": "", "image": str(p)}
            for p in files]


def _done_ids(path: Path) -> set[str]:
    """Ids already written to `path`; a last line cut by an interruption is removed first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, newline="") as f:
        rows = csv.reader((line for line in f if not line.startswith("# ")), delimiter="\t")
        next(rows, None)
        return {row[0] for row in rows if row}


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def identify(index_dir: str | os.PathLike, queries: list[dict[str, str]], out: str | os.PathLike | None = None,
             top_k: int = 5, batch_size: int = 256, progress: bool = True,
             model_dir: str | os.PathLike | None = None, backend: str = "torch") -> int:
    """Write predictions for `queries` (record schema) to `out` (stdout when None); return rows written.

    Rows are appended batch by batch and flushed, so a long run holds one batch in memory and an
    interrupted run, started again with the same `out`, skips the queries already written.
    `model_dir` overrides where the index says its model is (an index pulled from the Hub); its
    weights must be the ones that built the index.
    """
    index = ReferenceIndex.load(index_dir)
    model_dir = model_dir or index.meta["model"]
    if model_hash(model_dir) != index.meta["model_hash"]:
        raise ValueError(f"{model_dir} is not the model that built {index_dir} (weights hash differs)")
    field = "dna" if index.modality == "dna" else "image"
    missing = [q["id"] for q in queries if not q.get(field)]
    if missing:
        raise ValueError(f"this index holds {index.modality} references; {len(missing)} queries have no {field}, "
                         f"e.g. {missing[:5]}")
    model = CLIBDModel.from_pretrained(model_dir).eval()
    processor = CLIBDProcessor.from_pretrained(model_dir)
    columns = prediction_columns(min(top_k, len(index.records)))
    path = Path(out) if out is not None else None
    done = _done_ids(path) if path is not None else set()
    todo = [q for q in queries if q["id"] not in done]
    stream: TextIO = open(path, "a", newline="") if path is not None else sys.stdout  # noqa: SIM115
    try:
        if not done:
            thresholds = ", ".join(f"{r}={v:.4f}" for r, v in index.thresholds.items())
            stream.write(f"# clibd {__version__} identify; model {model_dir} "
                         f"(sha256 {index.meta['model_hash'][:16]}); index {Path(index_dir).resolve()} "
                         f"({index.meta['count']} {index.modality} references); thresholds {thresholds}\n")
        writer = csv.DictWriter(stream, fieldnames=columns, delimiter="\t", lineterminator="\n")
        if not done:
            writer.writeheader()
        written = 0
        for batch in tqdm(list(_batches(todo, batch_size)), desc="identify", disable=not progress):
            embeddings = embed_records(model, processor, records_to_dataset(batch), index.modality, batch_size)
            sims, idx = index.search(embeddings, top_k, backend=backend)
            novelty = (index.novelty_similarity(embeddings, backend) if index.novelty_dim < embeddings.shape[1]
                       else sims[:, 0])
            for query, s, i, n in zip(batch, sims.tolist(), idx.tolist(), novelty.tolist(), strict=True):
                writer.writerow({"query_id": query["id"], **predict(s, i, index, n)})
                written += 1
            stream.flush()
    finally:
        if path is not None:
            stream.close()
    return written

