"""The alignment tools ecologists identify barcodes with (VSEARCH, BLAST+, SINTAX): run them on
clibd records and read their answers back in one shape, `ToolAnswer`.

Each runner writes the references and queries as FASTA, builds the tool's database, runs the
search and returns a `ToolRun`: one `ToolAnswer` per query, in query order, with the database
build and the search timed apart (wall-clock of each whole command). Barcodes are cleaned as a
curator would for any aligner (`clean_barcode`, `usable_reference`): alignment gaps removed,
leading and trailing N padding trimmed, and references with more than `MAX_N_FRACTION` N or
shorter than `MIN_REFERENCE_LENGTH` (BOLD's barcode standard) left out. VSEARCH scores N as
identical to any base, so a padded or N-rich reference would be every query's top hit (one BOLD
reference that is 80 % N topped 96 of 100 queries, untrimmed); and its identity leaves out terminal
gaps, so a short reference matched over 130-300 bases outranks full-length ones (in exhaustive
search, a 233-base reference was the top hit of novel queries of three orders).

Top-hit tools answer by the common identity cut-offs (`CUTOFFS`, `cutoff_answer`): the top hit's
label at each rank from order down, stopping at the first rank whose cut-off its percent identity
does not clear. SINTAX answers each rank whose bootstrap support reaches its cut-off, stopping at
the first that does not (`sintax_answer`).

Usage:
    run = run_vsearch(references, queries, "work/", threads=2)
    run.answers[0].answer   # {"order": "Diptera", "family": "Culicidae", "genus": "", "species": ""}
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..constants import RANKS
from ..data.records import SINTAX_PREFIX

# Percent identity a top hit needs for its label at each rank (the usual COI barcoding cut-offs).
CUTOFFS = {"order": 85.0, "family": 90.0, "genus": 95.0, "species": 97.0}
SINTAX_CUTOFF = 0.8
MAX_N_FRACTION = 0.01  # references with more N than this (after trimming the ends) are left out ...
MIN_REFERENCE_LENGTH = 500  # ... and those shorter than this (bases, after cleaning)
# BLAST's -max_target_seqs is not "the best N": it keeps the first N good-enough targets found, so
# the best of several is taken (by bitscore) rather than trusting the first.
BLAST_TARGETS = 10
BLAST_FIELDS = ("qseqid", "sseqid", "pident", "length", "bitscore")
NO_HIT: dict[str, str] = dict.fromkeys(RANKS, "")


class ToolAnswer(NamedTuple):
    """One query's identification by one tool."""

    top: dict[str, str]  # the top hit's labels (SINTAX: its unfiltered lineage); "" when no hit
    answer: dict[str, str]  # rank -> label; "" below the deepest rank the tool is confident of
    score: float  # higher = more likely a known species: percent identity, bootstrap, cosine


class SintaxCall(NamedTuple):
    """SINTAX's lineage for one query and the bootstrap support of each rank (0-1)."""

    labels: dict[str, str]
    support: dict[str, float]


@dataclass
class ToolRun:
    """A tool's answers to the queries, in query order, and how long it took (seconds)."""

    tool: str
    answers: list[ToolAnswer]
    build_seconds: float  # the database build (nan when the tool has none)
    search_seconds: float  # the whole search command
    command: str = ""  # the search command line, as run
    timings: dict[str, float] = field(default_factory=dict)  # a finer breakdown (clibd)
    notes: list[str] = field(default_factory=list)


def missing_binaries(binaries: Sequence[str]) -> list[str]:
    """The binaries of `binaries` not on PATH.

    Usage:
        if missing := missing_binaries(["makeblastdb", "blastn"]): print("skip BLAST:", missing)
    """
    return [name for name in binaries if shutil.which(name) is None]


def clean_barcode(dna: str) -> str:
    """A barcode as aligners want it: upper case, no alignment gaps, no N padding at either end.

    Usage:
        clean_barcode("--nnACGT-AC-NN") == "ACGTAC"
    """
    return re.sub(r"[-.\s]", "", dna.upper()).strip("N")


