"""Writing single-modality index folders: build, add, recalibrate (read by `clibd.index.ReferenceIndex`).

Usage:
    index = build_index("runs/demo/best", records, modality="dna", out="refs/")
    index = add_to_index("refs/", read_records("new_species.fasta"))
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_directory, atomic_write_text
from .index import (
    BARCODES_FILE,
    RECORD_COLUMNS,
    ReferenceIndex,
    _calibrate,
    embed_in_shards,
    load_model,
    trained_species_meta,
    unusable,
)
from .index_store import read_index_meta
from .retrieval import launched_processes
from .species_check import calibrated_options, species_check_options
from .towers.parts import EmbeddingPart

logger = logging.getLogger(__name__)
SINGLE_MODALITIES = ("dna", "image")  # what a single-modality index folder holds


def _write_index(directory: Path, meta: dict, embeddings: torch.Tensor, records: list[dict],
                 skipped: list[tuple[str, str]] | None = None) -> None:
    """Write all files into a temporary folder, then swap it into place; `skipped.tsv` lists the
    records the last build or add left out (`on_bad_input="skip"`) and why."""
    with atomic_directory(directory) as tmp:
        if skipped:
            with open(tmp / "skipped.tsv", "w", newline="") as f:
                f.write("id\treason\n" + "".join(f"{i}\t{' '.join(why.split())}\n" for i, why in skipped))
        save_file({meta["modality"]: embeddings.to(torch.float16).contiguous()}, tmp / "embeddings.safetensors")
        write_records(tmp / "records.tsv", records)
        if meta["modality"] == "dna":
            write_barcodes(tmp / BARCODES_FILE, records)
        # a new id for every write of the embeddings: what a persisted faiss file is keyed to
        (tmp / "index.json").write_text(json.dumps({**meta, "count": len(records), "build_id": uuid.uuid4().hex},
                                                   indent=2))


def write_records(path: Path, records: Sequence[dict]) -> None:
    """`records` as a TSV of `RECORD_COLUMNS` (an index's or library's records.tsv, taxa.tsv).

    Usage:
        write_records(tmp / "records.tsv", records)
    """
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_COLUMNS, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: r.get(c, "") for c in RECORD_COLUMNS} for r in records)


def write_barcodes(path: Path, records: Sequence[dict]) -> None:
    """Each record's id and barcode ("" where unknown: records an older clibd kept no barcode of) as
    `BARCODES_FILE`, what the species check aligns with; no file where no record has one.

    Usage:
        write_barcodes(tmp / BARCODES_FILE, dna_key_records)
    """
    if not any(r.get("dna") for r in records):
        return
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "dna"])
        writer.writerows([r["id"], r.get("dna", "")] for r in records)


def _screen(records: list[dict], modality: str, existing: Sequence[dict], skip: bool
            ) -> tuple[list[dict], list[tuple[str, str]]]:
    """(records that can be indexed, (id, why) of those that cannot: `unusable`). Without `skip`,
    a `ValueError` naming them."""
    found = unusable(records, modality, {r["id"] for r in existing}, labelled=True)
    skipped = [(records[i]["id"], why) for i, why in found.items()]
    refuse_unindexable(skipped, skip)
    return [{**r, "source": r.get("source", "")} for i, r in enumerate(records) if i not in found], skipped


def refuse_unindexable(skipped: list[tuple[str, str]], skip: bool) -> None:
    """Unless `skip`, a `ValueError` naming the (id, why) records that cannot be indexed (the first ten).

    Usage:
        refuse_unindexable([("BOLD-1", "no dna")], skip=False)   # ValueError: 1 records cannot be indexed: ...
    """
    if skipped and not skip:
        shown = "; ".join(f"{i}: {why}" for i, why in skipped[:10])
        raise ValueError(f"{len(skipped)} records cannot be indexed: {shown} (or skip them: --on-bad-input skip, "
                         "on_bad_input='skip')")


def _drop_failures(records: list[dict], embeddings: torch.Tensor, failures: dict[int, str],
                   skipped: list[tuple[str, str]]) -> tuple[list[dict], torch.Tensor]:
    """The records and embeddings left once those that could not be embedded are dropped (and
    added to `skipped`, with a warning)."""
    if not failures:
        return records, embeddings
    skipped += [(records[i]["id"], why) for i, why in sorted(failures.items())]
    logger.warning("%d records could not be embedded and are not indexed (listed in skipped.tsv): %s",
                   len(failures), "; ".join(f"{records[i]['id']}: {why}" for i, why in list(failures.items())[:5]))
    keep = [i for i in range(len(records)) if i not in failures]
    return [records[i] for i in keep], embeddings[keep]


def _store_calibration(meta: dict, embeddings: torch.Tensor, records: list[dict], parts: list[EmbeddingPart],
                       directory: Path) -> dict:
    """`meta` with the library's thresholds and how each was set; warns where one is not learned
    from both right and wrong answers (e.g. a library with one reference per species)."""
    calibration = _calibrate(embeddings, records, parts, meta.get("precision"), meta.get("trained_species"))
    for line in calibration.warnings():
        logger.warning("%s: threshold for %s", directory, line)
    meta = {**meta, "thresholds": calibration.thresholds, "calibration": calibration.methods,
            "precision_curves": calibration.curves, "margin_weights": calibration.margin_weights,
            "calibration_sample": calibration.sample, "precision_confidence": calibration.confidence_level}
    if meta["modality"] == "dna":
        meta["species_check"] = calibrated_options(embeddings, records, parts, directory, meta.get("species_check", {}))
    return meta


def _finish(directory: Path, meta: dict, parts: list[EmbeddingPart], embeddings: torch.Tensor,
            records: list[dict], calibrate: bool, work_dir: Path, skipped: list[tuple[str, str]],
            processes=None) -> ReferenceIndex:
    """Store the parts (and thresholds, if asked), write the index, drop the build's shards. Under
    several processes (`accelerate launch`) the main one writes and the others wait for it."""
    if not records:
        raise ValueError(f"{directory}: no record could be indexed ({len(skipped)} skipped, e.g. {skipped[:3]})")
    if processes is None or processes.is_main_process:
        meta = {**meta, "parts": [part.to_dict() for part in parts]}
        if calibrate:
            meta = _store_calibration(meta, embeddings, records, parts, directory)
        _write_index(directory, meta, embeddings, records, skipped)
        shutil.rmtree(work_dir, ignore_errors=True)
    if processes is not None:
        processes.wait_for_everyone()
    return ReferenceIndex.load(directory)


def build_index(model_dir: str | os.PathLike, records: list[dict], modality: str | Sequence[str],
                out: str | os.PathLike,
                batch_size: int = 256, calibrate: bool = True, progress: bool = True,
                on_bad_input: str = "error", precision: float | None = None,
                species_check: bool | dict = True) -> ReferenceIndex:
    """Embed labelled records with the model saved in `model_dir` into a new index at `out`.
    `on_bad_input`: "error" refuses records that cannot be indexed (naming them); "skip" leaves
    them out, warns and lists them in the index's `skipped.tsv`. `precision`: thresholds set so
    that answers are right at least that often on species held out at calibration (`clibd.novelty`);
    None: thresholds that best separate right from wrong answers. Kept for `add_to_index`.
    `species_check`: a DNA index keeps its barcodes and decides the species by alignment where
    alignment can (`clibd.species_check`); a dict sets its options (`identity_cutoff`,
    `candidates`, `novel_named`, `margin_weight`), kept by `add_to_index` and `recalibrate_index`; False: the
    embedding alone decides, as before.
    Several modalities (e.g. ["image", "dna", "text"]): a multi-modal library
    (`clibd.library_build.build_library`, which this returns; `species_check` is its DNA keys').

    Usage:
        index = build_index("runs/demo/best", read_records("refs.tsv"), "dna", "refs/")
    """
    check_index_out(out)  # before the model is loaded or anything embedded
    if not isinstance(modality, str):  # several key modalities (or text): a multi-modal library
        if len(modality) != 1 or modality[0] == "text":
            from .library_build import build_library

            return build_library(model_dir, records, list(modality), out, batch_size, calibrate, progress,
                                 on_bad_input, precision, species_check)
        modality = modality[0]
    if modality not in SINGLE_MODALITIES:
        raise ValueError(f"a single-modality index holds {' or '.join(SINGLE_MODALITIES)} embeddings, not "
                         f"{modality!r} (text keys: a multi-modal library, e.g. modality=['dna', 'text'])")
    skip = _skip(on_bad_input)
    out = Path(out)
    records, skipped = _screen(records, modality, [], skip)
    model, processor, digest = load_model(model_dir)
    work_dir, processes = out.with_name(f".{out.name}.partial"), launched_processes()
    embeddings, failures = embed_in_shards(model, processor, records, modality, work_dir, batch_size, progress, skip,
                                           processes)
    records, embeddings = _drop_failures(records, embeddings, failures, skipped)
    meta = {"clibd_version": __version__, "model": str(Path(model_dir).resolve()), "model_hash": digest,
            "modality": modality, "dim": int(embeddings.shape[1]), "precision": _checked_precision(precision),
            "species_check": species_check_options(species_check), **trained_species_meta(model)}
    return _finish(out, meta, model.embedding_parts(modality), embeddings, records, calibrate, work_dir, skipped,
                   processes)


def check_index_out(out: str | os.PathLike) -> None:
    """A `ValueError` when `out` holds anything but a clibd index: a build replaces its `out` whole
    (`atomic_directory`), so a mistyped `--out` (the records file, a folder of photos) would be lost.
    An absent path, an empty folder and an index (rebuilt) are fine.

    Usage:
        check_index_out("refs/")
    """
    out = Path(out).resolve() if Path(out).is_symlink() else Path(out)  # a link: what it names is replaced
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if out.is_dir():
        try:
            read_index_meta(out)
            return
        except FileNotFoundError:
            what = "a folder that is not a clibd index (no index.json)"
        except (OSError, ValueError):  # damaged, or not a clibd index's: nothing says which
            what = "a folder whose index.json does not read as a clibd index's (if it is a damaged index, remove it)"
    else:
        what = "a file"
    raise ValueError(f"{out}: is {what}; building an index there would replace it: give a new or empty folder "
                     "(or an index to rebuild)")


def _checked_precision(precision: float | None) -> float | None:
    if precision is not None and not 0 < precision < 1:
        raise ValueError(f"precision must be between 0 and 1 (e.g. 0.95), got {precision}")
    return precision


def _skip(on_bad_input: str) -> bool:
    if on_bad_input not in ("error", "skip"):
        raise ValueError(f"on_bad_input must be 'error' or 'skip', got {on_bad_input!r}")
    return on_bad_input == "skip"


def add_to_index(directory: str | os.PathLike, records: list[dict], replace: bool = False,
                 batch_size: int = 256, recalibrate: bool = True, progress: bool = True,
                 on_bad_input: str = "error") -> ReferenceIndex:
    """Embed new labelled records with the index's own model and add them (new species included).
    An index written before parts were stored is rewritten with the model's parts.
    `recalibrate=False` keeps every calibration as it was (thresholds, a library's pairs, the
    species check), learnt without the new records, until `recalibrate_index` (e.g. after adding
    in several batches); `on_bad_input` as in `build_index`.

    Usage:
        index = add_to_index("refs/", read_records("new_species.fasta"))
    """
    if "modalities" in read_index_meta(Path(directory)):  # a multi-modal library
        from .library_build import add_to_library

        return add_to_library(directory, records, replace, batch_size, recalibrate, progress, on_bad_input)
    index, skip = ReferenceIndex.load(directory), _skip(on_bad_input)
    kept_records, kept = index.records_with_barcodes(), index.embeddings
    if replace:
        incoming = {r["id"] for r in records}
        mask = torch.tensor([r["id"] not in incoming for r in index.records], dtype=torch.bool)
        kept_records = [r for r in kept_records if r["id"] not in incoming]
        kept = index.embeddings[mask]
    records, skipped = _screen(records, index.modality, kept_records, skip)
    model, processor = index.load_model()
    work_dir, processes = Path(directory).with_name(f".{Path(directory).name}.partial"), launched_processes()
    new, failures = embed_in_shards(model, processor, records, index.modality, work_dir, batch_size, progress, skip,
                                    processes)
    records, new = _drop_failures(records, new, failures, skipped)
    embeddings = torch.cat([kept, new])
    meta = {k: v for k, v in index.meta.items() if k != "novelty_dim"}  # legacy: the parts replace it
    return _finish(Path(directory), meta, model.embedding_parts(index.modality), embeddings, kept_records + records,
                   recalibrate, work_dir, skipped, processes)


def recalibrate_index(directory: str | os.PathLike, precision: float | None = None) -> ReferenceIndex:
    """Calibrate an index's thresholds again with this clibd (no model needed: the embeddings and
    labels are in the folder) and store them; `precision` as in `build_index` (None: the index's own).
    Only `index.json` is rewritten (atomically): the embeddings, records and any persisted faiss
    file stay as they are.

    Usage:
        index = recalibrate_index("refs/")
    """
    if "modalities" in read_index_meta(Path(directory)):  # a multi-modal library
        from .library_build import recalibrate_library

        return recalibrate_library(directory, precision)
    index = ReferenceIndex.load(directory)
    meta = {k: v for k, v in index.meta.items() if k != "novelty_dim"}
    meta["precision"] = _checked_precision(precision) if precision is not None else meta.get("precision")
    records = index.records_with_barcodes()
    meta = _store_calibration(meta, index.embeddings, records, index.parts, index.directory)
    meta["parts"] = [part.to_dict() for part in index.parts]
    atomic_write_text(index.directory / "index.json", json.dumps(meta, indent=2))
    return ReferenceIndex.load(directory)
