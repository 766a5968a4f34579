"""Novel-species evaluation: species held out of training and of the reference library.

The species split is the data's (the paper's, by species, seeded). For stage `test` the
references are the seen species' keys plus the validation-unseen keys (species absent from
training but present in the library), the novel queries are the test-unseen records (species no
reference holds) and the seen queries the test-seen records; stage `val` (for choosing settings
without looking at the test species) swaps the roles of the validation- and test-unseen species.
Scored here: per-rank placement of the novel queries by the nearest reference (micro accuracy
over queries whose taxon at that rank exists among the references), AUROC of seen-versus-novel
detection, how strictly `identify`'s answers hold up (flagged novel, false alarms, the deepest
rank given and how often a given rank is right), genus placement by the number of species of the
query's genus seen in training, the novel species placed at a wrong rank, and 1-NN on raw k-mer
count profiles (cosine, no learning) on the identical split as a baseline.

Usage:
    report = evaluate_novel_species("runs/bold_dna/best", load_splits(config.data), stage="test")
    print(format_report(report, examples=True, misses=True))
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch

from ..constants import RANKS
from ..data.loading import TRAIN_SPLITS
from ..identify import Identifier, Prediction
from ..index import ReferenceIndex, build_index
from ..processing import kmer_profiles
from ..towers.parts import part_columns

# The README quotes identify's first answer of each kind: (which queries, the deepest rank given).
EXAMPLE_KINDS = {"known species": ("seen", "species"), "novel, stops at genus": ("novel", "genus"),
                 "novel, stops at family": ("novel", "family"), "novel, stops at order": ("novel", "order")}


class StageDatasets(NamedTuple):
    """The records of one evaluation stage."""

    training: datasets.Dataset
    references: datasets.Dataset
    novel: datasets.Dataset
    seen: datasets.Dataset


class GroupAccuracy(NamedTuple):
    """Placement accuracy over one group of queries, with its size in queries and species."""

    accuracy: float
    queries: int
    species: int


class SpeciesMiss(NamedTuple):
    """A novel species with queries placed at a wrong rank (see `species_misses`)."""

    species: str
    queries: int
    wrong: int
    other_wrong: int
    answered_wrong: int
    references: int
    commonest_wrong: str


@dataclass(frozen=True)
class AnswerSummary:
    """How `identify` answered: fractions of queries (0-1); nan where nothing was counted."""

    flagged: float  # novel queries flagged novel
    false_alarms: float  # seen queries flagged novel
    deepest: dict[str, float]  # rank -> novel queries whose answer stops at that rank
    right_when_given: dict[str, float]  # rank -> novel queries right at that rank, of those given it


@dataclass(frozen=True)
class KmerBaseline:
    """1-NN on raw k-mer count profiles: placement of the novel queries and seen-vs-novel AUROC."""

    k: int
    placement: dict[str, float]
    auroc: float


@dataclass(frozen=True)
class ExampleAnswer:
    """One of identify's answers, with the truth it is quoted against."""

    kind: str
    query_id: str
    answer: dict[str, str]
    similarity: float
    novel: bool
    novelty_similarity: float
    species: str


@dataclass
class NovelSpeciesReport:
    """Everything `format_report` prints; fractions are 0-1."""

    stage: str
    model: str
    references: int
    reference_species: int
    novel_queries: int
    novel_species: int
    seen_queries: int
    thresholds: dict[str, float]
    placement: dict[str, float]  # clibd, nearest reference
    auroc: float  # seen vs novel by identify's novelty_similarity
    placing_auroc: float  # seen vs novel by the similarity that places (the whole embedding)
    novelty_parts: list[str]  # the embedding parts whose cosine scores novelty ...
    novelty_dims: int  # ... and their dimensions, of `dims`
    dims: int
    answers: AnswerSummary
    baselines: dict[int, KmerBaseline]
    best_k: int  # the raw k with the best genus placement
    congeners: dict[str, GroupAccuracy]  # clibd's genus placement by trained congeners
    baseline_congeners: dict[str, GroupAccuracy]  # the same for raw best-k
    misses: dict[str, list[SpeciesMiss]] = field(default_factory=dict)  # order, genus -> misses
    examples: list[ExampleAnswer] = field(default_factory=list)