def usable_reference(sequence: str, max_n_fraction: float = MAX_N_FRACTION,
                     min_length: int = MIN_REFERENCE_LENGTH) -> bool:
    """Whether a cleaned reference barcode is kept: at least `min_length` bases, at most
    `max_n_fraction` of them N.

    Usage:
        references = [r for r in records if usable_reference(clean_barcode(r["dna"]))]
    """
    return len(sequence) >= max(min_length, 1) and sequence.count("N") <= max_n_fraction * len(sequence)


def sintax_name(label: str) -> str:
    """A label as a SINTAX header holds it: the characters its syntax uses (, ; : and blanks)
    replaced by underscores.

    Usage:
        sintax_name("Aedes aegypti") == "Aedes_aegypti"
    """
    return re.sub(r"[,;:()\s]", "_", label)


def write_fasta(records: Sequence[dict], path: str | os.PathLike, sintax: bool = False,
                references: bool = False) -> int:
    """Write records' cleaned barcodes as FASTA (header: the id; with `sintax`, `id;tax=o:...,
    f:...,g:...,s:...;`), leaving out empty barcodes and, for `references`, unusable ones
    (`usable_reference`). Returns the number written.

    Usage:
        write_fasta(references, "work/refs.fasta", sintax=True, references=True)
    """
    written = 0
    with open(path, "w") as f:
        for record in records:
            sequence = clean_barcode(record["dna"])
            if not sequence or (references and not usable_reference(sequence)):
                continue
            header = record["id"]
            if sintax:
                header += ";tax=" + ",".join(f"{p}:{sintax_name(record[rank])}" for p, rank in SINTAX_PREFIX.items()
                                             if record[rank]) + ";"
            f.write(f">{header}\n{sequence}\n")
            written += 1
    return written


def cutoff_answer(taxonomy: dict[str, str], identity: float, cutoffs: dict[str, float] = CUTOFFS) -> dict[str, str]:
    """The top hit's labels from order down while `identity` (percent) clears each rank's cut-off;
    the first rank it does not clear and all below are "".

    Usage:
        cutoff_answer(hit_taxonomy, 96.2)   # order, family and genus given, species ""
    """
    answer, confident = {}, True
    for rank in RANKS:
        confident = confident and identity >= cutoffs[rank]
        answer[rank] = taxonomy.get(rank, "") if confident else ""
    return answer


def sintax_answer(call: SintaxCall, cutoff: float = SINTAX_CUTOFF) -> dict[str, str]:
    """SINTAX's lineage from order down while each rank's bootstrap support reaches `cutoff`.

    Usage:
        sintax_answer(SintaxCall(labels, {"order": 1.0, "family": 0.9, "genus": 0.6, "species": 0.4}))
    """
    answer, confident = {}, True
    for rank in RANKS:
        confident = confident and bool(call.labels.get(rank)) and call.support.get(rank, 0.0) >= cutoff
        answer[rank] = call.labels[rank] if confident else ""
    return answer


def parse_vsearch_userout(path: str | os.PathLike) -> dict[str, tuple[str, float]]:
    """query -> (target, percent identity) of its best hit, from a `--userout` file with
    `--userfields query+target+id`; queries without a hit (target `*`) are left out.

    Usage:
        best = parse_vsearch_userout("work/vsearch.tsv")["BOLD123-45"]
    """
    best: dict[str, tuple[str, float]] = {}
    with open(path) as f:
        for line in f:
            query, target, identity = line.rstrip("\n").split("\t")[:3]
            if target != "*" and (query not in best or float(identity) > best[query][1]):
                best[query] = (target.split(";", 1)[0], float(identity))
    return best


def parse_blast_tabular(path: str | os.PathLike) -> dict[str, tuple[str, float, float]]:
    """query -> (subject, percent identity, bitscore) of the HSP with the best bitscore (ties: the
    higher identity, then the first listed), from `-outfmt "6 qseqid sseqid pident length bitscore"`.

    Usage:
        subject, identity, bits = parse_blast_tabular("work/blast.tsv")["BOLD123-45"]
    """
    best: dict[str, tuple[str, float, float]] = {}
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            query, subject, identity, _, bitscore = line.rstrip("\n").split("\t")[:5]
            hit = (subject, float(identity), float(bitscore))
            if query not in best or (hit[2], hit[1]) > (best[query][2], best[query][1]):
                best[query] = hit
    return best


