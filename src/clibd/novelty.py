"""Per-rank confidence thresholds, calibrated on the reference library itself by holding taxa out.

A sample of references is matched twice against the library: once with only itself removed (a
specimen of a taxon the library holds) and once with every reference of its taxon removed (a
specimen of a taxon the library does not hold, the novel-species case). The taxon held out is
the deepest rank the library labels: the species, or the genus for a library without species
names. For each rank, the nearest reference's label is right or wrong; the rank's threshold is
the similarity that best separates right from wrong answers (balanced accuracy). So the species
threshold separates "the library holds this species" from "it does not" (the `novel` flag), and
the genus, family and order thresholds say from which similarity the nearest reference's genus,
family and order can be trusted for a specimen of an absent species. `identify` fills the answer
from order down and stops at the first rank whose threshold the query's best similarity does not
clear (in the spirit of BOLD's 97/95/90/85 % identity cut-offs, but learned per model and library).

What a genus, family or order threshold is compared with is the answer's confidence at that rank
(`rank_confidence`): the similarity plus a weight times its margin, how much nearer the nearest
reference is than the nearest one of another taxon at that rank (`taxon_margin`). A query
between two genera is less sure of its genus than one as near to a single genus. Each rank's
weight is chosen at calibration among `MARGIN_WEIGHTS` (0: the similarity alone) as the one whose
threshold does best on the calibration answers (balanced accuracy, or the most answers at the
asked precision); chosen on validation species: bench/README.md.

With a stated precision (`precision`), a rank's threshold is the lowest confidence from which the
calibration answers are right at least that often, borne out at `PRECISION_CONFIDENCE`: the
one-sided Wilson lower bound of their precision, not the observed precision, must reach it
(`precision_threshold`), so that a few hundred answers from a few dozen species do not state more
than they show.

Which references are held out: where the model says which species it trained on
(`CLIBDConfig.trained_species`) and the library holds at least `MIN_UNTRAINED_SPECIES` others
(`MIN_UNTRAINED_REFERENCES` references of them), only those others. A species the model trained
on sits apart from its neighbours more than one it never saw, so held out it is placed more
surely than a new species will be: thresholds learned on it give fewer right answers than stated
on new species (bench/README.md, "Calibrating on species the model never saw"). The species
check (`clibd.species_check`) still holds out any species (tried both: bench/README.md).

A rank with only one kind of answer still gets a threshold, never a silent "anything goes":
- only wrong answers (a library with one reference per species: no specimen of a held species
  to learn from): the cut lets through at most 1 % of them (`ONE_SIDED_QUANTILE`);
- only right answers (a library of one order): the cut keeps 99 % of them, so a query less like
  the library than anything calibration saw gets no answer at that rank;
- no answers at all (the rank has no labels, or fewer than two references): NaN, and `identify`
  then gives no answer at that rank or below it. `Calibration.warnings` says which rank and why.

The species rank (and with it the novel flag) may be judged on some parts of the embedding only:
those a tower declares `scores_novelty` (`clibd.towers.parts.select_parts`; e.g. the k-mer parts
of an aligned k-mer-profile DNA tower). The other ranks are judged on the whole embedding, which
places.

Usage:
    thresholds = calibrate_thresholds(embeddings, records)   # {"species": 0.93, "genus": 0.88, ...}
    calibration = calibrate(embeddings, records, novelty_embeddings=select_parts(embeddings, parts,
                                                                                  "scores_novelty"))
    calibration.thresholds, calibration.methods, calibration.warnings()
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .constants import RANKS
from .thresholds import (
    PRECISION_CONFIDENCE,
    answers_needed,
    best_cut,
    precision_curve,
    precision_threshold,
    rank_threshold,
)

# Weights of the taxon margin tried in a rank's confidence (module doc); 0 first: ties keep the similarity.
MARGIN_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
# How many nearest references `taxon_margin` looks through for one of another taxon.
MARGIN_DEPTH = 100
# Fewest species new to the model (not in its `trained_species`), and fewest references of them,
# that calibration holds out alone: fewer would set a stated precision's thresholds on too few answers.
MIN_UNTRAINED_SPECIES = 20
MIN_UNTRAINED_REFERENCES = 200
METHODS = {
    "separates": "separates right from wrong answers",
    "precision": "the lowest confidence at which answers bear out the asked precision (its lower bound)",
    "precision unreachable": "no confidence's answers bear out the asked precision: no answer at this rank or below",
    "above wrong": "only wrong answers to learn from: set above 99 % of them",
    "below right": "only right answers to learn from: set below 99 % of them",
    "none": "nothing to learn from: no answer is given at this rank or below",
}


def label_ids(labels: Sequence[str]) -> torch.Tensor:
    """[N] integers standing for `labels`, equal where the labels are equal ("" is a label like
    any other): what `taxon_margins` compares.

    Usage:
        genus_ids = label_ids(index.labels("genus")); taxon_margins(sims, genus_ids[rows])
    """
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(label, len(ids)) for label in labels], dtype=torch.long)


def taxon_margins(similarities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How much nearer each query's nearest reference is than its nearest one whose label differs
    from the nearest one's; where all share it, than the last one (a lower bound); 0 for one
    reference. `similarities`: [Q, K], nearest first, a value <= -2.0 (nothing left:
    `nearest_held_out`) ending a row; `labels`: [Q, K] integer labels of those references
    (`label_ids`). [Q] float64, the difference Python's floats give. In numpy: a few small
    array operations, which torch's thread pool slows when other work holds the cores.

    Usage:
        taxon_margins(torch.tensor([[0.91, 0.90, 0.84]]), torch.tensor([[3, 3, 5]]))   # tensor([0.07])
    """
    if similarities.shape != labels.shape:
        raise ValueError(f"similarities {tuple(similarities.shape)} and labels {tuple(labels.shape)} differ in shape")
    sims, ids = similarities.detach().cpu().double().numpy(), labels.cpu().numpy()
    kept = np.logical_and.accumulate(~(sims <= -2.0), axis=1)  # up to the first end (NaN does not end a row)
    differs = (ids != ids[:, :1]) & kept
    first_other = differs.argmax(axis=1)  # the first position where there is one
    last_kept = np.maximum(kept.sum(axis=1) - 1, 0)
    rows = np.arange(len(sims))
    other = np.where(differs.any(axis=1), sims[rows, first_other], sims[rows, last_kept])
    return torch.from_numpy(sims[:, 0] - other)


