"""clibd identify against the alignment tools ecologists use, on the novel-species split.

The stage's records are `novel_species.stage_datasets`' (references: seen + validation-unseen
keys; queries: the test-unseen species, which no reference holds, and the seen test records).
Every tool answers every query (`alignment_tools.ToolAnswer`: the top hit's labels, a per-rank
answer after the tool's own cut-offs, a score), and `score_run` scores all of them alike:

- placement: the top hit's label over novel queries whose taxon at that rank exists among the
  references (`novel_species.placement`);
- strict: the answer over the same queries, an empty rank counting wrong;
- precision and coverage: of the ranks answered for the novel queries, how many are right, and
  how many novel queries get that rank at all;
- known species: top-1 species and the answered species over the seen queries;
- flagged novel (no species answered) on novel and on seen queries, and the AUROC of the score
  for seen against novel (identity for VSEARCH / BLAST, species bootstrap for SINTAX,
  `Prediction.novelty_similarity` for clibd);
- queries/s of the search (database build apart), on the same machine in the same run.

Usage:
    per_tool = compare_tools("runs/bold_dna/best", load_splits(config.data), ["clibd", "vsearch"], "work/")
    print(format_comparison({"42": per_tool}))
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import numpy as np

from ..constants import RANKS
from ..data.loading import TRAIN_SPLITS
from ..identify import Identifier, Prediction, read_predictions_tsv
from ..index import build_index
from .alignment_tools import (
    ToolAnswer,
    ToolRun,
    missing_binaries,
    run_blast,
    run_command,
    run_sintax,
    run_vsearch,
)
from .novel_species import auroc, identify_queries, placement, reference_taxa, stage_datasets

PLACED = RANKS[:3]  # a novel species has no right species among the references
QUERY_STEPS = ("embed queries", "search + species check + answers")  # clibd's timed steps that work on the queries


@dataclass(frozen=True)
class Tool:
    """A tool of the comparison: its table label, the binaries it needs, how to run it."""

    label: str
    binaries: tuple[str, ...]
    run: Callable[..., ToolRun]  # (model_dir, references, queries, workdir, threads) -> ToolRun


@dataclass
class ToolScores:
    """One tool's scores on one split (or their mean); fractions 0-1, times in seconds."""

    placement: dict[str, float]
    strict: dict[str, float]
    precision: dict[str, float]
    coverage: dict[str, float]
    known_top1: float
    known_strict: float
    flagged_novel: float
    flagged_known: float
    auroc: float
    queries: float
    build_seconds: float
    search_seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.search_seconds if self.search_seconds else float("nan")


def prediction_answer(prediction: Prediction) -> ToolAnswer:
    """clibd's `Prediction` as a `ToolAnswer`: its top hit, the calibrated answer and the novelty
    similarity. The top hit is the reference whose species clibd names where it names one (the
    species check may name a reference other than the nearest by embedding, as an aligner's top
    hit is the reference of highest identity), else the nearest reference.

    Usage:
        answers = [prediction_answer(p) for p in identifier.identify(queries)]
    """
    top = prediction.answer if prediction.answer.get("species") else prediction.hits[0].taxonomy
    return ToolAnswer(dict(top), dict(prediction.answer), prediction.novelty_similarity)


def _fraction(hits: int, total: int) -> float:
    return hits / total if total else float("nan")


def answer_rates(true: Sequence[dict], answers: Sequence[ToolAnswer],
                 key_taxa: dict[str, set]) -> tuple[dict[str, float], ...]:
    """(strict, precision, coverage) per rank of `PLACED` over novel queries: strict over those
    whose taxon exists among the references (an empty answer counts wrong), precision over the
    answered ones, coverage over all.

    Usage:
        strict, precision, coverage = answer_rates(novel, run.answers[: len(novel)], reference_taxa(references))
    """
    # strict: the placement of the answers themselves (an empty rank never equals a label)
    strict = {rank: value for rank, value in placement(true, [a.answer for a in answers], key_taxa).items()
              if rank in PLACED}
    precision, coverage = {}, {}
    for rank in PLACED:
        given = [(t[rank], a.answer[rank]) for t, a in zip(true, answers, strict=True) if a.answer[rank]]
        precision[rank] = _fraction(sum(x == y for x, y in given), len(given))
        coverage[rank] = _fraction(len(given), len(true))
    return strict, precision, coverage


