"""Novel-species evaluation (clibd.evaluation.novel_species): each metric against hand-computed
values, the whole evaluation on a slice of the shared BOLD records, and bench/novel_species.py's CLI."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from clibd.evaluation.novel_species import (
    GroupAccuracy,
    answer_summary,
    auroc,
    example_answers,
    format_report,
    genus_by_trained_congeners,
    nearest_references,
    placement,
    raw_kmer_baseline,
    reference_taxa,
    species_misses,
    stage_datasets,
)
from clibd.identify import Prediction

ROOT = Path(__file__).resolve().parents[1]


def taxon(order: str, family: str, genus: str, species: str, **extra) -> dict:
    return {"order": order, "family": family, "genus": genus, "species": species, **extra}


def prediction(query_id: str, answer: dict, novel: bool) -> Prediction:
    return Prediction(query_id, answer, 0.5, 0.4, novel, {}, [])


def brute_force_auroc(positive: list[float], negative: list[float]) -> float:
    pairs = list(itertools.product(positive, negative))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_auroc_counts_ties_half_like_a_pair_count():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5
    # 3 x 3 pairs: 0.7 beats all three (3), 0.5 beats 0.2 and ties 0.5 twice (1 + 1), 0.2 ties 0.2 (0.5)
    assert auroc([0.7, 0.5, 0.2], [0.5, 0.5, 0.2]) == pytest.approx(5.5 / 9)
    rng = random.Random(0)
    for _ in range(20):  # heavy ties: scores on a coarse grid
        positive = [rng.randint(0, 5) / 5 for _ in range(rng.randint(1, 30))]
        negative = [rng.randint(0, 5) / 5 for _ in range(rng.randint(1, 30))]
        assert auroc(positive, negative) == pytest.approx(brute_force_auroc(positive, negative))
    assert math.isnan(auroc([], [0.3]))


def test_placement_counts_only_queries_whose_taxon_has_references():
    references = [taxon("A", "Fa", "Ga", "a1"), taxon("A", "Fb", "Gb", "b1")]
    key_taxa = reference_taxa(references)
    true = [taxon("A", "Fa", "Ga", "a2"), taxon("A", "Fa", "Gc", "c1"), taxon("B", "Fd", "Gd", "d1")]
    predicted = [references[1], references[0], references[0]]
    result = placement(true, predicted, key_taxa)
    assert result["order"] == 1.0  # the third query's order B has no reference
    assert result["family"] == 0.5  # Fa for the first two: wrong, then right
    assert result["genus"] == 0.0  # only the first query's genus has references: placed at Gb
    assert math.isnan(result["species"])  # no novel species has a reference


def test_answer_summary_is_strict():
    true = [taxon("A", "F", "G", "s1"), taxon("A", "F", "G", "s2"), taxon("A", "F", "H", "s3"),
            taxon("A", "F", "G", "s4")]
    answers = [taxon("A", "F", "G", ""), taxon("A", "E", "", ""), taxon("A", "F", "G", ""), taxon("", "", "", "")]
    novel = [prediction(f"q{i}", a, bool(flag)) for i, (a, flag) in enumerate(zip(answers, [1, 1, 0, 1], strict=True))]
    seen = [prediction(f"s{i}", taxon("A", "F", "G", "s"), bool(flag)) for i, flag in enumerate([0, 1, 0, 0, 0])]
    summary = answer_summary(true, novel, seen)
    assert summary.flagged == 0.75 and summary.false_alarms == 0.2
    assert summary.deepest == {"order": 0.0, "family": 0.25, "genus": 0.5, "species": 0.0}
    assert summary.right_when_given["order"] == 1.0
    assert summary.right_when_given["family"] == pytest.approx(2 / 3)
    assert summary.right_when_given["genus"] == 0.5
    assert math.isnan(summary.right_when_given["species"])


def test_genus_placement_by_trained_congeners():
    trained = [taxon("A", "F", "G1", "x"), taxon("A", "F", "G1", "y"), taxon("A", "F", "G1", "y"),
               taxon("A", "F", "G2", "z"), taxon("A", "F", "G2", "")]  # no species label: no congener
    key_taxa = reference_taxa([taxon("A", "F", g, "k") for g in ("G1", "G2", "G3")])
    true = [taxon("A", "F", "G1", "n1"), taxon("A", "F", "G1", "n1"), taxon("A", "F", "G1", "n2"),
            taxon("A", "F", "G2", "n3"), taxon("A", "F", "G3", "n4"), taxon("A", "F", "G9", "n5")]
    predicted = [taxon("A", "F", g, "") for g in ("G1", "G2", "G1", "G2", "G1", "G9")]
    groups = genus_by_trained_congeners(true, predicted, key_taxa, trained)
    assert groups["2+"] == GroupAccuracy(pytest.approx(2 / 3), 3, 2)
    assert groups["1"] == GroupAccuracy(1.0, 1, 1)
    assert groups["0"] == GroupAccuracy(0.0, 1, 1)  # G9 has no references: not counted


def test_species_misses_most_first():
    references = [taxon("A", "F", "G", "k1"), taxon("A", "F", "G", "k2"), taxon("A", "F", "H", "k3")]
    true = [taxon("A", "F", "G", "s1")] * 3 + [taxon("A", "F", "H", "s2")] * 2 + [taxon("A", "F", "G", "s3")]
    predicted = [taxon("A", "F", g, "") for g in ("H", "H", "G", "G", "G", "G")]
    other = [taxon("A", "F", g, "") for g in ("G", "H", "H", "H", "H", "G")]
    answered = [taxon("A", "F", g, "") for g in ("H", "", "", "H", "G", "")]
    misses = species_misses(true, predicted, other, answered, references, "genus")
    assert [tuple(m) for m in misses] == [("s1", 3, 2, 2, 1, 2, "H"), ("s2", 2, 2, 0, 1, 1, "G")]


def test_stage_datasets_swaps_validation_and_test_species():
    def part(name: str) -> datasets.Dataset:
        return datasets.Dataset.from_list([{"id": name}])

    names = ("pretrain", "train_seen", "val_seen", "test_seen", "seen_keys", "val_unseen", "val_unseen_keys",
             "test_unseen", "test_unseen_keys")
    splits = datasets.DatasetDict({name: part(name) for name in names})
    training, references, novel, seen = stage_datasets(splits, "test")
    assert training["id"] == ["pretrain", "train_seen"]
    assert references["id"] == ["seen_keys", "val_unseen_keys"]
    assert (novel["id"], seen["id"]) == (["test_unseen"], ["test_seen"])
    training, references, novel, seen = stage_datasets(splits, "val", train_splits=["train_seen"])
    assert training["id"] == ["train_seen"] and references["id"] == ["seen_keys", "test_unseen_keys"]
    assert (novel["id"], seen["id"]) == (["val_unseen"], ["val_seen"])
    with pytest.raises(ValueError):
        stage_datasets(splits, "train")


def test_raw_kmer_baseline_places_by_the_nearest_profile():
    import torch

    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), dim=-1)
    indices, values = nearest_references(torch.tensor([[0.6, 0.8], [1.0, 0.0]]), keys)
    assert indices.tolist() == [1, 0] and values.tolist() == pytest.approx([0.8, 1.0])  # ties: the first key
    references = [taxon("A", "F", "G", "a", id="r1", dna="ACGTACGTAAAACCCC"),
                  taxon("B", "E", "H", "b", id="r2", dna="GGGGTTTTGGGGTTTT")]
    novel = [taxon("A", "F", "G", "c", id="q1", dna="ACGTACGTAAAACCCA")]
    seen = [taxon("B", "E", "H", "b", id="q2", dna="GGGGTTTTGGGGTTTT")]
    baseline, nearest = raw_kmer_baseline(references, novel, seen, k=3)
    assert [r["id"] for r in nearest] == ["r1"]
    assert baseline.k == 3 and baseline.placement["genus"] == 1.0
    assert baseline.auroc == 1.0  # the seen query matches its reference exactly, the novel one does not


def test_example_answers_take_the_first_of_each_kind():
    novel = [taxon("A", "F", "G", "n1", id="q1"), taxon("A", "F", "G", "n2", id="q2"),
             taxon("A", "F", "G", "n3", id="q3")]
    seen = [taxon("A", "F", "G", "s1", id="q4")]
    answers = {"q1": taxon("A", "", "", ""), "q2": taxon("A", "F", "", ""), "q3": taxon("A", "F", "", ""),
               "q4": taxon("A", "F", "G", "s1")}
    predictions = {q: prediction(q, answer, q != "q4") for q, answer in answers.items()}
    examples = example_answers(novel, seen, predictions)
    assert [(e.kind, e.query_id) for e in examples] == [
        ("known species", "q4"), ("novel, stops at family", "q2"), ("novel, stops at order", "q1")]
    assert not examples[0].novel and examples[0].answer["species"] == "s1" and examples[0].similarity == 0.5


@pytest.mark.slow
def test_evaluate_novel_species_end_to_end(data_dir, tmp_path):
    from clibd.data import load_splits
    from clibd.evaluation.novel_species import evaluate_novel_species
    from clibd.training import ExperimentConfig, train

    # The first 4,000 records: the small file has too few records per species for the paper split
    # to keep any seen species (9+ records) for training.
    config = ExperimentConfig.from_dict({
        "model": {"preset": "tiny", "modalities": ["dna"],
                  "dna": {"model_type": "clibd_kmer_profile", "kmer_size": 5, "hidden_size": 128, "sketch_dim": 64}},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 4000},
        "train": {"output_dir": str(tmp_path / "run"), "objective": "supcon", "epochs": 3, "batch_size": 128,
                  "max_lr": 1e-3, "checkpoint_every": 1000, "eval_from_epoch": 99},
    })
    train(config, progress=False)
    splits = load_splits(config.data)
    report = evaluate_novel_species(tmp_path / "run" / "final", splits, kmax=6, workdir=tmp_path / "work")
    assert report.novel_queries == len(splits["test_unseen"]) and report.seen_queries == len(splits["test_seen"])
    assert report.references == len(splits["seen_keys"]) + len(splits["val_unseen_keys"])
    assert report.auroc > 0.9  # novel species are told from known ones
    assert report.answers.flagged >= 0.8
    assert report.answers.false_alarms < 0.5
    assert sorted(report.baselines) == [3, 4, 5, 6]
    assert report.placement["order"] > report.placement["genus"] > 0.3
    # the congener groups split exactly the queries scored for genus placement, by the same 1-NN
    reference_genera = set(splits["seen_keys"]["genus"]) | set(splits["val_unseen_keys"]["genus"])
    congeners = report.congeners
    assert sum(g.queries for g in congeners.values()) == sum(g in reference_genera for g in splits["test_unseen"]["genus"])
    weighted = sum(g.accuracy * g.queries for g in congeners.values() if g.queries) / sum(g.queries for g in
                                                                                          congeners.values())
    assert weighted == pytest.approx(report.placement["genus"])
    # an answer down to species means the query was judged known
    assert report.answers.deepest["species"] <= 1 - report.answers.flagged + 1e-9
    known = [e for e in report.examples if e.kind == "known species"]
    assert known and not known[0].novel and known[0].answer["species"]
    text = format_report(report, examples=True, misses=True)
    assert "| method | order | family | genus | AUROC seen vs novel |" in text
    assert f"| {report.auroc:.3f} |" in text.splitlines()[text.splitlines().index(
        "|---|---:|---:|---:|---:|") + 1]
    assert "Novel species placed at the wrong genus by clibd" in text


def test_bench_script_help_runs():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "novel_species.py"), "--help"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--split-seed" in result.stdout and "--variants" not in result.stdout