def stage_datasets(splits: datasets.DatasetDict, stage: str = "test",
                   train_splits: Sequence[str] = TRAIN_SPLITS) -> StageDatasets:
    """(training, references, novel queries, seen queries) of a stage: `test` scores the
    test-unseen species against seen + validation-unseen keys; `val` scores the validation-unseen
    species against seen + test-unseen keys. `training`: the `train_splits` present in `splits`.

    Usage:
        training, references, novel, seen = stage_datasets(load_splits(config.data), "val")
    """
    if stage not in ("test", "val"):
        raise ValueError(f"stage must be 'test' or 'val', got {stage!r}")
    other = "test" if stage == "val" else "val"
    references = datasets.concatenate_datasets([splits["seen_keys"], splits[f"{other}_unseen_keys"]])
    training = datasets.concatenate_datasets([splits[name] for name in train_splits if name in splits])
    return StageDatasets(training, references, splits[f"{stage}_unseen"], splits[f"{stage}_seen"])


def reference_taxa(references: Iterable[dict]) -> dict[str, set[str]]:
    """The labels each rank has among the references.

    Usage:
        key_taxa = reference_taxa(references); "Carabidae" in key_taxa["family"]
    """
    taxa: dict[str, set[str]] = {rank: set() for rank in RANKS}
    for record in references:
        for rank in RANKS:
            taxa[rank].add(record[rank])
    return taxa


def placement(true: Sequence[dict], predicted: Sequence[dict], key_taxa: dict[str, set]) -> dict[str, float]:
    """Per-rank accuracy over queries whose taxon at that rank exists among the references
    (nan at a rank where none does).

    Usage:
        placement(novel, [nearest_reference[q["id"]] for q in novel], reference_taxa(references))
    """
    out = {}
    for rank in RANKS:
        pairs = [(t[rank], p[rank]) for t, p in zip(true, predicted, strict=True) if t[rank] in key_taxa[rank]]
        out[rank] = sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")
    return out


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (the
    Mann-Whitney statistic from average ranks); nan when either side is empty.

    Usage:
        auroc([p.novelty_similarity for p in seen], [p.novelty_similarity for p in novel])
    """
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based ranks, averaged over each tie
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def answer_summary(true: Sequence[dict], novel: Sequence[Prediction], seen: Sequence[Prediction]) -> AnswerSummary:
    """Strict accuracy of `identify`'s answers to the novel queries (`true` and `novel` aligned)
    and its false alarms on the seen ones.

    Usage:
        answer_summary(novel_records, identifier.identify(novel_records), identifier.identify(seen_records))
    """
    def fraction(hits: int, total: int) -> float:
        return hits / total if total else float("nan")

    stops = Counter(p.deepest_rank for p in novel)
    right = {}
    for rank in RANKS:
        given = [(t[rank], p.answer[rank]) for t, p in zip(true, novel, strict=True) if p.answer.get(rank)]
        right[rank] = fraction(sum(x == y for x, y in given), len(given))
    return AnswerSummary(flagged=fraction(sum(p.novel for p in novel), len(novel)),
                         false_alarms=fraction(sum(p.novel for p in seen), len(seen)),
                         deepest={rank: fraction(stops[rank], len(novel)) for rank in RANKS},
                         right_when_given=right)


def genus_by_trained_congeners(true: Sequence[dict], predicted: Sequence[dict], key_taxa: dict[str, set],
                               trained: Iterable[dict]) -> dict[str, GroupAccuracy]:
    """Genus placement split by how many species of the query's genus the model was trained on
    ("0", "1", "2+"), over queries whose genus has references. Records of `trained` without a
    species label count no species.

    Usage:
        genus_by_trained_congeners(novel, nearest, reference_taxa(references), training)["1"].accuracy
    """
    trained_species: dict[str, set] = {}
    for record in trained:
        if record["species"]:
            trained_species.setdefault(record["genus"], set()).add(record["species"])
    groups: dict[str, list] = {"0": [], "1": [], "2+": []}
    for t, p in zip(true, predicted, strict=True):
        if t["genus"] in key_taxa["genus"]:
            n = len(trained_species.get(t["genus"], ()))
            groups["2+" if n >= 2 else str(n)].append((t["species"], t["genus"] == p["genus"]))
    return {name: GroupAccuracy(sum(ok for _, ok in rows) / len(rows) if rows else float("nan"), len(rows),
                                len({species for species, _ in rows})) for name, rows in groups.items()}


def species_misses(true: Sequence[dict], predicted: Sequence[dict], other: Sequence[dict],
                   answered: Sequence[dict], references: Iterable[dict], rank: str) -> list[SpeciesMiss]:
    """Novel species with a query placed at the wrong `rank` by `predicted`: its queries, how many
    `predicted` and `other` (e.g. a baseline) place wrong, how many `identify`'s answers (which
    may leave the rank empty) give wrong, the references of its taxon at that rank, and the
    commonest wrong answer; most misses first. Only queries whose taxon has references count.

    Usage:
        species_misses(novel, nearest, raw_nearest, [p.answer for p in predictions], references, "genus")
    """
    counts = Counter(reference[rank] for reference in references)
    tallies: dict[str, Counter] = {}  # species -> queries, wrong, other_wrong, answered_wrong
    wrong_answers: dict[str, Counter] = {}  # species -> the wrong taxa `predicted` gave
    taxon = {}  # species -> its true taxon at `rank`
    for truth, ours, theirs, answer in zip(true, predicted, other, answered, strict=True):
        if truth[rank] not in counts:
            continue
        tally = tallies.setdefault(truth["species"], Counter())
        taxon[truth["species"]] = truth[rank]
        tally["queries"] += 1
        tally["wrong"] += ours[rank] != truth[rank]
        tally["other_wrong"] += theirs[rank] != truth[rank]
        tally["answered_wrong"] += bool(answer.get(rank)) and answer[rank] != truth[rank]
        if ours[rank] != truth[rank]:
            wrong_answers.setdefault(truth["species"], Counter())[ours[rank]] += 1
    misses = [SpeciesMiss(species, t["queries"], t["wrong"], t["other_wrong"], t["answered_wrong"],
                          counts[taxon[species]],
                          wrong_answers[species].most_common(1)[0][0])
              for species, t in tallies.items() if t["wrong"]]
    return sorted(misses, key=lambda miss: -miss.wrong)


def nearest_references(queries: torch.Tensor, keys: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine of each query's most similar key (inputs L2-normalised; the first of
    equally similar keys), from one [Q, K] product. Not `clibd.retrieval.topk_search`: raw k-mer
    profiles tie often, and the baseline's figures rely on this fixed rule (topk's order among
    ties is not specified; chunked products round differently and break ties otherwise).

    Usage:
        indices, similarities = nearest_references(kmer_profiles(queries, 5), kmer_profiles(keys, 5))
    """
    top = (queries @ keys.T).max(dim=1)
    return top.indices.numpy(), top.values.numpy()