def taxon_margin(similarities: Sequence[float], labels: Sequence[str]) -> float:
    """`taxon_margins` of one query: `similarities`, nearest first, and each reference's `labels`
    at one rank.

    Usage:
        taxon_margin([0.91, 0.90, 0.84], ["Aedes", "Aedes", "Culex"])   # 0.07
    """
    return float(taxon_margins(torch.tensor([similarities], dtype=torch.float64), label_ids(labels)[None])[0])


def rank_confidences(similarities: torch.Tensor, labels: Mapping[str, torch.Tensor],
                     weights: Mapping[str, float]) -> list[dict[str, float]]:
    """Per query, per rank with a weight: the confidence its threshold is compared with, the
    nearest similarity plus `weights[rank]` times its taxon margin (`taxon_margins`). `similarities`:
    [Q, K], nearest first; `labels[rank]`: [Q, K] integer labels (`label_ids`) of those references,
    needed where the weight is not 0 (the deeper, the truer the margin: `MARGIN_DEPTH`).

    Ranks of weight 0 are left out: their threshold is compared with what it always was (the
    similarity; for species, the novelty similarity). The margin looks through the `MARGIN_DEPTH`
    nearest at most, as calibration did.

    Usage:
        rank_confidences(sims, {"genus": genus_ids[rows]}, {"genus": 0.5})[0]["genus"]
    """
    near = similarities[:, :MARGIN_DEPTH]
    margins = {rank: (weight, taxon_margins(near, labels[rank][:, :MARGIN_DEPTH]).tolist())
               for rank, weight in weights.items() if weight}
    return [{rank: answer_confidence(top, margin[n], weight) for rank, (weight, margin) in margins.items()}
            for n, top in enumerate(similarities[:, 0].double().tolist())]