def score_run(run: ToolRun, references: Sequence[dict], novel: Sequence[dict], seen: Sequence[dict]) -> ToolScores:
    """Score a tool's answers to `novel + seen` (in that order; see the module docstring).

    Usage:
        scores = score_run(run_vsearch(references, novel + seen, "work/"), references, novel, seen)
    """
    novel_a, seen_a = run.answers[: len(novel)], run.answers[len(novel) :]
    if len(seen_a) != len(seen):
        raise ValueError(f"{run.tool}: {len(run.answers)} answers for {len(novel)} + {len(seen)} queries")
    key_taxa = reference_taxa(references)
    strict, precision, coverage = answer_rates(novel, novel_a, key_taxa)
    return ToolScores(
        placement={rank: value for rank, value in placement(novel, [a.top for a in novel_a], key_taxa).items()
                   if rank in PLACED},
        strict=strict, precision=precision, coverage=coverage,
        known_top1=_fraction(sum(t["species"] == a.top["species"] for t, a in zip(seen, seen_a, strict=True)),
                             len(seen)),
        known_strict=_fraction(sum(t["species"] == a.answer["species"] for t, a in zip(seen, seen_a, strict=True)),
                               len(seen)),
        flagged_novel=_fraction(sum(not a.answer["species"] for a in novel_a), len(novel)),
        flagged_known=_fraction(sum(not a.answer["species"] for a in seen_a), len(seen)),
        auroc=auroc([a.score for a in seen_a], [a.score for a in novel_a]),
        queries=len(run.answers), build_seconds=run.build_seconds, search_seconds=run.search_seconds,
        timings=dict(run.timings), notes=list(run.notes))


