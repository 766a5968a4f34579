"""Identify specimens against a reference index: typed predictions, and the predictions TSV.

`Identifier` loads an index and the model that built it once (weights hash checked once) and
gives one `Prediction` per query. `similarity` is the best cosine, which places the query;
`novelty_similarity` is the best cosine on the parts of the embedding that score novelty (the
same number unless the tower declares parts that do not: `EmbeddingPart.scores_novelty`). A
query whose novelty similarity is below the index's species threshold is `novel`; its answer
stops at the deepest rank whose threshold its similarity clears, deeper ranks are empty. A DNA
index with a species check (`clibd.species_check`) first aligns a barcode with its nearest
references: one at least 97 % identical names the species (and the lineage), and the query is
not novel; the others are decided as above, with the check's own species threshold.

The TSV (`write_predictions_tsv`, `read_predictions_tsv`; `identify_to_tsv` streams and resumes):
a `# ` provenance line, then columns query_id, order, family, genus, species, similarity, novel,
order_support ... species_support (the fraction of the top-k references that agree with the
nearest one at that rank, like SINTAX's per-rank bootstrap), novelty_similarity, order_precision
... species_precision (the calibrated precision of the answer at that rank, empty where none is
given), identity (where the index has a species check, `clibd.species_check`: the alignment
identity of the reference that named the species, else the best among the nearest references),
identity_reference (that reference's id), error (why a query could not be identified; its other
columns are then empty), route (the key modality that answered: see `Prediction.route`), then
hit1_id, hit1_species, hit1_similarity, ... for the top-k references. The TSV functions live in
`clibd.predictions_tsv` (importable from here too).

A multi-modal library (`clibd.library`) is searched with any query modality against any of its
key sets (`clibd.query_plan`: photo -> DNA keys, image+DNA -> DNA, photo -> taxon names, a taxonomy
(text query) -> photos or barcodes, image+DNA keys (averaged or concatenated), stacked keys, IS+DU
routing: every query/key pair `evaluate_retrieval` reports); the thresholds are those calibrated for that (query, keys) pair.

Usage:
    identifier = Identifier.load("refs/")
    predictions = identifier.identify(records, top_k=5)      # list[Prediction]
    identifier.identify(photos, keys=["dna"], query="image")  # a library: photos against DNA references
    identify_to_tsv(identifier, records, "preds.tsv")        # resumes if preds.tsv is partly written
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .constants import RANKS
from .index import ReferenceIndex, unusable
from .library import ReferenceLibrary
from .modeling_clibd import CLIBDModel
from .novelty import MARGIN_DEPTH, rank_confidences
from .prediction import COMMENT, Hit, Prediction, failed, predict
from .predictions_tsv import identify_to_tsv, prediction_columns, read_predictions_tsv, write_predictions_tsv
from .processing import CLIBDProcessor
from .query_plan import QueryPlan, embed_queries, query_problems, resolve_plan
from .retrieval import SEARCH_BACKENDS
from .species_check import SpeciesCheck, choose_candidates, named_position

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
ON_BAD_INPUT = ("error", "skip")
logger = logging.getLogger(__name__)


class Identifier:
    """A reference index (or multi-modal library) and the model that built it, loaded once,
    identifying batches of records: any query modality against any key modality the model aligns
    (`clibd.query_plan`), by the nearest key or by IS+DU routing.

    Usage:
        identifier = Identifier.load("refs/", model_dir=None, backend="torch")
        for batch in identifier.iter_identify(records, top_k=5): ...
        identifier.identify(photos, keys=["dna"], query="image")       # photo -> DNA references
        identifier.identify(photos, strategy="is-du")                   # each Prediction has a route
    """

    def __init__(self, index: ReferenceIndex | ReferenceLibrary, model: CLIBDModel, processor: CLIBDProcessor,
                 model_dir: str | os.PathLike, backend: str = "torch", batch_size: int = 256,
                 progress: bool = False, on_bad_input: str = "error", keys: Sequence[str] | None = None,
                 query: str | None = None, strategy: str | None = None, is_du_threshold: float | None = None):
        if backend not in SEARCH_BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; use one of {SEARCH_BACKENDS}")
        if on_bad_input not in ON_BAD_INPUT:
            raise ValueError(f"on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
        self.library = index if isinstance(index, ReferenceLibrary) else ReferenceLibrary.of_index(index)
        self.index = self.library.key_sets[self.library.modalities[0]]  # the first key set (older callers)
        self.model, self.processor = model, processor
        self.model_dir, self.backend, self.batch_size, self.progress = Path(model_dir), backend, batch_size, progress
        self.on_bad_input = on_bad_input
        self.defaults = {"keys": keys, "query": query, "strategy": strategy, "threshold": is_du_threshold}

    @classmethod
    def load(cls, index_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
             backend: str = "torch", batch_size: int = 256, progress: bool = False,
             on_bad_input: str = "error", device: str | None = None, **plan) -> Identifier:
        """Load the index at `index_dir` and its model: from `model_dir` (e.g. with an index pulled
        from the Hub) or where the index says; its weights must be the ones that built the index.
        `on_bad_input`: "error" raises at a query that cannot be identified (naming it), "skip"
        gives it a `failed` prediction (its `error` says why) and goes on. `device`: where the
        model embeds queries (default: the GPU when there is one; each batch's embeddings come
        back to the CPU at once). `plan`: default keys, query, strategy, is_du_threshold."""
        library = ReferenceLibrary.load(index_dir)
        model_dir = model_dir or library.meta["model"]
        model, processor = library.key_sets[library.modalities[0]].load_model(model_dir)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(library, model, processor, model_dir, backend, batch_size, progress, on_bad_input, **plan)

    def plan_for(self, records: Sequence[dict[str, str]], keys: Sequence[str] | str | None = None,
                 query: str | None = None, strategy: str | None = None,
                 is_du_threshold: float | None = None) -> QueryPlan:
        """The checked plan for `records`: the arguments given, else this identifier's defaults."""
        given = {"keys": keys, "query": query, "strategy": strategy, "threshold": is_du_threshold}
        chosen = {name: given[name] if given[name] is not None else default for name, default in self.defaults.items()}
        towers = self.model.config.modalities
        return resolve_plan(self.library, towers, records, **chosen,
                            dims={m: self.model.embedding_dim(m) for m in towers})

    def embed(self, records: Sequence[dict[str, str]], query: str | None = None) -> torch.Tensor:
        """Embeddings [N, D] (float32, L2-normalised, on the CPU) of query records for `query`
        (default: as `plan_for` chooses); a `ValueError` naming records that lack its fields."""
        records = list(records)
        plan = self.plan_for(records, query=query)
        for name in plan.fields:
            lacking = query_problems(records, name) if name == "text" else [i for i, r in enumerate(records)
                                                                               if not r.get(name)]
            missing = [records[i]["id"] for i in lacking]
            if missing:
                raise ValueError(f"{len(missing)} queries have no {name} (the {plan.query} query needs it), "
                                 f"e.g. {missing[:5]}")
        return embed_queries(self.model, self.processor, records, plan.query, self.batch_size)[0]

    def identify_embeddings(self, embeddings: torch.Tensor, query_ids: Sequence[str], top_k: int = 5,
                            plan: QueryPlan | None = None, barcodes: Sequence[str] | None = None) -> list[Prediction]:
        """Predictions for queries already embedded (`embed`), in order; `plan` as `plan_for` gives
        (default: the first key set's own modality). With the queries' `barcodes` and DNA keys that
        have a species check, alignment settles the species where it can (`clibd.species_check`)."""
        plan = plan or self._first_plan()
        if plan.strategy == "is-du":
            return self._route_is_du(embeddings, query_ids, top_k, plan.threshold)
        keys = self.library.keys(plan.keys)
        check = self.species_check(plan) if barcodes is not None else None
        thresholds, curves, weights = self.library.pair_rule(plan.query, plan.keys)
        similarities, rows = self._search(keys, embeddings, _depth(top_k, weights, check))
        own = plan.keys == (plan.query,) and keys.scores_novelty_apart  # novelty parts: one tower's own
        novelty = keys.novelty_similarity(embeddings, self.backend) if own else similarities[:, 0]
        floor = -math.inf
        if check:
            if len(barcodes) != len(query_ids):
                raise ValueError(f"{len(barcodes)} barcodes for {len(query_ids)} queries")
            floor, thresholds, curves = self._checked_thresholds(thresholds, curves, check)
        predictions, hit = [], self._hit_reader(keys, plan.keys)
        confidences = _confidences(keys, similarities, rows, weights)
        if check:  # the embedding's species: by the check's confidence, never below a stated precision's floor
            near = rows[:, :MARGIN_DEPTH]  # as deep as calibration looked
            species = check.confidences(novelty, similarities[:, :MARGIN_DEPTH], keys.label_ids("species")[near])
            for confidence, value, novelty_sim in zip(confidences, species, novelty.tolist(), strict=True):
                confidence["species"] = value if novelty_sim >= floor else -math.inf
        for query_id, ss, js, novelty_sim, confidence in zip(query_ids, similarities.tolist(), rows.tolist(),
                                                             novelty.tolist(), confidences, strict=True):
            hits = [hit(j, s) for j, s in zip(js[:top_k], ss[:top_k], strict=True)]
            predictions.append(replace(predict(query_id, hits, thresholds, novelty_sim, curves, confidence),
                                       route=hits[0].modality))
        return self._check_species(predictions, keys, barcodes, rows, check) if check else predictions

    def _checked_thresholds(self, thresholds: dict, curves: dict, check: SpeciesCheck) -> tuple[float, dict, dict]:
        """(floor, thresholds, curves) of the queries alignment leaves to the embedding: the check's
        species threshold (on `SpeciesCheck.confidence`), and where the index was built for a stated
        precision, its species threshold as a floor the novelty similarity must also clear; no
        species precision curve (the stored one was learnt on every query, not on these)."""
        floor = self._precision_floor(thresholds)
        return floor, {**thresholds, "species": check.embedding_threshold}, {r: c for r, c in curves.items()
                                                                             if r != "species"}

    def _precision_floor(self, thresholds: dict) -> float:
        """The novelty similarity a species the embedding names must clear: the stated precision's
        species threshold, where the index was built for one (-inf otherwise)."""
        return thresholds.get("species", -math.inf) if self.library.meta.get("precision") is not None else -math.inf

    def _check_species(self, predictions: list[Prediction], keys: ReferenceIndex, barcodes: Sequence[str],
                       rows: torch.Tensor, check: SpeciesCheck) -> list[Prediction]:
        """`predictions` with their species settled by alignment where a candidate clears the cut-off
        (`identity` and `identity_reference`: that reference's; else the most identical candidate's), the batch's alignments
        on every core the model may use (`choose_candidates`). A barcode that cannot be aligned
        follows `on_bad_input`: "error" raises the first such query's error (in order), "skip"
        gives that query alone a `failed` row."""
        candidates, ids = rows[:, : check.candidates].tolist(), keys.labels("id")  # no record dict per candidate
        outcomes = choose_candidates(barcodes, [[keys.barcodes[j] for j in near] for near in candidates],
                                     check.identity_cutoff, [p.query_id for p in predictions],
                                     [[ids[j] for j in near] for near in candidates])
        return [self._settled(prediction, keys, near, outcome, check)
                for prediction, near, outcome in zip(predictions, candidates, outcomes, strict=True)]

    def _settled(self, prediction: Prediction, keys: ReferenceIndex, candidates: list[int],
                 outcome: tuple[int, float] | ValueError, check: SpeciesCheck) -> Prediction:
        """One query's `prediction` after its alignments (`outcome`, as `choose_candidates` gives)."""
        if isinstance(outcome, ValueError):
            if self.on_bad_input == "error":
                raise outcome
            return failed(prediction.query_id, f"species check: {outcome}")
        position, best = outcome
        aligned = replace(prediction, identity=best,
                          identity_reference=keys.labels("id")[candidates[position]] if position >= 0 else "")
        if named_position(outcome, check.identity_cutoff) is None:  # the embedding's answer stands
            return aligned
        record = keys.records[candidates[position]]
        named = {rank: check.precision for rank in RANKS if not math.isnan(check.precision)}
        return replace(aligned, answer={rank: record[rank] for rank in RANKS}, novel=False,
                       precision={**named, **{r: v for r, v in prediction.precision.items() if r != "species"}})

    def _route_is_du(self, embeddings: torch.Tensor, query_ids: Sequence[str], top_k: int,
                     threshold: float) -> list[Prediction]:
        """IS+DU: the image keys answer where the best image-key cosine is above `threshold`
        (strictly, as `evaluate_is_du`), the DNA keys elsewhere, each with its pair's calibration."""
        routes = {}
        for modality in ("image", "dna"):
            keys = self.library.keys([modality])
            thresholds, curves, weights = self.library.pair_rule("image", [modality])
            similarities, rows = self._search(keys, embeddings, _depth(top_k, weights))
            routes[modality] = (similarities, rows, _confidences(keys, similarities, rows, weights), thresholds,
                                curves, self._hit_reader(keys, [modality]))
        predictions = []
        for n, query_id in enumerate(query_ids):
            route = "image" if float(routes["image"][0][n, 0]) > threshold else "dna"
            similarities, rows, confidences, thresholds, curves, hit = routes[route]
            ss, js = similarities[n].tolist(), rows[n].tolist()
            hits = [hit(j, s) for j, s in zip(js[:top_k], ss[:top_k], strict=True)]
            predictions.append(replace(predict(query_id, hits, thresholds, None, curves, confidences[n]), route=route))
        return predictions

    def _search(self, keys: ReferenceIndex, embeddings: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        similarities, rows = keys.search(embeddings, top_k, self.backend)
        if not torch.isfinite(similarities).all():  # queries are checked when embedded: a key is damaged
            raise ValueError(f"{keys.directory / 'embeddings.safetensors'}: holds embeddings that are not "
                             "finite (NaN or inf): the index is damaged; rebuild it")
        return similarities, rows

    def iter_identify(self, records: Iterable[dict[str, str]], top_k: int = 5, keys: Sequence[str] | None = None,
                      query: str | None = None, strategy: str | None = None,
                      is_du_threshold: float | None = None) -> Iterator[list[Prediction]]:
        """Predictions batch by batch (`batch_size` records), so a long run holds one batch. Queries
        that cannot be identified (no barcode or photo for the query modality, a repeated id, a
        reader's `error`, an unreadable photo, a non-finite embedding) follow `on_bad_input`.
        `keys`, `query`, `strategy`, `is_du_threshold`: as `plan_for`."""
        records = list(records)
        plan = self.plan_for(records, keys, query, strategy, is_du_threshold)
        problems = self._problems(records, plan)  # before the first batch, so "error" leaves no partial output
        starts = range(0, len(records), self.batch_size)
        for start in tqdm(starts, desc="identify", disable=not self.progress):
            batch = records[start : start + self.batch_size]
            yield self._identify_batch(batch, {i - start: problems[i] for i in problems
                                               if start <= i < start + len(batch)}, top_k, plan)

    def _problems(self, records: list[dict[str, str]], plan: QueryPlan) -> dict[int, str]:
        """Position -> why, for queries that cannot be identified as given; raised under "error"."""
        problems: dict[int, str] = {}
        for name in plan.fields:
            # text queries read the ranks: screened as if each had its taxonomy in a "text" field
            screened = [{**r, "text": "text"} for r in records] if name == "text" else records
            for i, why in {**unusable(screened, name, what="query"), **query_problems(records, name)}.items():
                problems.setdefault(i, why)
        problems = dict(sorted(problems.items()))
        self._raise_or_warn([(records[i]["id"], reason) for i, reason in problems.items()])
        return problems

    def _raise_or_warn(self, bad: list[tuple[str, str]]) -> None:
        if not bad:
            return
        shown = "; ".join(f"{query_id}: {reason}" for query_id, reason in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if self.on_bad_input == "error":
            raise ValueError(f"{len(bad)} queries cannot be identified: {shown}")
        logger.warning("%d queries cannot be identified (error rows): %s", len(bad), shown)

    def _identify_batch(self, batch: list[dict[str, str]], problems: dict[int, str], top_k: int,
                        plan: QueryPlan) -> list[Prediction]:
        good = [i for i in range(len(batch)) if i not in problems]
        embeddings, failures = embed_queries(self.model, self.processor, [batch[i] for i in good], plan.query,
                                             self.batch_size, skip=self.on_bad_input == "skip")
        self._raise_or_warn([(batch[good[j]]["id"], reason) for j, reason in failures.items()])
        problems = {**problems, **{good[j]: reason for j, reason in failures.items()}}
        kept = [j for j in range(len(good)) if j not in failures]
        queries = [batch[good[j]] for j in kept]
        barcodes = [q["dna"] for q in queries] if plan.query == "dna" else None
        found = iter(self.identify_embeddings(embeddings[kept], [q["id"] for q in queries], top_k, plan, barcodes)
                     if kept else [])
        return [failed(record["id"], problems[i]) if i in problems else next(found) for i, record in enumerate(batch)]

    def identify(self, records: Iterable[dict[str, str]], top_k: int = 5, keys: Sequence[str] | None = None,
                 query: str | None = None, strategy: str | None = None,
                 is_du_threshold: float | None = None) -> list[Prediction]:
        """One `Prediction` per record (record schema: id and a dna barcode and/or image path), in
        order. `keys`: key kinds (["dna"], ["image", "dna"] stacked, ["text"], ["image+dna"],
        ["image+dna-concat"]); `query`: "image", "dna", "text", "image+dna" or "image+dna-concat";
        `strategy`: "nearest" or "is-du" (see `clibd.query_plan`)."""
        return [prediction for batch in self.iter_identify(records, top_k, keys, query, strategy, is_du_threshold)
                for prediction in batch]

    def key_count(self, plan: QueryPlan) -> int:
        """How many keys a query of `plan` is searched among (is-du: the smaller key set)."""
        if plan.strategy == "is-du":
            return min(len(self.library.keys([m]).records) for m in ("image", "dna"))
        return len(self.library.keys(plan.keys).records)

    def provenance_line(self, plan: QueryPlan | None = None) -> str:
        """The TSV's `# ` line: clibd version, model and its hash, index, query/keys/strategy, thresholds."""
        plan = plan or self._first_plan()
        library = self.library
        pairs = [("image", ["image"]), ("image", ["dna"])] if plan.strategy == "is-du" else [(plan.query, plan.keys)]
        rules = [library.pair_rule(*pair) for pair in pairs]
        thresholds = "; ".join(_thresholds_line(pair_thresholds, weights) for pair_thresholds, _, weights in rules)
        if plan.strategy != "is-du" and library.calibration_sample(plan.query, plan.keys).get("untrained_only"):
            thresholds += " (set on the species the model did not train on)"  # IS+DU's switch holds out any
        stated = library.meta.get("precision")
        if stated is not None and plan.strategy != "is-du":
            confidence = library.precision_confidence(plan.query, plan.keys)
            thresholds += (f" (for precision {stated}, borne out at {confidence:.0%} confidence)" if confidence else
                           f" (for precision {stated}; its confidence not recorded: `clibd index recalibrate`)")
        held = ", ".join(f"{len(library.key_sets[m].records)} {m}" for m in library.modalities)
        check = self.species_check(plan)
        if check:
            floor = self._precision_floor(rules[0][0])
            thresholds += (f"; species check: identity >= {check.identity_cutoff} among {check.candidates} "
                           f"candidates, else species={check.embedding_threshold:.4f}"
                           + (f" (novelty + {check.margin_weight:g} x species margin)" if check.margin_weight else "")
                           + (f" with novelty >= {floor:.4f}" if floor > -math.inf else ""))
        return (f"{COMMENT}clibd {__version__} identify; model {self.model_dir} "
                f"(sha256 {library.meta['model_hash'][:16]}); index {library.directory.resolve()} "
                f"({held} references); {plan.describe()}; thresholds {thresholds}\n")

    def species_check(self, plan: QueryPlan | None = None) -> SpeciesCheck | None:
        """The species check that barcode queries of `plan` get: the DNA keys' own, for DNA queries
        against the DNA keys alone; None for any other plan, or keys without a check.

        Usage:
            check = identifier.species_check(identifier.plan_for(records))
        """
        plan = plan or self._first_plan()
        return self.library.keys(plan.keys).species_check if plan.keys == ("dna",) == (plan.query,) else None

    def _first_plan(self) -> QueryPlan:
        """The plan of callers that give none: the first image / dna key set's own modality."""
        return self.plan_for([], query=next(m for m in self.library.modalities if m != "text"))

    def _hit_reader(self, keys: ReferenceIndex, modalities: Sequence[str]) -> Callable[[int, float], Hit]:
        """`hit(row, similarity)`: the `Hit` of row `row` of `keys`, read from the keys' label columns
        (read once per index) rather than a record dict per hit."""
        ids, lineage = keys.labels("id"), {rank: keys.labels(rank) for rank in RANKS}
        kind_of = self.library.key_modality(modalities)

        def hit(row: int, similarity: float) -> Hit:
            return Hit(ids[row], similarity, {rank: column[row] for rank, column in lineage.items()}, kind_of(row))

        return hit


def _thresholds_line(thresholds: dict[str, float], margin_weights: dict[str, float]) -> str:
    """"order=0.6000, genus=0.8000 (similarity + 0.5 x margin), ...": what each threshold is compared with."""
    return ", ".join(f"{rank}={value:.4f}" + (f" (similarity + {margin_weights[rank]:g} x margin)"
                                              if margin_weights.get(rank) else "")
                     for rank, value in thresholds.items())


def _confidences(keys: ReferenceIndex, similarities: torch.Tensor, rows: torch.Tensor,
                 margin_weights: dict[str, float]) -> list[dict[str, float]]:
    """Each query's `rank_confidences` from its nearest keys (`rows`, with their `similarities`)."""
    near = rows[:, :MARGIN_DEPTH]
    return rank_confidences(similarities, {rank: keys.label_ids(rank)[near] for rank, weight in margin_weights.items()
                                           if weight}, margin_weights)


def _depth(top_k: int, margin_weights: dict[str, float], check: SpeciesCheck | None = None) -> int:
    """How many nearest keys a query needs: its hits, the species check's candidates, and where a
    margin counts (`clibd.novelty.rank_confidence`) the depth its margins look through."""
    margins = MARGIN_DEPTH if any(margin_weights.values()) or (check and check.margin_weight) else 0
    return max(top_k, check.candidates if check else 0, margins)


def image_records(paths: list[str]) -> list[dict[str, str]]:
    """Query records for photos: files as given, folders expanded to the image files inside.

    Usage:
        identifier.identify(image_records(["photos/"]))
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return [{"id": str(p), **dict.fromkeys(RANKS, ""), "dna": "", "image": str(p)} for p in files]


__all__ = ["Hit", "Identifier", "Prediction", "failed", "identify_to_tsv", "image_records", "predict",
           "prediction_columns", "read_predictions_tsv", "write_predictions_tsv"]
