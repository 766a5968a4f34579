"""The alignment-tool comparison (clibd.evaluation.alignment_tools, clibd.evaluation.tool_comparison):
the tools' output parsers, the cut-off rules and the scores on small files and records written
here, and VSEARCH / BLAST+ / SINTAX themselves on a few synthetic barcodes (skipped without them)."""

from __future__ import annotations

import math
import random
import shutil

import pytest

from clibd.data import records_to_dataset
from clibd.evaluation.alignment_tools import (
    CUTOFFS,
    SintaxCall,
    ToolAnswer,
    ToolRun,
    clean_barcode,
    cutoff_answer,
    parse_blast_tabular,
    parse_sintax,
    parse_vsearch_userout,
    run_blast,
    run_sintax,
    run_vsearch,
    sintax_answer,
    usable_reference,
    write_fasta,
)
from clibd.evaluation.tool_comparison import (
    TOOLS,
    Tool,
    compare_tools,
    format_comparison,
    mean_scores,
    score_run,
    spread_sample,
)

LINEAGE = {"order": "Diptera", "family": "Culicidae", "genus": "Aedes", "species": "Aedes aegypti"}
EMPTY = dict.fromkeys(LINEAGE, "")


def record(id_: str, order: str, family: str, genus: str, species: str, dna: str = "ACGT" * 150) -> dict:
    return {"id": id_, "order": order, "family": family, "genus": genus, "species": species, "dna": dna, "image": ""}


# --- cleaning and FASTA ---------------------------------------------------------------------------

def test_clean_barcode_removes_gaps_and_n_padding_only():
    assert clean_barcode("--nnACG-TNAC..GT-NN \n") == "ACGTNACGT"  # the inner N stays


def test_usable_reference_needs_length_and_few_n():
    assert usable_reference("A" * 500)
    assert not usable_reference("A" * 499)
    assert usable_reference("A" * 495 + "N" * 5)  # 1 % N
    assert not usable_reference("A" * 494 + "N" * 6)
    assert usable_reference("ACGT", min_length=4) and not usable_reference("", min_length=0)


def test_write_fasta_sintax_headers_and_reference_filter(tmp_path):
    references = [record("r1", "Diptera", "Culicidae", "Aedes", "Aedes aegypti, s.l.", "--NN" + "ACGT" * 150 + "NN"),
                  record("r2", "Diptera", "Culicidae", "Aedes", "", "ACGT" * 150),  # no species label
                  record("short", "Diptera", "Culicidae", "Aedes", "Aedes sp", "ACGT" * 50)]
    assert write_fasta(references, tmp_path / "refs.fasta", sintax=True, references=True) == 2
    lines = (tmp_path / "refs.fasta").read_text().splitlines()
    assert lines[0] == ">r1;tax=o:Diptera,f:Culicidae,g:Aedes,s:Aedes_aegypti__s.l.;"
    assert lines[1] == "ACGT" * 150
    assert lines[2] == ">r2;tax=o:Diptera,f:Culicidae,g:Aedes;"
    # queries are not filtered by length, only empty barcodes are left out
    queries = [references[2], record("gap", "", "", "", "", "--")]
    assert write_fasta(queries, tmp_path / "q.fasta") == 1
    assert (tmp_path / "q.fasta").read_text() == ">short\n" + "ACGT" * 50 + "\n"


# --- cut-off rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("identity", "deepest"), [(100.0, "species"), (97.0, "species"), (96.99, "genus"),
                                                    (95.0, "genus"), (92.0, "family"), (85.0, "order"),
                                                    (84.9, None)])
def test_cutoff_answer_stops_at_first_rank_not_cleared(identity, deepest):
    answer = cutoff_answer(LINEAGE, identity)
    given = [rank for rank in LINEAGE if answer[rank]]
    assert (given[-1] if given else None) == deepest
    assert all(answer[rank] == LINEAGE[rank] for rank in given)
    assert given == list(LINEAGE)[: len(given)]  # no gaps: from order down


