"""A rank's confidence: the similarity plus a calibrated weight times the taxon margin (how much
nearer the nearest reference is than the nearest one of another taxon at that rank)."""

import json
import math
import random

import pytest
import torch

from clibd.constants import RANKS
from clibd.identify import Hit, Identifier
from clibd.index import ReferenceIndex, build_index
from clibd.novelty import (
    MARGIN_DEPTH,
    MARGIN_WEIGHTS,
    Answers,
    calibration_from_answers,
    choose_margin_weight,
    rank_confidence,
    rank_confidences,
    taxon_margin,
    taxon_margins,
)
from clibd.prediction import predict
from clibd.thresholds import PRECISION_CONFIDENCE, precision_at, precision_curve


def test_taxon_margin_reads_the_first_other_taxon():
    assert taxon_margin([0.91, 0.90, 0.84, 0.80], ["A", "A", "B", "C"]) == pytest.approx(0.07)
    assert taxon_margin([0.91, 0.90, 0.84], ["A", "A", "A"]) == pytest.approx(0.07)  # all one taxon: a lower bound
    assert taxon_margin([0.91], ["A"]) == 0.0
    assert taxon_margin([0.91, 0.85, -2.0, -2.0], ["A", "A", "B", "B"]) == pytest.approx(0.06)  # -2: none left
    labels = {"genus": ["A", "B", "B"], "family": ["F", "F", "G"]}  # no order labels: its weight is 0
    confidence = rank_confidence([0.9, 0.8, 0.7], labels, {"genus": 2.0, "family": 1.0, "order": 0.0})
    assert confidence == pytest.approx({"genus": 0.9 + 2 * 0.1, "family": 0.9 + 0.2})  # weight 0: left as it was


def _margin_one_by_one(similarities: list[float], labels: list[int]) -> float:
    """The taxon margin as its docstring words it, one neighbour at a time."""
    top = last = similarities[0]
    for similarity, label in zip(similarities, labels, strict=True):
        if similarity <= -2.0:
            break
        if label != labels[0]:
            return top - similarity
        last = similarity
    return top - last


def test_taxon_margins_of_a_batch_are_each_querys_own_to_the_last_bit():
    generator = torch.Generator().manual_seed(0)
    sims = torch.rand(300, 12, generator=generator).sort(dim=1, descending=True).values
    ends = torch.randint(0, 13, (300,), generator=generator)  # -2.0 from here on: nothing left
    for row, end in enumerate(ends.tolist()):
        sims[row, end:] = -2.0
    labels = torch.randint(0, 3, (300, 12), generator=generator)
    labels[:50] = 7  # one taxon throughout: the margin to the last one kept
    sims[50:60, 2] = math.nan  # not an end: only a value <= -2.0 ends a row
    margins = taxon_margins(sims, labels)
    assert margins.dtype == torch.float64
    expected = [_margin_one_by_one(ss, ls) for ss, ls in zip(sims.tolist(), labels.tolist(), strict=True)]
    same = [a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(margins.tolist(), expected, strict=True)]
    assert all(same)  # exactly: identify's answers must not move by a rounding
    assert any(math.isnan(m) for m in expected) and all(math.isfinite(m) for m in expected[:50])
    assert len(set(expected)) > 100 and 0.0 in expected  # varied, and rows that start with -2.0
    with pytest.raises(ValueError, match="differ in shape"):
        taxon_margins(sims[:, :3], labels[:, :1])


def test_rank_confidences_of_a_batch_are_rank_confidence_of_each_query():
    generator = torch.Generator().manual_seed(1)
    sims = torch.rand(40, 8, generator=generator).sort(dim=1, descending=True).values
    genus, family = torch.randint(0, 4, (40, 8), generator=generator), torch.randint(0, 2, (40, 8), generator=generator)
    weights = {"genus": 2.0, "family": 0.5, "order": 0.0}
    batch = rank_confidences(sims, {"genus": genus, "family": family}, weights)
    for n, confidence in enumerate(batch):
        ss = sims[n].tolist()
        assert confidence == {"genus": ss[0] + 2.0 * _margin_one_by_one(ss, genus[n].tolist()),
                              "family": ss[0] + 0.5 * _margin_one_by_one(ss, family[n].tolist())}
        one = rank_confidence(ss, {"genus": [f"g{i}" for i in genus[n].tolist()],
                                   "family": [f"f{i}" for i in family[n].tolist()]}, weights)
        assert one == confidence  # the one-query form: labels as names
    with pytest.raises(ValueError, match="3 similarities"):
        rank_confidence([0.9, 0.8, 0.7], {"genus": ["A", "B"]}, {"genus": 1.0})


