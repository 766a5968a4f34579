"""Writing multi-modal reference libraries (`clibd.library`): build, add, recalibrate.

Each record is embedded for every key modality it carries (a photo: an image key; a barcode: a
DNA key); text keys are the distinct taxa of the records at every rank. Then every (query, keys)
pair the library can calibrate is calibrated (`clibd.pair_calibration`) and stored with the IS+DU
threshold, and the folder is written atomically. The DNA keys' barcodes are kept (`barcodes.tsv`,
id and dna in DNA key order, as a DNA index keeps its own) and their species check
(`clibd.species_check`) is calibrated on them and stored under `keys.dna.species_check` in
`index.json`, so DNA queries against the DNA keys are settled by alignment where they can be.

Usage:
    library = build_library("runs/tiny", records, ["image", "dna", "text"], "refs/")
    library = add_to_library("refs/", more_records)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_directory, atomic_write_text
from .checked_embedding import embed_checked
from .constants import MODALITIES, RANKS
from .data.records import id_problem
from .index import (
    BARCODES_FILE,
    ReferenceIndex,
    embed_in_shards,
    load_model,
    trained_species_meta,
)
from .index_build import (
    _checked_precision,
    _skip,
    check_index_out,
    refuse_unindexable,
    write_barcodes,
    write_records,
)
from .library import ReferenceLibrary, key_meta, keys_name, pair_entry, pair_name, report_calibration
from .modeling_clibd import CLIBDModel
from .processing import CLIBDProcessor
from .processing.taxonomy import taxonomy_text
from .retrieval import launched_processes
from .species_check import calibrated_options, species_check_options
from .towers.parts import EmbeddingPart, whole

logger = logging.getLogger(__name__)
SPECIMEN_MODALITIES = ("image", "dna")  # key modalities embedded from a record's own photo / barcode


def taxon_keys(records: list[dict]) -> list[dict]:
    """One text-key record per distinct taxon at every rank (ranks below it empty), sorted; its id
    is the text the text tower reads ("Diptera Cecidomyiidae not_classified not_classified").

    Usage:
        taxon_keys([{"order": "Diptera", "family": "Culicidae", "genus": "", "species": ""}])
    """
    taxa = set()
    for record in records:
        for depth, rank in enumerate(RANKS):
            if record.get(rank):
                taxa.add(tuple(record.get(r, "") if i <= depth else "" for i, r in enumerate(RANKS)))
    return [{"id": taxonomy_text(dict(zip(RANKS, taxon, strict=True))), **dict(zip(RANKS, taxon, strict=True)),
             "source": "taxonomy", "dna": "", "image": ""} for taxon in sorted(taxa)]


def _screen(records: list[dict], modalities: list[str], known_ids: set[str], skip: bool
            ) -> tuple[list[dict], list[tuple[str, str]]]:
    """(usable records, (id, why) of the others): a reader's error, no taxonomy, none of the
    library's photo / barcode fields (a library without text keys), an id already held or repeated.
    Without `skip`, a `ValueError`."""
    # a library with text keys also takes records that are names only (a checklist): their taxa become keys
    fields = [m for m in SPECIMEN_MODALITIES if m in modalities] if "text" not in modalities else []
    kept, skipped, first = [], [], set()
    for record in records:
        record_id = record["id"]
        if record.get("error"):
            why = record["error"]
        elif problem := id_problem(record_id):
            why = problem
        elif not any(record.get(rank) for rank in RANKS):
            why = "no taxonomy"
        elif fields and not any(record.get(m) for m in fields):
            why = f"no {' or '.join(fields)}"
        elif record_id in known_ids:
            why = "id already in the index (use replace=True / --replace to overwrite it)"
        elif record_id in first:
            why = "duplicate record id (repeated)"
        else:
            why = None
        first.add(record_id)
        if why:
            skipped.append((record_id, why))
        else:
            kept.append({**record, "source": record.get("source", "")})
    refuse_unindexable(skipped, skip)
    return kept, skipped


def _embed_keys(model: CLIBDModel, processor: CLIBDProcessor, records: list[dict], offset: int, modality: str,
                work_dir: Path, batch_size: int, progress: bool, skip: bool, skipped: list
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 keys, record positions + `offset`) of the records that carry `modality`; those that
    cannot be embedded are added to `skipped` (their other keys stay)."""
    positions = [i for i, r in enumerate(records) if r.get(modality)]
    embeddings, failures = embed_in_shards(model, processor, [records[i] for i in positions], modality,
                                           work_dir / modality, batch_size, progress, skip, launched_processes())
    skipped += [(records[positions[i]]["id"], f"{modality}: {why}") for i, why in sorted(failures.items())]
    keep = [i for i in range(len(positions)) if i not in failures]
    return embeddings[keep].to(torch.float16), torch.tensor([positions[i] + offset for i in keep], dtype=torch.long)