def _write_queries_tsv(queries: Sequence[dict], path: Path) -> None:
    """The queries as `clibd identify --records` reads them: id and the barcode as given."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "dna"])
        writer.writerows([q["id"], q["dna"]] for q in queries)


def _cli_identify(model_dir: str | os.PathLike, index_dir: Path, queries: Sequence[dict], top_k: int,
                  work: Path) -> tuple[float, list[Prediction]]:
    """Wall-clock of the whole `clibd identify` command (start-up included) and its predictions."""
    _write_queries_tsv(queries, work / "queries.tsv")
    clibd = shutil.which("clibd")
    command = [clibd] if clibd else [sys.executable, "-m", "clibd.cli"]
    seconds = run_command([*command, "identify", "--index", str(index_dir), "--model", str(model_dir),
                           "--records", str(work / "queries.tsv"), "--top-k", str(top_k),
                           "--out", str(work / "predictions.tsv")])
    return seconds, read_predictions_tsv(work / "predictions.tsv")


def run_clibd(model_dir: str | os.PathLike, references: Sequence[dict], queries: Sequence[dict],
              workdir: str | os.PathLike, threads: int = 2, top_k: int = 5, cli: bool = True,
              index_options: dict | None = None) -> ToolRun:
    """clibd identify's answers (`novel_species.identify_queries`, as `evaluate_novel_species`
    runs it), then a timed second pass: index build, model + index load, embedding, search, and
    (with `cli`) the whole `clibd identify` command as a subprocess. `threads`: unused (torch
    takes the machine's cores), for the runners' common signature. `index_options`: `build_index`
    keywords (e.g. `{"precision": 0.98}`, `{"species_check": False}`).

    Usage:
        run = run_clibd("runs/bold_dna/best", references, novel + seen, "work/clibd")
    """
    work = Path(workdir)
    start = time.perf_counter()
    predictions, _ = identify_queries(model_dir, list(references), list(queries), top_k, work / "first",
                                      index_options)
    timings = {"first call (build + load + identify)": time.perf_counter() - start}
    marks = [time.perf_counter()]
    build_index(model_dir, list(references), "dna", work / "timed" / "references", progress=False,
                **(index_options or {}))
    marks.append(time.perf_counter())
    identifier = Identifier.load(work / "timed" / "references", model_dir=model_dir)
    marks.append(time.perf_counter())
    embeddings = identifier.embed(queries)
    marks.append(time.perf_counter())
    again = identifier.identify_embeddings(embeddings, [q["id"] for q in queries], top_k, barcodes=[q["dna"] for q in queries])
    marks.append(time.perf_counter())
    steps = ("index build", "model + index load", *QUERY_STEPS)
    timings |= {step: b - a for step, a, b in zip(steps, marks[:-1], marks[1:], strict=True)}
    notes = []
    if [p.answer for p in again] != [p.answer for p in predictions]:
        notes.append("the timed pass answered differently from the first")
    if cli:
        timings["clibd identify CLI (whole command)"], from_cli = _cli_identify(
            model_dir, work / "timed" / "references", queries, top_k, work)
        differ = sum(a.answer != b.answer for a, b in zip(from_cli, predictions, strict=True))
        if differ:
            notes.append(f"the CLI answered {differ} queries differently (similarities rounded to 4 decimals)")
    return ToolRun("clibd", [prediction_answer(p) for p in predictions], timings["index build"],
                   marks[-1] - marks[1], "in-process Identifier.load + identify", timings, notes)


def _alignment(runner: Callable[..., ToolRun], **options) -> Callable[..., ToolRun]:
    def run(model_dir, references, queries, workdir, threads):  # the model is clibd's alone
        return runner(references, queries, workdir, threads=threads, **options)
    return run


TOOLS = {
    "clibd": Tool("clibd identify", (), run_clibd),
    "vsearch": Tool("VSEARCH top hit (exhaustive)", ("vsearch",), _alignment(run_vsearch)),
    "vsearch-default": Tool("VSEARCH top hit (default heuristics)", ("vsearch",),
                            _alignment(run_vsearch, exhaustive=False)),
    "blast": Tool("BLAST+ top hit", ("makeblastdb", "blastn"), _alignment(run_blast)),
    "sintax": Tool("SINTAX (cut-off 0.8)", ("vsearch",), _alignment(run_sintax)),
}


def spread_sample(records: Sequence[dict], limit: int | None) -> list[dict]:
    """At most `limit` records, evenly spaced over `records` (whose species come in runs), so a
    quick run still sees many species; all of them when `limit` is None.

    Usage:
        spread_sample(novel, 100)
    """
    records = list(records)
    if limit is None or len(records) <= limit:
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def compare_tools(model_dir: str | os.PathLike, splits: datasets.DatasetDict, tools: Sequence[str],
                  workdir: str | os.PathLike, threads: int = 2, limit: int | None = None,
                  train_splits: Sequence[str] = TRAIN_SPLITS, stage: str = "test",
                  log: Callable[[str], None] = print, clibd_options: dict | None = None) -> dict[str, ToolScores]:
    """Run each of `tools` (keys of `TOOLS`) on a stage of `splits` and score it; a tool whose
    binary is missing is skipped with a message to `log`. Each tool works in `workdir`/TOOL,
    replaced if present. `limit`: at most that many novel and
    that many seen queries (`spread_sample`), for a quick run. `clibd_options`: `build_index`
    keywords for clibd's index (`run_clibd`).

    Usage:
        compare_tools("runs/bold_dna/best", load_splits(config.data), ["clibd", "blast"], "work/", limit=50)
    """
    _, *parts = stage_datasets(splits, stage, train_splits)
    references, novel, seen = (list(part) for part in parts)
    novel, seen = spread_sample(novel, limit), spread_sample(seen, limit)
    log(f"{len(references)} references, {len(novel)} novel and {len(seen)} seen queries")
    out = {}
    for name in tools:
        tool = TOOLS[name]
        if missing := missing_binaries(tool.binaries):
            log(f"skipping {tool.label}: {', '.join(missing)} not found on PATH (e.g. apt-get install "
                f"{'ncbi-blast+' if name == 'blast' else 'vsearch'})")
            continue
        shutil.rmtree(Path(workdir) / name, ignore_errors=True)  # a previous run's files: start afresh
        options = {"index_options": clibd_options} if name == "clibd" and clibd_options else {}
        run = tool.run(model_dir, references, novel + seen, Path(workdir) / name, threads, **options)
        out[name] = score_run(run, references, novel, seen)
        log(f"{tool.label}: {run.search_seconds:.1f} s search, {run.build_seconds:.1f} s build"
            + "".join(f"; {note}" for note in run.notes))
    return out


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def mean_scores(scores: Sequence[ToolScores]) -> ToolScores:
    """The mean of several splits' scores, field by field (nan where every split has nan).

    Usage:
        mean_scores([per_split[s]["vsearch"] for s in per_split])
    """
    out = {}
    for f in fields(ToolScores):
        values = [getattr(s, f.name) for s in scores]
        if f.name == "notes":
            out[f.name] = [note for v in values for note in v]
        elif isinstance(values[0], dict):
            out[f.name] = {key: _mean([v.get(key, float("nan")) for v in values]) for key in values[0]}
        else:
            out[f.name] = _mean(values)
    return ToolScores(**out)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _ranks(values: dict[str, float]) -> str:
    return " / ".join(_pct(values[rank]) for rank in PLACED)


def _row(label: str, split: str, s: ToolScores) -> str:
    build = "n/a" if math.isnan(s.build_seconds) else f"{s.build_seconds:.1f}"
    return (f"| {label} | {split} | {_ranks(s.placement)} | {_ranks(s.strict)} | {_ranks(s.precision)} | "
            f"{_ranks(s.coverage)} | {_pct(s.known_top1)} / {_pct(s.known_strict)} | {_pct(s.flagged_novel)} / "
            f"{_pct(s.flagged_known)} | {s.auroc:.3f} | {s.queries_per_second:.1f} | {build} |")


def comparison_table(per_split: dict[str, dict[str, ToolScores]]) -> list[str]:
    """The markdown table: per tool, the mean over the splits (bold) then each split.

    Usage:
        print("\\n".join(comparison_table({"42": compare_tools(...), "1": compare_tools(...)})))
    """
    lines = ["| tool | split | novel: top-hit placement o / f / g | novel: strict answer o / f / g | "
             "novel: precision o / f / g | novel: coverage o / f / g | known: species top-1 / answer | "
             "flagged novel: novel / known | AUROC seen vs novel | queries/s | database build s |",
             "|---|---|---|---|---|---|---|---|---:|---:|---:|"]
    names = list(dict.fromkeys(name for scores in per_split.values() for name in scores))
    for name in names:
        runs = {split: scores[name] for split, scores in per_split.items() if name in scores}
        label = TOOLS[name].label if name in TOOLS else name
        if len(runs) > 1:
            lines.append(_row(f"**{label}**", "**mean**", mean_scores(list(runs.values()))))
        lines += [_row(label if len(runs) == 1 else "", split, scores) for split, scores in runs.items()]
    return lines


def timing_lines(per_split: dict[str, dict[str, ToolScores]]) -> list[str]:
    """Mean seconds over the splits: each tool's build and search, and clibd's breakdown.

    Usage:
        print("\\n".join(timing_lines(per_split)))
    """
    names = list(dict.fromkeys(name for scores in per_split.values() for name in scores))
    lines = ["| tool | queries | database build s | search s (whole command) | queries/s |", "|---|---:|---:|---:|---:|"]
    for name in names:
        s = mean_scores([scores[name] for scores in per_split.values() if name in scores])
        lines.append(f"| {TOOLS[name].label if name in TOOLS else name} | {s.queries:.0f} | {s.build_seconds:.1f} | "
                     f"{s.search_seconds:.1f} | {s.queries_per_second:.1f} |")
        for step, seconds in s.timings.items():  # queries/s only for the steps that handle the queries
            rate = f"{s.queries / seconds:.1f}" if step in QUERY_STEPS else ""
            lines.append(f"| &nbsp;&nbsp;{step} | | | {seconds:.1f} | {rate} |")
    return lines


def format_comparison(per_split: dict[str, dict[str, ToolScores]], title: str = "") -> str:
    """The comparison table, the timing table and the runs' notes, as markdown.

    Usage:
        print(format_comparison({"42": compare_tools(...)}, title="configs/bold_dna.yaml"), end="")
    """
    lines = [title, ""] if title else []
    lines += [*comparison_table(per_split), "", *timing_lines(per_split)]
    notes = [f"- split {split}, {name}: {note}" for split, scores in per_split.items()
             for name, s in scores.items() for note in s.notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