def rank_confidence(similarities: Sequence[float], labels: Mapping[str, Sequence[str]],
                    weights: Mapping[str, float]) -> dict[str, float]:
    """`rank_confidences` of one query: `similarities`, nearest first, and `labels[rank]` the
    references' labels at that rank in the same order.

    Usage:
        rank_confidence(sims, {"genus": [index.labels("genus")[j] for j in rows]}, {"genus": 0.5})
    """
    near = list(similarities[:MARGIN_DEPTH])
    ids = {rank: label_ids(labels[rank][:MARGIN_DEPTH])[None] for rank, weight in weights.items() if weight}
    if any(row.shape[1] != len(near) for row in ids.values()):
        raise ValueError(f"{len(near)} similarities for labels of another length: {labels}")
    return rank_confidences(torch.tensor([near], dtype=torch.float64), ids, weights)[0]


def nearest_held_out(embeddings: torch.Tensor, taxa: list[str], queries: list[int], chunk_size: int = 512,
                     k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each query reference: (similarity, index) of its nearest other reference, and of its
    nearest reference of another taxon (`taxa`: each reference's held-out label); with `k` > 1,
    the `k` nearest of each, [Q, k], -2.0 where fewer are left. In chunks of queries, made
    float32 as they are used, so a library of millions needs [chunk, N] at a time.

    Usage:
        loo_sims, loo_rows, held_sims, held_rows = nearest_held_out(embeddings, species, sample)
    """
    key_taxa = label_ids(taxa)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(queries), chunk_size):
        rows = torch.tensor(queries[start : start + chunk_size])
        sims = embeddings[rows].float() @ embeddings.T.float()
        sims[torch.arange(len(rows)), rows] = -2.0  # a record is not its own reference
        loo = sims.topk(min(k, sims.shape[1]), dim=1)
        own_taxon = key_taxa[rows].unsqueeze(1) == key_taxa.unsqueeze(0)
        held_out = sims.masked_fill_(own_taxon, -2.0).topk(min(k, sims.shape[1]), dim=1)
        parts.append((loo.values, loo.indices, held_out.values, held_out.indices))
    columns = tuple(torch.cat(column) for column in zip(*parts, strict=True))
    return columns if k > 1 else tuple(column[:, 0] for column in columns)


@dataclass
class Calibration:
    """Per-rank thresholds, how each was set (`METHODS`), and the right/wrong answers counted."""

    thresholds: dict[str, float]
    methods: dict[str, str]
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    held_out_rank: str | None = None
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    precision: float | None = None
    margin_weights: dict[str, float] = field(default_factory=dict)  # rank -> weight (`rank_confidence`)
    sample: dict = field(default_factory=dict)  # what was held out (`CalibrationSample.to_dict`)
    confidence_level: float | None = None  # how sure `precision` is borne out (`precision_threshold`); None without one

    def sample_warning(self) -> str | None:
        """Where the model's training species are known but the library holds too few others to
        hold out alone (`calibration_sample`): what that means for the stated precision."""
        if self.sample.get("new_species_held") is None or self.sample.get("untrained_only"):
            return None
        return (f"every rank: the library holds {self.sample['new_species_held']} species the model did not train "
                f"on that calibration can hold out, {self.sample['new_references']} queries in all (too few to learn "
                "from alone): calibrated on species it trained on too, so answers for new species are right less "
                "often than stated")

    def warnings(self) -> list[str]:
        """One line per rank whose threshold is not learned from both right and wrong answers, and
        `sample_warning`'s."""
        lines = [line for line in [self.sample_warning()] if line]
        for rank in RANKS:
            method = self.methods[rank]
            if method not in ("separates", "precision"):
                right, wrong = self.counts.get(rank, (0, 0))
                need = (f"; stating {self.precision} at {self.confidence_level:.0%} confidence takes at least "
                        f"{answers_needed(self.precision, self.confidence_level)} right answers above a cut, with none "
                        "wrong, or more with a few wrong" if method == "precision unreachable" else "")
                lines.append(f"{rank}: {METHODS[method]} ({right} right, {wrong} wrong calibration answers{need})")
        if self.held_out_rank not in (None, "species"):
            lines.append(f"no species names in the library: calibrated by holding out whole {self.held_out_rank}"
                         " taxa; identify names no species and flags every query novel")
        return lines


@dataclass(frozen=True)
class CalibrationSample:
    """The references calibration holds out: `rows`, `shared` (those whose taxon has another
    reference), and where the model's training species are known, how many of the library's
    species it did not train on (`new_species_held`) and whether the rows are theirs alone."""

    rows: list[int]
    shared: set[int]
    new_species_held: int | None = None
    new_references: int | None = None
    untrained_only: bool = False

    def to_dict(self) -> dict:
        """What index.json keeps (`"calibration_sample"`): how many references were held out, how many
        species new to the model the library holds (with two or more references) and their references."""
        return {"references": len(self.rows), "new_species_held": self.new_species_held,
                "new_references": self.new_references, "untrained_only": self.untrained_only}


def calibration_sample(taxa: list[str], max_queries: int, seed: int,
                       trained_species: Collection[str] | None = None) -> CalibrationSample:
    """Up to `max_queries` references to hold out: records of taxa with at least two references
    (where the library has none, one reference per taxon, every labelled record); with
    `trained_species` (the model's, and `taxa` species names), only records of other species where
    the library holds at least `MIN_UNTRAINED_SPECIES` of them with `MIN_UNTRAINED_REFERENCES`
    records in all (module doc).

    Usage:
        sample = calibration_sample([r["species"] for r in records], 2000, 0, model.config.trained_species)
    """
    counts = Counter(label for label in taxa if label)
    eligible = [i for i, label in enumerate(taxa) if label and counts[label] >= 2]
    pool = eligible or [i for i, label in enumerate(taxa) if label]
    pool, new = new_species_pool(pool, taxa, trained_species)
    rows = random.Random(seed).sample(pool, min(max_queries, len(pool)))
    return CalibrationSample(rows, {i for i in rows if counts[taxa[i]] >= 2}, **new)


def new_species_pool(pool: list[int], species: Sequence[str], trained_species: Collection[str] | None,
                     min_queries: int = MIN_UNTRAINED_REFERENCES) -> tuple[list[int], dict]:
    """`pool` (positions of calibration queries) kept to those of species not in `trained_species`
    where at least `MIN_UNTRAINED_SPECIES` of them, with `min_queries` queries, are there
    (`species`: each position's name); and what `CalibrationSample` records of it. The pool as
    given where `trained_species` is None (the model does not say).

    Usage:
        pool, new = new_species_pool(pool, [r["species"] for r in records], model.config.trained_species)
    """
    if trained_species is None:
        return pool, {}
    trained = set(trained_species)
    untrained = [i for i in pool if species[i] not in trained]
    held, references = len({species[i] for i in untrained}), len(untrained)
    enough = held >= MIN_UNTRAINED_SPECIES and references >= min_queries
    return (untrained if enough else pool), {"new_species_held": held, "new_references": references,
                                             "untrained_only": enough}


@dataclass
class Answers:
    """The right and wrong nearest-reference answers at one rank, each (similarity, taxon margin),
    with the query's taxon held out (`held_*`: the novel-species case) and with only itself
    removed (`own_*`)."""

    held_right: list[tuple[float, float]] = field(default_factory=list)
    held_wrong: list[tuple[float, float]] = field(default_factory=list)
    own_right: list[tuple[float, float]] = field(default_factory=list)
    own_wrong: list[tuple[float, float]] = field(default_factory=list)

    @property
    def right(self) -> list[tuple[float, float]]:
        return self.held_right + self.own_right

    @property
    def wrong(self) -> list[tuple[float, float]]:
        return self.held_wrong + self.own_wrong

    def decided(self, rank: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """(right, wrong) answers a threshold at `rank` decides: for species, known against novel
        (held-out) queries; above it, the placement of species the library does not hold."""
        return (self.right, self.wrong) if rank == "species" else (self.held_right, self.held_wrong)


def answer_confidence(similarity: float, margin: float, weight: float) -> float:
    """An answer's confidence: its similarity plus `weight` times its taxon margin (what a rank's
    threshold is compared with, module doc).

    Usage:
        answer_confidence(0.9, 0.05, 2.0)   # 1.0
    """
    return similarity + weight * margin


def confidences(answers: Sequence[tuple[float, float]], weight: float) -> list[float]:
    """Each (similarity, margin) answer's `answer_confidence` at `weight`.

    Usage:
        confidences([(0.9, 0.05), (0.8, 0.0)], 2.0)   # [1.0, 0.8]
    """
    return [answer_confidence(similarity, margin, weight) for similarity, margin in answers]


def labels_of(records: Sequence[dict], rank: str) -> list[str]:
    """Every record's label at `rank` ("" where none): a records table's column where the records
    are one (`clibd.index_store.RecordTable`, no dict per record), else read from each dict.

    Usage:
        labels_of(index.records, "genus")[17]
    """
    if rank in getattr(records, "column_names", ()):
        return [label or "" for label in records.column(rank)]
    return [record.get(rank, "") or "" for record in records]


def answers_at(records: Sequence[dict], rank: str, queries: list[int], shared: set[int],
               matches: tuple[torch.Tensor, ...], key_records: Sequence[dict] | None = None) -> Answers:
    """The right and wrong nearest-reference answers at `rank`: with only itself removed (queries
    whose taxon has another reference) and with its taxon held out. `matches`: as
    `nearest_held_out` gives (with k > 1, the margins look through the k nearest; with one, they
    are 0); `key_records`: the references' records where they are not `records` (queries of one
    modality against keys of another).

    Usage:
        answers = answers_at(records, "genus", queries, shared, nearest_held_out(embeddings, taxa, queries, k=100))
    """
    key_records = records if key_records is None else key_records
    key_labels = labels_of(key_records, rank)  # once, not a record per neighbour
    columns = [m if m.dim() == 2 else m[:, None] for m in matches]  # k = 1: one column, margins 0
    ids = label_ids(key_labels)
    margins = [taxon_margins(sims, ids[rows]).tolist() if rank != "species" else [0.0] * len(queries)
               for sims, rows in (columns[2:], columns[:2])]  # held out, then only itself removed
    out_sims, out_rows, loo_sims, loo_rows = (column[:, 0].tolist() for column in columns[2:] + columns[:2])
    answers = Answers()
    for n, query in enumerate(queries):
        truth = records[query].get(rank, "")
        if not truth:
            continue
        cases = [("held", out_sims[n], out_rows[n], margins[0][n])]
        if query in shared:
            cases.append(("own", loo_sims[n], loo_rows[n], margins[1][n]))
        for case, similarity, row, margin in cases:
            if similarity > -2.0:  # -2: nothing left once the taxon was removed
                kind = "right" if key_labels[row] == truth else "wrong"
                getattr(answers, f"{case}_{kind}").append((similarity, margin))
    return answers


def calibrate(embeddings: torch.Tensor, records: list[dict], max_queries: int = 2000, seed: int = 0,
              novelty_embeddings: torch.Tensor | None = None, precision: float | None = None,
              margin_weights: Sequence[float] = MARGIN_WEIGHTS,
              trained_species: Collection[str] | None = None,
              confidence_level: float = PRECISION_CONFIDENCE) -> Calibration:
    """Per-rank thresholds of a library (see the module doc). The species threshold is on the
    cosine of `novelty_embeddings` (unit vectors, one per record; `embeddings` when None).
    `precision`: thresholds set for that precision instead of balanced accuracy (`precision_threshold`);
    `margin_weights`: those tried (`choose_margin_weight`; (0.0,): the similarity alone);
    `trained_species`: the species the model trained on, None where unknown (`calibration_sample`);
    `confidence_level`: how sure a stated precision must be borne out (`precision_threshold`).

    Usage:
        calibration = calibrate(embeddings, records, trained_species=model.config.trained_species)
    """
    held_out_rank = next((rank for rank in reversed(RANKS) if any(r.get(rank) for r in records)), None)
    taxa = [r.get(held_out_rank, "") if held_out_rank else "" for r in records]
    sample = calibration_sample(taxa, max_queries, seed, trained_species if held_out_rank == "species" else None)
    if len(records) < 2 or not sample.rows:
        return Calibration(dict.fromkeys(RANKS, float("nan")), dict.fromkeys(RANKS, "none"), {}, held_out_rank,
                           precision=precision, confidence_level=None if precision is None else confidence_level)
    queries = sample.rows
    placing = nearest_held_out(embeddings, taxa, queries, k=MARGIN_DEPTH)  # deep: the margins look through them
    apart = novelty_embeddings is not None and novelty_embeddings is not embeddings
    novelty = nearest_held_out(novelty_embeddings, taxa, queries) if apart else placing
    answers = {rank: answers_at(records, rank, queries, sample.shared, novelty if rank == "species" else placing)
               for rank in RANKS}
    return calibration_from_answers(answers, held_out_rank, precision, margin_weights, sample, confidence_level)


def calibration_from_answers(answers: dict[str, Answers], held_out_rank: str | None,
                             precision: float | None = None, margin_weights: Sequence[float] = MARGIN_WEIGHTS,
                             sample: CalibrationSample | None = None,
                             confidence_level: float = PRECISION_CONFIDENCE) -> Calibration:
    """Per-rank thresholds (balanced, or for `precision` at `confidence_level`), methods, counts, precision
    curves and margin weights (`choose_margin_weight`) from each rank's right and wrong calibration
    answers; `sample`: the references they came from, kept as `Calibration.sample` ({} where None).

    Usage:
        calibration = calibration_from_answers({rank: answers_at(rank) for rank in RANKS}, "species", sample=sample)
    """
    thresholds, methods, counts, curves, weights = {}, {}, {}, {}, {}
    for rank, found in answers.items():
        right, wrong = found.decided(rank)
        weight = 0.0 if rank == "species" else choose_margin_weight(found, precision, margin_weights, confidence_level)
        thresholds[rank], methods[rank] = _rank_cut(found, rank, precision, weight, confidence_level)
        counts[rank] = (len(found.right), len(found.wrong))
        curves[rank] = precision_curve(confidences(right, weight), confidences(wrong, weight))
        weights[rank] = weight
    return Calibration(thresholds, methods, counts, held_out_rank, curves, precision, weights,
                       sample.to_dict() if sample is not None else {}, None if precision is None else confidence_level)


def _rank_cut(found: Answers, rank: str, precision: float | None, weight: float,
              confidence_level: float = PRECISION_CONFIDENCE) -> tuple[float, str]:
    """(threshold, method) of one rank on the confidences at `weight`."""
    if precision is None:
        return rank_threshold(confidences(found.right, weight), confidences(found.wrong, weight))
    right, wrong = found.decided(rank)
    return precision_threshold(confidences(right, weight), confidences(wrong, weight), precision, confidence_level)


def choose_margin_weight(found: Answers, precision: float | None = None,
                         weights: Sequence[float] = MARGIN_WEIGHTS, confidence_level: float = PRECISION_CONFIDENCE) -> float:
    """The weight among `weights` whose threshold does best on a placing rank's answers:
    the highest balanced accuracy, or with `precision` the most held-out answers given at it; 0
    (the similarity alone) where there is nothing to choose by or on a tie.

    Usage:
        weight = choose_margin_weight(answers_at(records, "genus", queries, shared, matches), precision=0.98)
    """
    best_weight, best_value = 0.0, -math.inf
    for weight in weights:
        if precision is None:
            value = best_cut(confidences(found.right, weight), confidences(found.wrong, weight))[1]
        else:
            right, wrong = confidences(found.held_right, weight), confidences(found.held_wrong, weight)
            cut, method = precision_threshold(right, wrong, precision, confidence_level)
            value = sum(score >= cut for score in right + wrong) if method == "precision" else math.nan
        if value > best_value:  # NaN (nothing to choose by) never is
            best_weight, best_value = weight, value
    return best_weight


def calibrate_thresholds(embeddings: torch.Tensor, records: list[dict], max_queries: int = 2000,
                         seed: int = 0, novelty_embeddings: torch.Tensor | None = None,
                         precision: float | None = None) -> dict[str, float]:
    """`calibrate(...).thresholds`: rank -> similarity threshold (NaN: nothing to learn from)."""
    return calibrate(embeddings, records, max_queries, seed, novelty_embeddings, precision).thresholds