def _check_towers(model: CLIBDModel, modalities: list[str]) -> None:
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown key modality {unknown}; a library holds {', '.join(MODALITIES)} keys")
    missing = [m for m in modalities if m not in model.config.modalities]
    if missing:
        raise ValueError(f"the model has no {' or '.join(missing)} tower (its towers: "
                         f"{', '.join(model.config.modalities)}): it cannot make {' or '.join(missing)} keys")


def build_library(model_dir: str | os.PathLike, records: list[dict], modalities: list[str], out: str | os.PathLike,
                  batch_size: int = 256, calibrate: bool = True, progress: bool = True, on_bad_input: str = "error",
                  precision: float | None = None, species_check: bool | dict = True) -> ReferenceLibrary:
    """Embed labelled records into a new library at `out` with keys of every modality in
    `modalities` (image, dna, text); other arguments as `clibd.index.build_index`, whose
    `species_check` (True, options, or False) is that of the DNA keys (kept by add and recalibrate).

    Usage:
        library = build_library("runs/tiny", read_records("refs.tsv"), ["image", "dna", "text"], "refs/")
    """
    check_index_out(out)
    model, processor, digest = load_model(model_dir)
    modalities = keys_name(modalities).split()
    _check_towers(model, modalities)
    check = species_check_options(species_check)  # bad options raise before anything is embedded
    if species_check is not True and "dna" not in modalities:
        logger.warning("%s: the library has no DNA keys: the species check options are not used", out)
    records, skipped = _screen(records, modalities, set(), _skip(on_bad_input))
    meta = {"clibd_version": __version__, "model": str(Path(model_dir).resolve()), "model_hash": digest,
            "format": 2, "modalities": modalities, "modality": modalities[0],
            "dim": model.config.projection_dim, "precision": _checked_precision(precision),
            "keys": {m: {"parts": [p.to_dict() for p in model.embedding_parts(m)],
                         **({"species_check": check} if m == "dna" else {})} for m in modalities},
            **trained_species_meta(model)}
    keys = _new_keys(model, processor, records, 0, modalities, Path(out), batch_size, progress,
                     on_bad_input == "skip", skipped, known_taxa=set())
    return _finish(Path(out), meta, records, keys, skipped, calibrate)


def _new_keys(model, processor, records: list[dict], offset: int, modalities: list[str], out: Path,
              batch_size: int, progress: bool, skip: bool, skipped: list, known_taxa: set
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor | list[dict]]]:
    """Per key modality: (new keys, their record positions; for text: their taxon records)."""
    work_dir, keys = out.with_name(f".{out.name}.partial"), {}
    for modality in modalities:
        if modality == "text":
            taxa = [t for t in taxon_keys(records) if t["id"] not in known_taxa]
            embeddings = embed_checked(model, processor, taxa, "text", batch_size)[0] if taxa else \
                torch.empty(0, model.embedding_dim("text"))
            keys[modality] = (embeddings.to(torch.float16), taxa)
        else:
            keys[modality] = _embed_keys(model, processor, records, offset, modality, work_dir, batch_size,
                                         progress, skip, skipped)
    return keys