def parse_sintax(path: str | os.PathLike, names: dict[str, dict[str, str]] | None = None) -> dict[str, SintaxCall]:
    """query -> its `SintaxCall`, from a `--tabbedout` file (query, `o:X(1.00),f:Y(0.93),...`,
    strand, filtered lineage). `names`: rank -> SINTAX name -> label, to undo `sintax_name`
    (default: underscores back to blanks). Queries SINTAX could not classify get empty labels.

    Usage:
        calls = parse_sintax("work/sintax.tsv"); sintax_answer(calls["BOLD123-45"], 0.8)
    """
    calls = {}
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            labels, support = dict(NO_HIT), dict.fromkeys(RANKS, 0.0)
            for part in filter(None, (fields[1] if len(fields) > 1 else "").split(",")):
                match = re.fullmatch(r"(\w):(.*)\(([\d.]+)\)", part)
                if match and match[1] in SINTAX_PREFIX:
                    rank = SINTAX_PREFIX[match[1]]
                    labels[rank] = (names or {}).get(rank, {}).get(match[2], match[2].replace("_", " "))
                    support[rank] = float(match[3])
            calls[fields[0].split(";", 1)[0]] = SintaxCall(labels, support)
    return calls


def run_command(argv: Sequence[str]) -> float:
    """Run a tool's command; its wall-clock seconds. A failure raises with the tool's stderr.

    Usage:
        seconds = run_command(["makeblastdb", "-in", "refs.fasta", "-dbtype", "nucl", "-out", "refs"])
    """
    start = time.perf_counter()
    result = subprocess.run(list(argv), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return seconds


def _top_hit_answers(queries: Sequence[dict], hits: dict[str, tuple], by_id: dict[str, dict],
                     cutoffs: dict[str, float]) -> list[ToolAnswer]:
    """A `ToolAnswer` per query from its top hit (reference id, percent identity, ...); a query
    without a hit gets no labels and score 0."""
    answers = []
    for query in queries:
        if query["id"] not in hits:
            answers.append(ToolAnswer(dict(NO_HIT), dict(NO_HIT), 0.0))
            continue
        target, identity = hits[query["id"]][:2]
        top = {rank: by_id[target][rank] for rank in RANKS}
        answers.append(ToolAnswer(top, cutoff_answer(top, identity, cutoffs), identity))
    return answers


def _prepare(references: Sequence[dict], queries: Sequence[dict], workdir: str | os.PathLike,
             sintax: bool = False) -> tuple[Path, list[str]]:
    """Write the references and queries FASTA under `workdir`; (workdir, notes)."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    kept = write_fasta(references, work / "references.fasta", sintax=sintax, references=True)
    write_fasta(queries, work / "queries.fasta")
    notes = [f"{len(references) - kept} of {len(references)} references left out (< {MIN_REFERENCE_LENGTH} "
             f"bases or > {MAX_N_FRACTION:.0%} N after trimming)"] if kept < len(references) else []
    return work, notes


def _no_hit_note(answers: Sequence[ToolAnswer]) -> list[str]:
    missed = sum(not a.top["order"] for a in answers)
    return [f"{missed} of {len(answers)} queries without a hit"] if missed else []


def run_vsearch(references: Sequence[dict], queries: Sequence[dict], workdir: str | os.PathLike,
                threads: int = 2, exhaustive: bool = True, min_identity: float = 0.5,
                cutoffs: dict[str, float] = CUTOFFS) -> ToolRun:
    """VSEARCH's top hit by global alignment (`--usearch_global`) against a UDB database of the
    references, answered by `cutoffs`. `exhaustive`: `--maxaccepts 0 --maxrejects 0`, so every
    reference is aligned and the top hit is the one of highest identity (VSEARCH's defaults,
    1 and 32, stop at the first target above `min_identity` among those sharing most k-mers);
    `min_identity` (0-1) is low so that every query gets a hit.

    Usage:
        run = run_vsearch(references, novel + seen, "work/vsearch", threads=2)
    """
    work, notes = _prepare(references, queries, workdir)
    build = run_command(["vsearch", "--makeudb_usearch", str(work / "references.fasta"), "--output",
                         str(work / "references.udb"), "--threads", str(threads), "--quiet"])
    argv = ["vsearch", "--usearch_global", str(work / "queries.fasta"), "--db", str(work / "references.udb"),
            *(["--maxaccepts", "0", "--maxrejects", "0"] if exhaustive else []),
            "--id", str(min_identity), "--maxhits", "1", "--threads", str(threads), "--userout",
            str(work / "hits.tsv"), "--userfields", "query+target+id", "--output_no_hits", "--quiet"]
    search = run_command(argv)
    by_id = {r["id"]: r for r in references}
    answers = _top_hit_answers(queries, parse_vsearch_userout(work / "hits.tsv"), by_id, cutoffs)
    return ToolRun("vsearch" if exhaustive else "vsearch-default", answers, build, search, " ".join(argv),
                   notes=notes + _no_hit_note(answers))


def run_blast(references: Sequence[dict], queries: Sequence[dict], workdir: str | os.PathLike,
              threads: int = 2, targets: int = BLAST_TARGETS, task: str = "megablast",
              cutoffs: dict[str, float] = CUTOFFS) -> ToolRun:
    """BLAST+'s top hit (`blastn`, default task megablast): the HSP with the best bitscore among
    `targets` subjects (not `-max_target_seqs 1`, which keeps the first good subject found, not
    the best), answered by `cutoffs` on its percent identity (over the local alignment).

    Usage:
        run = run_blast(references, novel + seen, "work/blast", threads=2)
    """
    work, notes = _prepare(references, queries, workdir)
    build = run_command(["makeblastdb", "-in", str(work / "references.fasta"), "-dbtype", "nucl",
                         "-out", str(work / "references")])
    argv = ["blastn", "-task", task, "-query", str(work / "queries.fasta"), "-db", str(work / "references"),
            "-outfmt", "6 " + " ".join(BLAST_FIELDS), "-max_target_seqs", str(targets),
            "-num_threads", str(threads), "-out", str(work / "hits.tsv")]
    search = run_command(argv)
    by_id = {r["id"]: r for r in references}
    answers = _top_hit_answers(queries, parse_blast_tabular(work / "hits.tsv"), by_id, cutoffs)
    return ToolRun("blast", answers, build, search, " ".join(argv), notes=notes + _no_hit_note(answers))


def run_sintax(references: Sequence[dict], queries: Sequence[dict], workdir: str | os.PathLike,
               threads: int = 2, cutoff: float = SINTAX_CUTOFF, seed: int = 1) -> ToolRun:
    """SINTAX (`vsearch --sintax`, k-mer bootstrap against a UDB of the references with
    `;tax=o:...,f:...,g:...,s:...;` headers): its lineage is the top hit, each rank answered
    while its bootstrap support reaches `cutoff`; the species support is the score. `seed`:
    SINTAX's random subsampling (runs agree exactly only with one thread).

    Usage:
        run = run_sintax(references, novel + seen, "work/sintax", cutoff=0.8)
    """
    work, notes = _prepare(references, queries, workdir, sintax=True)
    build = run_command(["vsearch", "--makeudb_usearch", str(work / "references.fasta"), "--output",
                         str(work / "references.udb"), "--threads", str(threads), "--quiet"])
    argv = ["vsearch", "--sintax", str(work / "queries.fasta"), "--db", str(work / "references.udb"),
            "--tabbedout", str(work / "sintax.tsv"), "--sintax_cutoff", str(cutoff), "--randseed", str(seed),
            "--threads", str(threads), "--quiet"]
    search = run_command(argv)
    names = {rank: {sintax_name(r[rank]): r[rank] for r in references} for rank in RANKS}
    calls = parse_sintax(work / "sintax.tsv", names)
    empty = SintaxCall(dict(NO_HIT), dict.fromkeys(RANKS, 0.0))
    answers = []
    for query in queries:
        call = calls.get(query["id"], empty)
        answers.append(ToolAnswer(dict(call.labels), sintax_answer(call, cutoff), call.support["species"]))
    return ToolRun("sintax", answers, build, search, " ".join(argv), notes=notes + _no_hit_note(answers))