def raw_kmer_baseline(references: Sequence[dict], novel: Sequence[dict], seen: Sequence[dict], k: int,
                      key_taxa: dict[str, set] | None = None) -> tuple[KmerBaseline, list[dict]]:
    """1-NN by the cosine of raw overlapping k-mer count profiles (no learning): the novel
    queries' placement and seen-vs-novel AUROC, and each novel query's nearest reference.

    Usage:
        baseline, nearest = raw_kmer_baseline(references, novel, seen, k=5)
    """
    key_taxa = key_taxa if key_taxa is not None else reference_taxa(references)
    key_profiles = kmer_profiles([r["dna"] for r in references], k)
    novel_best, novel_sims = nearest_references(kmer_profiles([r["dna"] for r in novel], k), key_profiles)
    _, seen_sims = nearest_references(kmer_profiles([r["dna"] for r in seen], k), key_profiles)
    nearest = [references[i] for i in novel_best]
    return KmerBaseline(k, placement(novel, nearest, key_taxa), auroc(seen_sims, novel_sims)), nearest


def example_answers(novel: Sequence[dict], seen: Sequence[dict],
                    predictions: dict[str, Prediction]) -> list[ExampleAnswer]:
    """identify's first answer of each kind (`EXAMPLE_KINDS`): a known species named, novel ones
    stopped at genus, family and order. `predictions`: query id -> `Prediction`.

    Usage:
        example_answers(novel, seen, {p.query_id: p for p in predictions})
    """
    queries = {"novel": novel, "seen": seen}
    out = []
    for kind, (which, deepest) in EXAMPLE_KINDS.items():
        truth = next((q for q in queries[which] if predictions[q["id"]].deepest_rank == deepest), None)
        if truth is not None:
            p = predictions[truth["id"]]
            out.append(ExampleAnswer(kind, truth["id"], dict(p.answer), p.similarity, p.novel, p.novelty_similarity,
                                     truth["species"]))
    return out