def add_to_library(directory: str | os.PathLike, records: list[dict], replace: bool = False, batch_size: int = 256,
                   recalibrate: bool = True, progress: bool = True, on_bad_input: str = "error") -> ReferenceLibrary:
    """Embed new labelled records with the library's own model and add their keys of every modality
    the library holds (new taxa get text keys). `replace`: records with an id already held replace it.

    Usage:
        library = add_to_library("refs/", read_records("new_species.tsv"))
    """
    library = ReferenceLibrary.load(directory)
    old = list(library.records)
    incoming = {r["id"] for r in records} if replace else set()
    kept_at = {i: n for n, i in enumerate(i for i, r in enumerate(old) if r["id"] not in incoming)}
    barcodes = _held_barcodes(library)
    kept_records = [{**old[i], "dna": barcodes[i]} if i in barcodes else old[i] for i in kept_at]
    keys = {}
    for modality, index in library.key_sets.items():
        if modality == "text":
            keys[modality] = (index.embeddings, list(index.records))
        else:
            owners = library.owners[modality].tolist()
            mask = [o in kept_at for o in owners]
            keys[modality] = (index.embeddings[torch.tensor(mask, dtype=torch.bool)],
                              torch.tensor([kept_at[o] for o in owners if o in kept_at], dtype=torch.long))
    new, skipped = _screen(records, library.modalities, {r["id"] for r in kept_records}, _skip(on_bad_input))
    model, processor = library.key_sets[library.modalities[0]].load_model()
    added = _new_keys(model, processor, new, len(kept_records), library.modalities, Path(directory), batch_size,
                      progress, on_bad_input == "skip", skipped, {t["id"] for t in keys.get("text", (None, []))[1]})
    for modality, (embeddings, rows) in added.items():
        before, before_rows = keys[modality]
        keys[modality] = (torch.cat([before, embeddings]),
                          before_rows + rows if modality == "text" else torch.cat([before_rows, rows]))
    if "text" in keys:  # a taxon whose last record was replaced or relabelled is no longer a key
        keys["text"] = _present_taxa(*keys["text"], kept_records + new)
    return _finish(Path(directory), dict(library.meta), kept_records + new, keys, skipped, recalibrate)


def _held_barcodes(library: ReferenceLibrary) -> dict[int, str]:
    """Record position -> barcode of the library's DNA keys ({}: no DNA keys, or a library from
    before barcodes were kept, whose keys then have none and so no species check)."""
    dna = library.key_sets.get("dna")
    if dna is None or not dna.barcodes:
        return {}
    return dict(zip(library.owners["dna"].tolist(), dna.barcodes, strict=True))