def test_cutoff_answer_does_not_resume_below_a_failed_rank():
    cutoffs = {**CUTOFFS, "family": 99.0}  # family harder than genus
    assert cutoff_answer(LINEAGE, 96.0, cutoffs) == {**EMPTY, "order": "Diptera"}


def test_sintax_answer_uses_support_and_stops_at_first_rank_below():
    call = SintaxCall(LINEAGE, {"order": 1.0, "family": 0.8, "genus": 0.79, "species": 0.9})
    assert sintax_answer(call, 0.8) == {**LINEAGE, "genus": "", "species": ""}
    assert sintax_answer(call, 0.5) == LINEAGE
    assert sintax_answer(SintaxCall(EMPTY, dict.fromkeys(LINEAGE, 1.0)), 0.8) == EMPTY


# --- parsers ----------------------------------------------------------------------------------------

def test_parse_vsearch_userout(tmp_path):
    path = tmp_path / "hits.tsv"
    path.write_text("q1\tr1\t98.5\nq2\t*\t0.0\nq3\tr7;tax=o:Diptera;\t91.0\nq1\tr2\t99.1\nq1\tr3\t90.0\n")
    assert parse_vsearch_userout(path) == {"q1": ("r2", 99.1), "q3": ("r7", 91.0)}


def test_parse_blast_tabular_takes_best_bitscore_not_first_line(tmp_path):
    path = tmp_path / "blast.tsv"
    path.write_text("# BLASTN 2.12.0+\n"
                    "q1\tr1\t100.000\t120\t222\n"  # a short perfect HSP: listed first, lower bitscore
                    "q1\tr2\t97.500\t600\t1000\n"
                    "q1\tr3\t99.000\t590\t1000\n"  # same bitscore, higher identity: wins the tie
                    "q2\tr4\t88.100\t640\t700\n\n")
    assert parse_blast_tabular(path) == {"q1": ("r3", 99.0, 1000.0), "q2": ("r4", 88.1, 700.0)}


def test_parse_sintax(tmp_path):
    path = tmp_path / "sintax.tsv"
    path.write_text("q1\to:Diptera(1.00),f:Culicidae(0.93),g:Aedes(0.71),s:Aedes_aegypti__s.l.(0.40)\t+\t"
                    "o:Diptera,f:Culicidae\n"
                    "q2\t\t\t\n"
                    "q3;size=2\to:Coleoptera(0.55)\t+\t\n")
    names = {"species": {"Aedes_aegypti__s.l.": "Aedes aegypti, s.l."}}
    calls = parse_sintax(path, names)
    assert calls["q1"].labels == {**LINEAGE, "species": "Aedes aegypti, s.l."}
    assert calls["q1"].support == {"order": 1.0, "family": 0.93, "genus": 0.71, "species": 0.40}
    assert calls["q2"] == SintaxCall(EMPTY, dict.fromkeys(LINEAGE, 0.0))
    assert calls["q3"].labels["order"] == "Coleoptera" and calls["q3"].support["family"] == 0.0
    assert parse_sintax(path)["q1"].labels["species"] == "Aedes aegypti  s.l."  # default: underscores to blanks


# --- scores -----------------------------------------------------------------------------------------

def _scoring_case():
    references = [record("r1", "Diptera", "Culicidae", "Aedes", "Aedes aegypti"),
                  record("r2", "Diptera", "Culicidae", "Culex", "Culex pipiens"),
                  record("r3", "Coleoptera", "Carabidae", "Carabus", "Carabus nemoralis")]
    novel = [record("n1", "Diptera", "Culicidae", "Aedes", "Aedes albopictus"),
             record("n2", "Diptera", "Culicidae", "Culex", "Culex quinque"),
             record("n3", "Diptera", "Tipulidae", "Tipula", "Tipula oleracea")]  # family and genus unknown
    seen = [record("s1", "Diptera", "Culicidae", "Aedes", "Aedes aegypti"),
            record("s2", "Coleoptera", "Carabidae", "Carabus", "Carabus nemoralis")]
    lineage = {r["id"]: {k: r[k] for k in LINEAGE} for r in references}
    cut = {"r1": {**lineage["r1"], "species": ""}, "r2o": {**EMPTY, "order": "Diptera"}}
    answers = [ToolAnswer(lineage["r1"], cut["r1"], 0.5),  # n1: right genus, answered to genus
               ToolAnswer(lineage["r1"], cut["r2o"], 0.2),  # n2: wrong genus placed, answered order only
               ToolAnswer(lineage["r2"], lineage["r2"], 0.9),  # n3: a species answered (wrong), family wrong
               ToolAnswer(lineage["r1"], lineage["r1"], 0.95),  # s1: right
               ToolAnswer(lineage["r3"], EMPTY, 0.4)]  # s2: right top hit, no answer
    return references, novel, seen, ToolRun("fake", answers, 1.0, 2.5)