def identify_queries(model_dir: str | os.PathLike, references: list[dict], queries: list[dict], top_k: int,
                     workdir: str | os.PathLike, index_options: dict | None = None
                     ) -> tuple[list[Prediction], ReferenceIndex]:
    """Build an index of `references` under `workdir` and identify `queries` against it, as
    `clibd index build` and `clibd identify` do: (predictions in query order, the index).

    Usage:
        predictions, index = identify_queries("runs/bold_dna/best", references, novel + seen, 5, "work/")
    """
    build_index(model_dir, references, "dna", Path(workdir) / "references", progress=False, **(index_options or {}))
    identifier = Identifier.load(Path(workdir) / "references", model_dir=model_dir, progress=False)
    return identifier.identify(queries, top_k=top_k), identifier.index


def evaluate_novel_species(model_dir: str | os.PathLike, splits: datasets.DatasetDict, stage: str = "test",
                           train_splits: Sequence[str] = TRAIN_SPLITS, kmax: int = 8, top_k: int = 5,
                           workdir: str | os.PathLike | None = None, index_options: dict | None = None
                           ) -> NovelSpeciesReport:
    """Score a trained model on the novel species of `splits` (see the module docstring): index
    the stage's references, identify its novel and seen queries, and compare with raw k-mer 1-NN
    for k = 3..`kmax` (and k = 5 always). `workdir`: where the index goes (default: a temporary
    folder, removed afterwards); `index_options`: `build_index` keywords (e.g.
    `{"species_check": False}`: the embedding alone decides the species).

    Usage:
        report = evaluate_novel_species("runs/bold_dna/best", load_splits(config.data), stage="val")
    """
    training, *parts = stage_datasets(splits, stage, train_splits)
    references, novel, seen = (list(part) for part in parts)
    with tempfile.TemporaryDirectory() as tmp:
        predictions, index = identify_queries(model_dir, references, novel + seen, top_k, workdir or tmp,
                                              index_options)
    novel_p, seen_p = predictions[: len(novel)], predictions[len(novel) :]
    key_taxa = reference_taxa(references)
    by_id = {r["id"]: r for r in references}
    learned = [by_id[p.hits[0].id] for p in novel_p]  # the nearest reference places, as for raw k-mers
    baselines, raw_nearest = {}, {}
    for k in sorted({*range(3, kmax + 1), 5}):
        baselines[k], raw_nearest[k] = raw_kmer_baseline(references, novel, seen, k, key_taxa)
    best_k = max(baselines, key=lambda k: baselines[k].placement["genus"])
    answers = [p.answer for p in novel_p]
    return NovelSpeciesReport(
        stage=stage, model=str(model_dir), references=len(references), reference_species=len(key_taxa["species"]),
        novel_queries=len(novel), novel_species=len({r["species"] for r in novel}), seen_queries=len(seen),
        thresholds=dict(index.thresholds), placement=placement(novel, learned, key_taxa),
        auroc=auroc([p.novelty_similarity for p in seen_p], [p.novelty_similarity for p in novel_p]),
        placing_auroc=auroc([p.similarity for p in seen_p], [p.similarity for p in novel_p]),
        novelty_parts=[part.name for part in index.parts if part.scores_novelty],
        novelty_dims=len(part_columns(index.parts, "scores_novelty")), dims=int(index.embeddings.shape[1]),
        answers=answer_summary(novel, novel_p, seen_p),
        baselines=baselines, best_k=best_k,
        congeners=genus_by_trained_congeners(novel, learned, key_taxa, training),
        baseline_congeners=genus_by_trained_congeners(novel, raw_nearest[best_k], key_taxa, training),
        misses={rank: species_misses(novel, learned, raw_nearest[best_k], answers, references, rank)
                for rank in ("order", "genus")},
        examples=example_answers(novel, seen, {p.query_id: p for p in predictions}))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _main_table(report: NovelSpeciesReport) -> list[str]:
    lines = ["| method | order | family | genus | AUROC seen vs novel |", "|---|---:|---:|---:|---:|",
             "| clibd (learned DNA tower, 1-NN) | " + " | ".join(_pct(report.placement[r]) for r in RANKS[:3])
             + f" | {report.auroc:.3f} |"]
    for k in sorted({5, report.best_k}):
        baseline = report.baselines[k]
        lines.append(f"| raw {k}-mer counts, 1-NN{' (best k)' if k == report.best_k else ''} | "
                     + " | ".join(_pct(baseline.placement[r]) for r in RANKS[:3]) + f" | {baseline.auroc:.3f} |")
    return lines