def _present_taxa(embeddings: torch.Tensor, taxa: list[dict], records: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """The text keys (embeddings, taxon records) of the taxa some record of `records` still names."""
    present = {taxon["id"] for taxon in taxon_keys(records)}
    keep = [i for i, taxon in enumerate(taxa) if taxon["id"] in present]
    return embeddings[torch.tensor(keep, dtype=torch.long)], [taxa[i] for i in keep]


def _in_memory(directory: Path, meta: dict, records: list[dict], keys: dict) -> ReferenceLibrary:
    key_sets, owners = {}, {}
    for modality, (embeddings, rows) in keys.items():
        key_records = rows if modality == "text" else [records[i] for i in rows.tolist()]
        owners[modality] = torch.full((len(rows),), -1) if modality == "text" else rows
        # no species check in memory: it reads the folder's barcodes.tsv, the keys' before this write
        own = {k: v for k, v in key_meta(meta, modality, len(key_records)).items() if k != "species_check"}
        key_sets[modality] = ReferenceIndex(directory, own, embeddings, key_records, key_name=modality)
    return ReferenceLibrary(directory, meta, records, key_sets, owners)


def calibrate_library(library: ReferenceLibrary, precision: float | None = None) -> dict:
    """`meta` entries `pairs` and `is_du`: every query modality the library has embeddings of
    (image, dna, their mean) against each key modality and all of them stacked.

    Usage:
        meta |= calibrate_library(ReferenceLibrary.load("refs/"), precision=0.95)
    """
    held = library.modalities
    queries = [m for m in ("image", "dna") if m in held] + (["image+dna"] if {"image", "dna"} <= set(held) else [])
    key_sets = [[m] for m in held] + ([held] if len(held) > 1 else [])
    pairs = {}
    for query in queries:
        for keys in key_sets:
            calibration = library.calibrate(query, keys, precision)
            report_calibration(library.directory, pair_name(query, keys), query, calibration)
            pairs[pair_name(query, keys)] = pair_entry(calibration)
    extra = {"pairs": pairs}
    if {"image", "dna"} <= set(held):
        extra["is_du"] = library.calibrate_is_du()
    return extra


def _finish(directory: Path, meta: dict, records: list[dict], keys: dict, skipped: list, calibrate: bool
            ) -> ReferenceLibrary:
    """Calibrate (if asked) and write the library. Under several processes (`accelerate launch`,
    which shared the embedding) the main one writes and the others wait for it."""
    if not records:
        raise ValueError(f"{directory}: no record could be indexed ({len(skipped)} skipped, e.g. {skipped[:3]})")
    processes = launched_processes()
    if processes is None or processes.is_main_process:
        _write_library(directory, meta, records, keys, skipped, calibrate)
    if processes is not None:
        processes.wait_for_everyone()
    return ReferenceLibrary.load(directory)


def _write_library(directory: Path, meta: dict, records: list[dict], keys: dict, skipped: list,
                   calibrate: bool) -> None:
    meta["keys"] = {m: {**meta["keys"].get(m, {}), "count": len(rows)} for m, (_, rows) in keys.items()}
    if calibrate:  # else the calibrations stay as they were, as a single index's do, until recalibrated
        meta = {k: v for k, v in meta.items() if k not in ("pairs", "is_du")}
        meta |= calibrate_library(_in_memory(directory, meta, records, keys), meta.get("precision"))
        if "dna" in keys:
            dna, rows = keys["dna"]
            meta["keys"]["dna"] = species_check_entry(directory, meta["keys"]["dna"], dna,
                                                      [records[i] for i in rows.tolist()])
    with atomic_directory(directory) as tmp:
        if skipped:
            with open(tmp / "skipped.tsv", "w", newline="") as f:
                f.write("id\treason\n" + "".join(f"{i}\t{' '.join(why.split())}\n" for i, why in skipped))
        tensors = {m: e.to(torch.float16).contiguous() for m, (e, _) in keys.items()}
        tensors |= {f"{m}.rows": rows.contiguous() for m, (_, rows) in keys.items() if m != "text"}
        save_file(tensors, tmp / "embeddings.safetensors")
        write_records(tmp / "records.tsv", records)
        if "text" in keys:
            write_records(tmp / "taxa.tsv", keys["text"][1])
        if "dna" in keys:  # as a DNA index: unknown ones ("") from an older library
            write_barcodes(tmp / BARCODES_FILE, [records[i] for i in keys["dna"][1].tolist()])
        (tmp / "index.json").write_text(json.dumps({**meta, "count": len(records), "build_id": uuid.uuid4().hex},
                                                   indent=2))
    shutil.rmtree(directory.with_name(f".{directory.name}.partial"), ignore_errors=True)


def species_check_entry(directory: Path, entry: dict, embeddings: torch.Tensor, records: list[dict]) -> dict:
    """The DNA keys' `index.json` entry with their species check calibrated on `records` (the DNA
    keys' records, each with its `dna`) with the options the entry keeps (`calibrated_options`);
    as it is where the check was asked to be left out (False).

    Usage:
        meta["keys"]["dna"] = species_check_entry(Path("refs"), meta["keys"]["dna"], dna_keys, dna_records)
    """
    if not records:  # no DNA key to calibrate it on (yet)
        return entry
    parts = [EmbeddingPart.from_dict(p) for p in entry["parts"]] if "parts" in entry else whole(embeddings.shape[1])
    return {**entry, "species_check": calibrated_options(embeddings, records, parts, directory,
                                                         entry.get("species_check", {}))}


def recalibrate_library(directory: str | os.PathLike, precision: float | None = None) -> ReferenceLibrary:
    """Calibrate every pair of a library again, and its DNA keys' species check (no model needed),
    and rewrite its `index.json` only.

    Usage:
        recalibrate_library("refs/", precision=0.95)
    """
    library = ReferenceLibrary.load(directory)
    meta = {k: v for k, v in library.meta.items() if k not in ("pairs", "is_du")}
    meta["precision"] = _checked_precision(precision) if precision is not None else meta.get("precision")
    library.meta = meta
    meta |= calibrate_library(library, meta["precision"])
    dna = library.key_sets.get("dna")
    if dna is not None:  # a library from before barcodes were kept: calibrated_options warns, stores no check
        meta["keys"] = {**meta["keys"], "dna": species_check_entry(library.directory, meta["keys"]["dna"],
                                                                   dna.embeddings, list(dna.records_with_barcodes()))}
    atomic_write_text(library.directory / "index.json", json.dumps(meta, indent=2))
    return ReferenceLibrary.load(directory)