def test_precision_at_reads_the_lowest_curve_point_at_or_above():
    rng = random.Random(0)
    for _ in range(100):
        right = [round(rng.random(), rng.choice([1, 2, 6])) for _ in range(rng.randint(1, 200))]
        wrong = [round(rng.random(), rng.choice([1, 2, 6])) for _ in range(rng.randint(0, 200))]
        curve = precision_curve(right, wrong, rng.choice([2, 5, 128]))  # ties where rounded to 1 or 2 decimals
        for similarity in [rng.random() for _ in range(20)] + [s for s, _ in curve] + [-math.inf, math.inf, 2.0]:
            at_or_above = [precision for sim, precision in curve if sim >= similarity]
            assert precision_at(curve, similarity) == (at_or_above[-1] if at_or_above else curve[0][1])
    assert precision_at([(0.9, 1.0), (0.5, 0.5)], math.nan) == 1.0  # at or above no point: the highest's


def _answers(right, wrong):
    """Held-out answers at a placing rank: (similarity, margin) each."""
    return Answers(held_right=list(right), held_wrong=list(wrong))


# right answers: a little less similar than the wrong ones, but clear of any other taxon;
# wrong answers: as near one taxon as another (the query sits between them)
# (enough right answers that a 0.99 precision is borne out at 95 % confidence)
RIGHT = [(0.80 + 0.00025 * i, 0.10) for i in range(400)]
WRONG = [(0.85 + 0.005 * i, 0.005) for i in range(10)]


def test_margin_weight_chosen_where_it_separates_right_from_wrong():
    found = _answers(RIGHT, WRONG)
    assert choose_margin_weight(found) > 0  # balanced accuracy
    weight = choose_margin_weight(found, precision=0.99)
    assert weight > 0
    calibration = calibration_from_answers({"genus": found, "species": found}, "species", precision=0.99)
    assert calibration.margin_weights == {"genus": weight, "species": 0.0}  # species: the novelty similarity
    threshold = calibration.thresholds["genus"]
    assert all(s + weight * m >= threshold for s, m in RIGHT) and all(s + weight * m < threshold for s, m in WRONG)
    # the curve is on the confidence: every answer at or above the threshold was right
    assert precision_at(calibration.curves["genus"], threshold) == 1.0
    assert calibration.curves["genus"][-1][1] == round(400 / 410, 4)  # all 410 answers
    # margins that say nothing (all equal) keep the similarity alone
    flat = _answers([(s, 0.05) for s, _ in RIGHT], [(s, 0.05) for s, _ in WRONG])
    assert choose_margin_weight(flat) == 0.0 and choose_margin_weight(flat, precision=0.9) == 0.0
    assert choose_margin_weight(_answers(RIGHT, [])) == 0.0  # nothing to choose by
    assert MARGIN_WEIGHTS[0] == 0.0


def test_a_stated_precision_is_borne_out_at_the_confidence_asked():
    # 300 right answers above 0.8, 5 wrong among the highest: observed precision 300/305 = 0.984
    right = [(0.80 + 0.0005 * i, 0.10) for i in range(300)]
    wrong = [(0.90 + 0.005 * i, 0.10) for i in range(5)]
    found = {rank: _answers(right, wrong) for rank in RANKS}
    observed = calibration_from_answers(found, "species", precision=0.98, confidence_level=0.5)
    bound = calibration_from_answers(found, "species", precision=0.98)  # PRECISION_CONFIDENCE
    assert observed.confidence_level == 0.5 and bound.confidence_level == PRECISION_CONFIDENCE == 0.95
    assert observed.thresholds["genus"] == 0.8 and observed.methods["genus"] == "precision"
    # 0.984 observed is not 0.98 at 95 %: no cut of these answers bears it out, so the rank answers nothing
    assert bound.methods["genus"] == "precision unreachable" and bound.thresholds["genus"] == math.inf
    assert any("takes at least 133 right answers" in line for line in bound.warnings())
    assert calibration_from_answers(found, "species").confidence_level is None  # no stated precision
    with pytest.raises(ValueError, match="confidence"):
        calibration_from_answers(found, "species", precision=0.98, confidence_level=0.3)


def test_predict_compares_thresholds_with_the_confidence():
    hits = [Hit("k1", 0.80, {"order": "O", "family": "F", "genus": "G", "species": "G s"}),
            Hit("k2", 0.60, {"order": "O", "family": "F", "genus": "H", "species": "H s"})]
    thresholds = {"order": 0.5, "family": 0.7, "genus": 0.85, "species": 0.95}
    curves = {"genus": [(1.0, 1.0), (0.9, 0.97), (0.5, 0.6)]}
    assert predict("q", hits, thresholds, curves=curves).answer["genus"] == ""  # 0.80 < 0.85
    prediction = predict("q", hits, thresholds, curves=curves, confidence={"genus": 0.80 + 0.5 * 0.20})
    assert prediction.answer["genus"] == "G" and prediction.answer["species"] == ""
    assert prediction.precision["genus"] == 0.97  # read at the confidence (0.90), not the similarity