def test_score_run_against_hand_computed_values():
    references, novel, seen, run = _scoring_case()
    s = score_run(run, references, novel, seen)
    assert s.placement == {"order": 1.0, "family": 2 / 2, "genus": 1 / 2}  # n3 counts at order only
    assert s.strict == {"order": 1.0, "family": 1 / 2, "genus": 1 / 2}
    assert s.precision == {"order": 1.0, "family": 1 / 2, "genus": 1 / 2}
    assert s.coverage == {"order": 1.0, "family": 2 / 3, "genus": 2 / 3}
    assert (s.known_top1, s.known_strict) == (1.0, 0.5)
    assert (s.flagged_novel, s.flagged_known) == (2 / 3, 0.5)
    # seen scores 0.95, 0.4 against novel 0.5, 0.2, 0.9: 0.95 beats all three, 0.4 beats one
    assert s.auroc == pytest.approx(4 / 6)
    assert s.queries == 5 and s.queries_per_second == pytest.approx(2.0)


def test_score_run_rejects_misaligned_answers():
    references, novel, seen, run = _scoring_case()
    with pytest.raises(ValueError, match="answers for 3 \\+ 1 queries"):
        score_run(run, references, novel, seen[:1])


def test_mean_scores_skips_nan_and_format_lists_every_split():
    references, novel, seen, run = _scoring_case()
    a = score_run(run, references, novel, seen)
    b = score_run(ToolRun("fake", run.answers, float("nan"), 5.0), references, novel, seen)
    b.auroc = float("nan")
    mean = mean_scores([a, b])
    assert mean.auroc == a.auroc and mean.build_seconds == 1.0 and mean.search_seconds == 3.75
    assert math.isclose(mean.placement["genus"], 0.5)
    text = format_comparison({"42": {"vsearch": a}, "1": {"vsearch": b}})
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| **VSEARCH top hit (exhaustive)** | **mean** | 100.0 / 100.0 / 50.0 |")
    assert rows[2].startswith("|  | 42 |") and rows[3].startswith("|  | 1 |") and rows[3].endswith("| n/a |")
    a.timings = {"index build": 2.0, "embed queries": 2.5}  # 5 queries: 2 per second, build has no rate
    timing = format_comparison({"42": {"clibd": a}}).splitlines()
    assert "| &nbsp;&nbsp;index build | | | 2.0 |  |" in timing
    assert "| &nbsp;&nbsp;embed queries | | | 2.5 | 2.0 |" in timing


def test_spread_sample_spreads_over_the_list():
    assert spread_sample(list(range(10)), 3) == [0, 3, 6]
    assert spread_sample([1, 2], 5) == [1, 2] and spread_sample([1, 2], None) == [1, 2]