def _answers_line(answers: AnswerSummary) -> str:
    return (f"clibd identify on the novel queries: {_pct(answers.flagged)} % flagged novel "
            f"(seen queries flagged: {_pct(answers.false_alarms)} %); deepest rank given: "
            + ", ".join(f"{r} {_pct(answers.deepest[r])} %" for r in RANKS)
            + "; correct when given: " + ", ".join(f"{r} {_pct(answers.right_when_given[r])} %" for r in RANKS[:3]))


def _congener_table(report: NovelSpeciesReport) -> list[str]:
    lines = ["| species of the query's genus in training | queries (species) | clibd genus | "
             f"raw {report.best_k}-mer genus |", "|---|---:|---:|---:|"]
    for group, ours in report.congeners.items():
        lines.append(f"| {group} | {ours.queries} ({ours.species}) | {_pct(ours.accuracy)} | "
                     f"{_pct(report.baseline_congeners[group].accuracy)} |")
    return lines


def _example_table(examples: Sequence[ExampleAnswer]) -> list[str]:
    lines = ["| query_id | order | family | genus | species | similarity | novel | novelty_similarity | "
             "the specimen is |", "|---|---|---|---|---|---:|---|---:|---|"]
    for e in examples:
        lines.append(f"| {e.query_id} | " + " | ".join(e.answer.get(r, "") for r in RANKS)
                     + f" | {e.similarity:.4f} | {str(e.novel).lower()} | {e.novelty_similarity:.4f} | "
                     f"*{e.species}* ({e.kind}) |")
    return lines


def _miss_table(report: NovelSpeciesReport, rank: str) -> list[str]:
    misses = report.misses[rank]
    lines = [f"Novel species placed at the wrong {rank} by clibd: {len(misses)} species, "
             f"{sum(m.wrong for m in misses)} queries",
             f"| species | queries | clibd wrong | raw {report.best_k}-mer wrong | wrong in identify's answer | "
             f"references of its {rank} | clibd's commonest wrong {rank} |", "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {m.species} | {m.queries} | {m.wrong} | {m.other_wrong} | {m.answered_wrong} | {m.references} | "
              f"{m.commonest_wrong} |" for m in misses]
    return lines


def format_report(report: NovelSpeciesReport, title: str = "", examples: bool = False,
                  misses: bool = False) -> str:
    """The report as bench/README's markdown tables: placement and AUROC against raw k-mer 1-NN,
    identify's answers, genus placement by trained congeners, and optionally identify's example
    answers and the species placed at a wrong order or genus. `title` leads the first line.

    Usage:
        print(format_report(report, title="config configs/bold_dna.yaml (split seed 42)", misses=True))
    """
    lines = [f"{title + ', ' if title else ''}stage {report.stage}, model {report.model}; {report.references} "
             f"references ({report.reference_species} species), {report.novel_queries} novel-species queries "
             f"({report.novel_species} species), {report.seen_queries} seen queries",
             "thresholds: " + ", ".join(f"{r}={v:.3f}" for r, v in report.thresholds.items())]
    if report.novelty_dims < report.dims:
        lines.append(f"novelty scored on {report.novelty_dims} of {report.dims} dimensions (parts "
                     f"{', '.join(report.novelty_parts)}); AUROC of the whole embedding's similarity: "
                     f"{report.placing_auroc:.3f}")
    lines += ["", *_main_table(report), "", _answers_line(report.answers), "", *_congener_table(report)]
    if examples:
        lines += ["", *_example_table(report.examples)]
    if misses:
        for rank in ("order", "genus"):
            lines += ["", *_miss_table(report, rank)]
    return "\n".join(lines) + "\n"