def test_index_stores_margin_weights_and_identify_uses_them(dna_model, records, tmp_path):
    index = build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    assert set(index.margin_weights) == set(RANKS) and index.margin_weights["species"] == 0.0
    assert all(weight in MARGIN_WEIGHTS for weight in index.margin_weights.values())
    identifier = Identifier.load(tmp_path / "refs")
    queries = records["absent"]
    embeddings = identifier.embed(queries)
    similarities, rows = identifier.index.search(embeddings, MARGIN_DEPTH)

    def expected(weights):
        """Each query's deepest answered rank, recomputed from the deep search and the thresholds."""
        out = []
        for ss, js in zip(similarities.tolist(), rows.tolist(), strict=True):
            records = [identifier.index.records[j] for j in js]
            confidence = rank_confidence(ss, {rank: [r[rank] for r in records] for rank in RANKS}, weights)
            deepest = None
            for rank in RANKS[:-1]:
                if not confidence.get(rank, ss[0]) >= identifier.index.thresholds[rank]:
                    break
                deepest = rank
            out.append(deepest)
        return out

    # a heavy margin weight (set by hand) changes which ranks are answered, as recomputed
    heavy = {"order": 4.0, "family": 4.0, "genus": 4.0, "species": 0.0}
    identifier.index.meta["margin_weights"] = heavy
    with_margin = [p.deepest_rank if p.deepest_rank != "species" else "genus" for p in identifier.identify(queries)]
    assert with_margin == expected(heavy)
    # an index from before margins (no weights stored) answers by the similarity alone
    del identifier.index.meta["margin_weights"]
    without = [p.deepest_rank if p.deepest_rank != "species" else "genus" for p in identifier.identify(queries)]
    assert without == expected({})
    assert with_margin != without
    assert ReferenceIndex.load(tmp_path / "refs").margin_weights == index.margin_weights  # stored in index.json
    assert not math.isnan(index.thresholds["genus"])


def test_margins_leave_the_species_rank_on_the_novelty_similarity(dna_model, records, tmp_path):
    """An index without a species check: however the ranks above are weighed, `novel` is the
    novelty similarity against the species threshold (weight 0 leaves a rank as it was)."""
    index = build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False,
                        species_check=False)
    identifier = Identifier.load(tmp_path / "refs")
    identifier.index.meta["margin_weights"] = {"order": 4.0, "family": 4.0, "genus": 4.0, "species": 0.0}
    predictions = identifier.identify(records["held"] + records["absent"])
    threshold = index.thresholds["species"]
    assert all(p.novel == (p.novelty_similarity < threshold) for p in predictions)
    assert {p.novel for p in predictions} == {True, False}
    assert rank_confidence([0.9, 0.8], {"genus": ["A", "B"]}, {"genus": 1.0, "species": 0.0}) == pytest.approx(
        {"genus": 1.0})  # no entry for a weight of 0


def test_identify_margins_are_the_ones_calibration_learnt_from(dna_model, records, tmp_path):
    """A reference matched with its species held out (calibration's novel-species case) has the same
    nearest similarity and genus margin as identify finds for it against the library without that species."""
    from clibd.novelty import answers_at, nearest_held_out

    full = build_index(dna_model, records["many_each"], "dna", tmp_path / "full", progress=False, species_check=False)
    species = full.labels("species")
    row = next(i for i, name in enumerate(species) if species.count(name) >= 2)
    matches = nearest_held_out(full.embeddings, species, [row], k=MARGIN_DEPTH)
    calibrated = answers_at(list(full.records), "genus", [row], set(), matches)
    (similarity, margin), = calibrated.held_right + calibrated.held_wrong
    others = [r for r in records["many_each"] if r["species"] != species[row]]
    build_index(dna_model, others, "dna", tmp_path / "without", progress=False, species_check=False)
    identifier = Identifier.load(tmp_path / "without")
    identifier.index.meta["margin_weights"] = {"genus": 1.0}
    query = next(r for r in records["many_each"] if r["id"] == full.records[row]["id"])  # with its barcode
    sims, rows = identifier.index.search(identifier.embed([query]), MARGIN_DEPTH)
    genus = identifier.index.labels("genus")
    found = rank_confidence(sims[0].tolist(), {"genus": [genus[j] for j in rows[0].tolist()]}, {"genus": 1.0})
    assert sims[0, 0].item() == pytest.approx(similarity, abs=2e-3)
    assert found["genus"] - sims[0, 0].item() == pytest.approx(margin, abs=2e-3)
    assert margin > 0


def test_recalibrate_and_add_store_margin_weights(dna_model, records, tmp_path):
    from clibd.index import add_to_index, recalibrate_index

    index = build_index(dna_model, records["many_each"][:-10], "dna", tmp_path / "refs", progress=False,
                        species_check=False)
    meta = json.loads((tmp_path / "refs" / "index.json").read_text())
    del meta["margin_weights"]  # as an index from before margins
    (tmp_path / "refs" / "index.json").write_text(json.dumps(meta))
    assert ReferenceIndex.load(tmp_path / "refs").margin_weights == {}
    assert recalibrate_index(tmp_path / "refs").margin_weights == index.margin_weights
    assert set(json.loads((tmp_path / "refs" / "index.json").read_text())["margin_weights"]) == set(RANKS)
    grown = add_to_index(tmp_path / "refs", records["many_each"][-10:], progress=False)
    assert set(grown.margin_weights) == set(RANKS)