def test_compare_tools_scores_runnable_tools_and_skips_missing_binaries(monkeypatch, tmp_path):
    references, novel, seen, run = _scoring_case()
    splits = {"seen_keys": references[:2], "val_unseen_keys": references[2:], "test_unseen": novel,
              "test_seen": seen, "train_seen": references}
    splits = {name: records_to_dataset(records) for name, records in splits.items()}
    calls = []

    def fake(model_dir, refs, queries, workdir, threads):
        calls.append(([r["id"] for r in refs], [q["id"] for q in queries], threads))
        return run

    monkeypatch.setitem(TOOLS, "fake", Tool("fake tool", (), fake))
    monkeypatch.setitem(TOOLS, "absent", Tool("absent tool", ("no-such-binary-clibd",), fake))
    logged = []
    out = compare_tools("model", splits, ["absent", "fake"], tmp_path, threads=3, log=logged.append)
    assert list(out) == ["fake"] and out["fake"].strict["genus"] == 0.5
    assert calls == [(["r1", "r2", "r3"], ["n1", "n2", "n3", "s1", "s2"], 3)]
    assert any("skipping absent tool: no-such-binary-clibd not found" in line for line in logged)


# --- the tools themselves ---------------------------------------------------------------------------

def _mutate(sequence: str, fraction: float, rng: random.Random) -> str:
    sites = rng.sample(range(len(sequence)), round(fraction * len(sequence)))
    bases = list(sequence)
    for i in sites:
        bases[i] = rng.choice([b for b in "ACGT" if b != bases[i]])
    return "".join(bases)


@pytest.fixture
def synthetic():
    """Two congeneric references 8 % apart, a third order; one query 1 % from r1, one 6 % from r1."""
    rng = random.Random(0)
    a = "".join(rng.choice("ACGT") for _ in range(600))
    references = [record("r1", "Diptera", "Culicidae", "Aedes", "Aedes aegypti", a),
                  record("r2", "Diptera", "Culicidae", "Aedes", "Aedes vexans", _mutate(a, 0.08, rng)),
                  record("r3", "Coleoptera", "Carabidae", "Carabus", "Carabus nemoralis",
                         "".join(rng.choice("ACGT") for _ in range(600)))]
    queries = [record("close", "", "", "", "", "--" + _mutate(a, 0.01, rng)[5:]),
               record("far", "", "", "", "", _mutate(a, 0.06, rng))]
    return references, queries


@pytest.mark.parametrize("runner", [run_vsearch, run_blast], ids=["vsearch", "blast"])
def test_top_hit_tools_on_synthetic_barcodes(runner, synthetic, tmp_path):
    binary = "vsearch" if runner is run_vsearch else "blastn"
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not on PATH (apt-get install {'vsearch' if binary == 'vsearch' else 'ncbi-blast+'})")
    references, queries = synthetic
    run = runner(references, queries, tmp_path, threads=1)
    close, far = run.answers
    assert close.top["species"] == "Aedes aegypti" and close.answer == close.top and close.score >= 98.0
    assert far.top["species"] == "Aedes aegypti" and 90.0 <= far.score < 95.0
    assert far.answer == {**close.top, "genus": "", "species": ""}  # family cleared, genus not
    assert run.search_seconds > 0 and run.build_seconds > 0 and not run.notes
    if runner is run_vsearch:
        assert "--maxaccepts 0 --maxrejects 0" in run.command


def test_sintax_on_synthetic_barcodes(synthetic, tmp_path):
    if shutil.which("vsearch") is None:
        pytest.skip("vsearch not on PATH (apt-get install vsearch)")
    references, queries = synthetic
    run = run_sintax(references, queries, tmp_path, threads=1)
    close = run.answers[0]
    assert close.top["species"] == "Aedes aegypti" and close.answer["order"] == "Diptera"
    assert 0.0 < close.score <= 1.0 and "--sintax_cutoff 0.8" in run.command


def test_sintax_fasta_written_for_the_bench_reads_back_with_clibds_reader(tmp_path):
    """The SINTAX header the bench writes is the one `read_fasta` parses (one prefix table)."""
    from clibd.data import read_fasta

    record = {"id": "R1", "order": "Diptera", "family": "Culicidae", "genus": "Aedes", "species": "Aedes aegypti",
              "dna": "ACGT" * 30}
    assert write_fasta([record], tmp_path / "refs.fasta", sintax=True) == 1
    [back] = read_fasta(tmp_path / "refs.fasta")
    assert {k: back[k] for k in ("id", "order", "family", "genus", "species", "dna")} == record
