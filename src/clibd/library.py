"""A multi-modal reference library: image, DNA and taxonomy-text keys in one index folder.

The folder (written by `clibd.library_build`) holds `embeddings.safetensors` with one fp16 tensor
per key modality (`image`, `dna`, `text`) and, for image and DNA, `<modality>.rows`: the position in
`records.tsv` of each key's record (records are shared by id; a record may have a photo, a barcode
or both). Text keys are taxa, not specimens: `taxa.tsv` lists them, one per distinct taxon at every
rank (a genus key reads "Diptera Cecidomyiidae Aedes not_classified", as the text tower is trained
to read a taxonomy with missing ranks). `index.json` has `modalities`, per key modality its parts
and count, and per (query, keys) pair its calibration (`pairs`, e.g. "image->dna"; stacked keys are
space-joined: "image->image dna"), and the IS+DU threshold (`is_du`). A folder written by
`clibd.index.build_index` (one modality) loads as a library of that one key set.

Two more key kinds are built on demand from the stored image and DNA keys, for the records that
have both (`combined`): `image+dna`, their normalised mean, and `image+dna-concat`, their
normalised concatenation (twice as wide), as `clibd.evaluation` builds its averaged and
concatenated features; their pairs are calibrated in memory when first asked for.

Usage:
    library = ReferenceLibrary.load("refs/")
    keys = library.keys(["image", "dna"])            # a ReferenceIndex over both, stacked
    thresholds, curves = library.calibration("image", "dna")
    mean_keys = library.keys(["image+dna"])          # built from the image and DNA keys, once
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .constants import KEY_KINDS, MODALITIES
from .index import ReferenceIndex, _calibrate
from .index_store import RecordTable, map_embeddings, read_index_meta
from .novelty import Calibration
from .pair_calibration import calibrate_is_du, calibrate_pair
from .towers.parts import EmbeddingPart, whole

logger = logging.getLogger(__name__)

KEY_MODALITIES = MODALITIES  # what a library may hold keys of
# a record's photo and barcode embeddings joined, as `clibd.evaluation.pairs` joins them: the normalised
# mean ("averaged", as wide as each) or the normalised concatenation ("concatenated", twice as wide)
MEAN, CONCAT = "image+dna", "image+dna-concat"
COMBINED = (MEAN, CONCAT)


def keys_name(modalities: Sequence[str]) -> str:
    """The canonical name of a key set: its kinds in `KEY_KINDS` order, space-joined.

    Usage:
        keys_name(["dna", "image"])   # "image dna"
    """
    return " ".join(m for m in KEY_KINDS if m in modalities)


def feature_parts(kind: str) -> list[str]:
    """The tower embeddings a query or key kind is made of: ["image", "dna"] for the combined kinds.

    Usage:
        feature_parts("image+dna")   # ["image", "dna"]
    """
    return ["image", "dna"] if kind in COMBINED else [kind]


def combine(image: torch.Tensor, dna: torch.Tensor, kind: str) -> torch.Tensor:
    """The combined feature of L2-normalised photo and barcode embeddings, as the evaluation builds it
    (`clibd.evaluation.retrieval.EmbeddingCache`): normalise(image + dna) or normalise([image, dna]).

    Usage:
        combine(image_embeddings, dna_embeddings, "image+dna-concat")   # [N, 2D]
    """
    joined = image + dna if kind == MEAN else torch.cat([image, dna], dim=1)
    return F.normalize(joined, dim=-1)


def pair_entry(calibration: Calibration) -> dict:
    """A (query, keys) pair's calibration as index.json keeps it under "pairs" (`ReferenceLibrary.pair_rule`).

    Usage:
        meta["pairs"]["image->dna"] = pair_entry(library.calibrate("image", ["dna"]))
    """
    return {"thresholds": calibration.thresholds, "calibration": calibration.methods,
            "precision_curves": calibration.curves, "margin_weights": calibration.margin_weights,
            "counts": {rank: list(count) for rank, count in calibration.counts.items()}, "sample": calibration.sample,
            "precision_confidence": calibration.confidence_level}


def report_calibration(directory: Path, name: str, query: str, calibration: Calibration) -> None:
    """Log what a pair's calibration could not learn: one-sided ranks (common among a library's
    many pairs: info), too few species new to the model and a pair with nothing to learn from (warnings).

    Usage:
        report_calibration(library.directory, "image->dna", "image", calibration)
    """
    for line in calibration.warnings():
        log = logger.warning if line == calibration.sample_warning() else logger.info
        log("%s: %s: threshold for %s", directory, name, line)
    if all(method == "none" for method in calibration.methods.values()):
        logger.warning("%s: %s: no record has both a %s embedding and keys to match it against: identify answers no "
                       "rank for this pair (its nearest keys are still listed)", directory, name, query)


def pair_name(query: str, keys: Sequence[str] | str) -> str:
    """How `index.json` names a (query, keys) calibration: "image->dna", "image+dna->image dna".

    Usage:
        pair_name("image", ["image", "dna"])   # "image->image dna"
    """
    return f"{query}->{keys if isinstance(keys, str) else keys_name(keys)}"


@dataclass
class ReferenceLibrary:
    """The key sets of an index folder (one `ReferenceIndex` per key modality) and the records they share.

    Usage:
        library = ReferenceLibrary.load("refs/"); library.modalities   # ["image", "dna", "text"]
    """

    directory: Path
    meta: dict
    records: Sequence[dict[str, str]]  # the specimens (text keys' taxa are in key_sets["text"].records)
    key_sets: dict[str, ReferenceIndex]
    owners: dict[str, torch.Tensor] = field(default_factory=dict)  # key modality -> record position per key
    _stacks: dict = field(default_factory=dict, repr=False)
    _calibrations: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceLibrary:
        """Read a library folder, or a single-modality index folder as a library of one key set.

        Usage:
            library = ReferenceLibrary.load("refs/")
        """
        directory = Path(directory)
        meta = read_index_meta(directory)
        if "modalities" not in meta:
            return cls.of_index(ReferenceIndex.load(directory))
        records = RecordTable.read(directory / "records.tsv")
        if len(records) != meta["count"]:
            raise ValueError(f"{directory}: {len(records)} records, index.json says {meta['count']}: "
                             "the index is damaged")
        key_sets, owners = {}, {}
        path = directory / "embeddings.safetensors"
        for modality in meta["modalities"]:
            embeddings = map_embeddings(path, modality)
            if modality == "text":
                key_records, owners[modality] = RecordTable.read(directory / "taxa.tsv"), None
            else:
                with safe_open(path, framework="pt") as f:
                    owners[modality] = f.get_tensor(f"{modality}.rows").long()
                key_records = records.take(owners[modality].tolist())
            if len(key_records) != embeddings.shape[0]:
                raise ValueError(f"{directory}: {len(key_records)} {modality} keys listed, {embeddings.shape[0]} "
                                 "embeddings: the index is damaged")
            key_sets[modality] = ReferenceIndex(directory, key_meta(meta, modality, len(key_records)), embeddings,
                                                key_records, key_name=modality)
        owners = {m: o if o is not None else torch.full((len(key_sets[m].records),), -1) for m, o in owners.items()}
        return cls(directory, meta, records, key_sets, owners)

    @classmethod
    def of_index(cls, index: ReferenceIndex) -> ReferenceLibrary:
        """A single-modality index as a library: its one key set, each key its own record.

        Usage:
            library = ReferenceLibrary.of_index(ReferenceIndex.load("refs_dna/"))
        """
        return cls(index.directory, index.meta, index.records, {index.modality: index},
                   {index.modality: torch.arange(len(index.records))})

    @property
    def modalities(self) -> list[str]:
        """The key modalities held, in `MODALITIES` order.

        Usage:
            library.modalities   # ["image", "dna", "text"]
        """
        return [m for m in MODALITIES if m in self.key_sets]

    @property
    def is_library(self) -> bool:
        """Whether the folder is a multi-modal library (not a single-modality index).

        Usage:
            if library.is_library: print(library.meta["modalities"])
        """
        return "modalities" in self.meta

    def require(self, modalities: Sequence[str]) -> None:
        """A `ValueError` naming key kinds that are unknown, stacked where they cannot be, or not
        held by this library; nothing is built.

        Usage:
            library.require(["image", "dna"])
        """
        unknown = [m for m in modalities if m not in KEY_KINDS]
        if unknown:
            raise ValueError(f"unknown key kind {unknown}; keys are {', '.join(KEY_KINDS)}")
        if any(m in COMBINED for m in modalities) and len(set(modalities)) > 1:
            raise ValueError(f"{' '.join(modalities)}: combined image+dna keys are searched alone, not stacked "
                             "with other keys")
        missing = sorted({p for m in modalities for p in feature_parts(m) if p not in self.key_sets},
                         key=MODALITIES.index)
        if missing:
            raise ValueError(f"{self.directory}: holds no {' or '.join(missing)} keys (it holds "
                             f"{', '.join(self.modalities)}); build it with --modality {' '.join(missing)} "
                             "or choose other --keys")

    def keys(self, modalities: Sequence[str]) -> ReferenceIndex:
        """The key set of one modality, or several stacked into one (the paper's "all"): their
        embeddings concatenated (a copy, made once), their records one after the other. A combined
        kind (`image+dna`, `image+dna-concat`) is built from the image and DNA keys (`combined`).

        Usage:
            index = library.keys(["image", "dna"]); index.embeddings.shape   # [image + dna keys, D]
        """
        self.require(modalities)
        name = keys_name(modalities)
        if name in COMBINED:
            return self.combined(name)
        if len(name.split()) == 1:
            return self.key_sets[name]
        if name not in self._stacks:
            parts = [self.key_sets[m] for m in name.split()]
            embeddings = torch.cat([p.embeddings for p in parts])
            records = [record for p in parts for record in p.records]
            meta = {**key_meta(self.meta, name, len(records)), "parts": [p.to_dict() for p in whole(embeddings.shape[1])]}
            self._stacks[name] = ReferenceIndex(self.directory, meta, embeddings, records,
                                                key_name="keys-" + name.replace(" ", "-"))
        return self._stacks[name]

    def _both(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image key row, DNA key row, record position) of every record with both, in DNA key order."""
        image_at = {int(r): i for i, r in enumerate(self.owners["image"].tolist())}
        both = [(image_at[int(r)], j, int(r)) for j, r in enumerate(self.owners["dna"].tolist()) if int(r) in image_at]
        if not both:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        i, j, owner = (torch.tensor(column) for column in zip(*both, strict=True))
        return i, j, owner

    def combined(self, kind: str) -> ReferenceIndex:
        """The `image+dna` or `image+dna-concat` keys (`combine`) of the records that have an image
        and a DNA key, built once from the stored keys (float32: the same numbers the evaluation
        gets from them); their owners are in `key_owners([kind])`.

        Usage:
            library.combined("image+dna").embeddings      # [records with both, D]
        """
        if kind not in self._stacks:
            i, j, owner = self._both()
            image, dna = self.key_sets["image"].embeddings, self.key_sets["dna"].embeddings
            embeddings = combine(image[i].float(), dna[j].float(), kind)
            records = [self.records[int(r)] for r in owner.tolist()]
            meta = {**key_meta(self.meta, kind, len(records)), "parts": [p.to_dict() for p in whole(embeddings.shape[1])]}
            self._stacks[kind] = ReferenceIndex(self.directory, meta, embeddings, records,
                                                key_name="combined-" + kind.replace("+", "-"))  # not a stack's name
            self.owners[kind] = owner
        return self._stacks[kind]

    def key_owners(self, keys: Sequence[str]) -> torch.Tensor:
        """The record position of each row of `keys(keys)` (-1: a text key, which belongs to no record).

        Usage:
            owners = library.key_owners(["image", "dna"]); library.records[int(owners[0])]
        """
        self.keys(keys)
        return torch.cat([self.owners[m] for m in keys_name(keys).split()])

    def key_modality(self, keys: Sequence[str]) -> Callable[[int], str]:
        """Which kind each row of `keys(keys)` is (stacked keys follow `KEY_KINDS` order): a lookup
        made once per key set and called per hit (no key set checks per row).

        Usage:
            library.key_modality(["image", "dna"])(0)   # "image"
        """
        kinds = keys_name(keys).split()
        ends = list(accumulate(len((self.key_sets.get(kind) or self.keys([kind])).records) for kind in kinds))

        def kind_of(row: int) -> str:
            if not 0 <= row < ends[-1]:
                raise IndexError(row)
            return kinds[bisect_right(ends, row)]

        return kind_of

    def calibration(self, query: str, keys: Sequence[str]) -> tuple[dict[str, float], dict[str, list]]:
        """(thresholds, precision curves) for `query` embeddings against `keys` (`pair_rule`).

        Usage:
            thresholds, curves = library.calibration("image", ["dna"])
        """
        thresholds, curves, _ = self.pair_rule(query, keys)
        return thresholds, curves

    def margin_weights(self, query: str, keys: Sequence[str]) -> dict[str, float]:
        """Per placing rank, the taxon margin's weight in the confidence of `query` against `keys`
        (`clibd.novelty.rank_confidence`; `pair_rule`); {}: the similarity alone.

        Usage:
            weights = library.margin_weights("dna", ["dna"])   # {"order": 0.0, "family": 2.0, "genus": 0.5}
        """
        return self.pair_rule(query, keys)[2]

    def calibration_sample(self, query: str, keys: Sequence[str]) -> dict:
        """What the calibration of `query` against `keys` held out (`clibd.novelty.CalibrationSample.to_dict`;
        {} for a calibration from before it was recorded).

        Usage:
            library.calibration_sample("dna", ["dna"]).get("untrained_only")   # True: new species only
        """
        return self._rule(query, keys).get("sample", {})

    def precision_confidence(self, query: str, keys: Sequence[str]) -> float | None:
        """How sure the stated precision of `query` against `keys` was borne out at calibration
        (`clibd.thresholds.precision_threshold`); None without a stated precision, or where the
        calibration did not record it (made by an earlier clibd: `clibd index recalibrate` records it).

        Usage:
            library.precision_confidence("dna", ["dna"])   # 0.95
        """
        if self.meta.get("precision") is None:
            return None
        return self._rule(query, keys).get("precision_confidence")

    def pair_rule(self, query: str, keys: Sequence[str]) -> tuple[dict[str, float], dict[str, list], dict[str, float]]:
        """(thresholds, precision curves, margin weights) for `query` embeddings against `keys`: as
        stored in the folder, else calibrated now on the library (in memory, with a log line:
        `clibd index recalibrate` stores the pairs `clibd.library_build.calibrate_library` lists).

        Usage:
            thresholds, curves, weights = library.pair_rule("dna", ["dna"])
        """
        rule = self._rule(query, keys)
        return rule["thresholds"], rule.get("precision_curves", {}), rule.get("margin_weights", {})

    def _rule(self, query: str, keys: Sequence[str]) -> dict:
        """A pair's calibration as index.json keeps it (`pair_entry`): stored, a single-modality
        index's own, or calibrated now (kept in memory)."""
        name = pair_name(query, keys)
        stored = self.meta.get("pairs", {}).get(name)
        if stored is not None:
            return stored
        if not self.is_library and query == keys_name(keys):  # a single-modality index's own thresholds
            index = self.key_sets[query]
            return {"thresholds": index.thresholds, "precision_curves": index.precision_curves,
                    "margin_weights": index.margin_weights, "sample": index.meta.get("calibration_sample", {}),
                    "precision_confidence": index.meta.get("precision_confidence")}
        if name not in self._calibrations:
            logger.info("%s: no stored calibration for %s: calibrating it now", self.directory, name)
            self._calibrations[name] = self.calibrate(query, keys, self.meta.get("precision"))
            report_calibration(self.directory, name, query, self._calibrations[name])
        return pair_entry(self._calibrations[name])

    def query_embeddings(self, query: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The library's own embeddings in a query kind, with each one's record position (combined
        kinds: for records with both, as `combined`; text: the taxon keys, position -1).

        Usage:
            embeddings, owners = library.query_embeddings("image+dna")
        """
        dim = self.key_sets[self.modalities[0]].embeddings.shape[1]
        if not set(feature_parts(query)) <= set(self.key_sets):  # no such embeddings here: nothing to calibrate on
            return torch.empty(0, dim), torch.empty(0, dtype=torch.long)
        index = self.keys([query])
        return index.embeddings.float(), self.key_owners([query])

    def calibrate(self, query: str, keys: Sequence[str], precision: float | None = None) -> Calibration:
        """Calibrate (query, keys) on the library (`clibd.pair_calibration`; same-modality keys as
        a single-modality index is, novelty parts included). Text queries are the taxon keys (a
        taxon's name asked for its specimens).

        Usage:
            calibration = library.calibrate("image", ["dna"], precision=0.95)
        """
        name = keys_name(keys)
        if query == name and name in self.key_sets:
            index = self.key_sets[name]
            return _calibrate(index.embeddings, index.records, index.parts, precision, self.meta.get("trained_species"))
        key_set, queries = self.keys(keys), self.query_embeddings(query)
        owners = self.key_owners(keys)
        records = self.records if self.is_library else self.key_sets[self.modalities[0]].records
        if query == "text" and "text" in self.key_sets:
            query_records = list(self.key_sets["text"].records)
        else:
            query_records = [records[int(i)] for i in queries[1].tolist()]
        return calibrate_pair(queries[0], query_records, queries[1].tolist(), key_set.embeddings, key_set.records,
                              owners.tolist(), precision=precision, trained_species=self.meta.get("trained_species"),
                              text_queries=query == "text")

    def is_du_threshold(self) -> float:
        """The IS+DU threshold stored in the folder, else calibrated now (`calibrate_is_du`).

        Usage:
            threshold = library.is_du_threshold()
        """
        self.require(["image", "dna"])
        if "is_du" not in self.meta:
            self.meta["is_du"] = self.calibrate_is_du()
        return self.meta["is_du"]["threshold"]

    def calibrate_is_du(self) -> dict:
        """`clibd.pair_calibration.calibrate_is_du` on this library's photos and barcodes.

        Usage:
            library.meta["is_du"] = library.calibrate_is_du()   # {"threshold": ..., ...}
        """
        image, dna = self.key_sets["image"], self.key_sets["dna"]
        return calibrate_is_du(image.embeddings.float(), self.owners["image"].tolist(), image.embeddings,
                               self.owners["image"].tolist(), dna.embeddings, self.owners["dna"].tolist(),
                               self.records)


def key_meta(meta: dict, modality: str, count: int) -> dict:
    """The `meta` a library's key set carries as a `ReferenceIndex`: the model, its parts, count,
    (one modality) the calibration of its own modality's queries, and (DNA keys) their species
    check, which `ReferenceIndex.species_check` reads with the folder's `barcodes.tsv`.

    Usage:
        ReferenceIndex(directory, key_meta(meta, "dna", len(dna_records)), embeddings, dna_records)
    """
    own = meta.get("pairs", {}).get(f"{modality}->{modality}", {})
    keys = meta.get("keys", {}).get(modality, {})
    return {"model": meta["model"], "model_hash": meta["model_hash"], "modality": modality,
            "build_id": meta.get("build_id"), "count": count, "dim": meta.get("dim"),
            "parts": keys.get("parts", [EmbeddingPart("embedding", meta.get("dim", 0)).to_dict()]),
            "calibration": own.get("calibration", {}), "thresholds": own.get("thresholds", {}),
            "precision_curves": own.get("precision_curves", {}), "margin_weights": own.get("margin_weights", {}),
            **({"species_check": keys["species_check"]} if "species_check" in keys else {})}
