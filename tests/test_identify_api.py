"""The identification API without training: the per-query decision, the parts an index stores,
and an index written by an older clibd (tests/fixtures/legacy_19b8be4)."""

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from clibd.constants import RANKS
from clibd.identify import Hit, Identifier, predict, read_predictions_tsv
from clibd.index import ReferenceIndex, add_to_index
from clibd.towers.parts import EmbeddingPart, whole

LEGACY = Path(__file__).parent / "fixtures" / "legacy_19b8be4"
THRESHOLDS = {"order": 0.5, "family": 0.7, "genus": 0.8, "species": 0.9}


def hits(similarities, species):
    return [Hit(f"k{s}", sim, {"order": "Diptera", "family": "Culicidae", "genus": "Aedes", "species": f"Aedes sp{s}"})
            for sim, s in zip(similarities, species, strict=True)]


def test_predict_stops_at_the_deepest_confident_rank():
    p = predict("q", hits([0.85, 0.84, 0.2], [0, 1, 2]), THRESHOLDS)
    assert p.answer == {"order": "Diptera", "family": "Culicidae", "genus": "Aedes", "species": ""}
    assert p.deepest_rank == "genus" and p.novel is True
    assert p.support["genus"] == 1.0 and p.support["species"] == 1 / 3
    assert (p.similarity, p.novelty_similarity) == (0.85, 0.85) and p.hits[1].id == "k1"
    p = predict("q", hits([0.95, 0.5, 0.2], [2, 1, 0]), THRESHOLDS)
    assert (p.answer["species"], p.novel, p.deepest_rank) == ("Aedes sp2", False, "species")
    p = predict("q", hits([0.6, 0.5, 0.2], [2, 1, 0]), THRESHOLDS)
    assert (p.answer["order"], p.answer["family"], p.deepest_rank) == ("Diptera", "", "order")
    assert predict("q", hits([0.4], [0]), THRESHOLDS).deepest_rank is None
    # a model that scores novelty apart: the species (and the flag) follow the novelty similarity
    p = predict("q", hits([0.95, 0.5, 0.2], [2, 1, 0]), THRESHOLDS, novelty_similarity=0.6)
    assert (p.answer["genus"], p.answer["species"], p.novel) == ("Aedes", "", True)
    assert (p.similarity, p.novelty_similarity) == (0.95, 0.6)
    p = predict("q", hits([0.75, 0.5, 0.2], [2, 1, 0]), THRESHOLDS, novelty_similarity=0.99)
    assert (p.answer["family"], p.answer["genus"], p.answer["species"], p.novel) == ("Culicidae", "", "", False)
    # a threshold that could not be calibrated (NaN) gives no answer at its rank or below, and a
    # species threshold of NaN flags the query novel: never an unchecked species name
    p = predict("q", hits([0.99], [0]), {**THRESHOLDS, "family": float("nan")})
    assert (p.answer, p.novel) == ({"order": "Diptera", "family": "", "genus": "", "species": ""}, False)
    p = predict("q", hits([0.99], [0]), dict.fromkeys(RANKS, float("nan")))
    assert (p.deepest_rank, p.novel) == (None, True)
    # an index built without calibration (no thresholds at all) answers every rank
    p = predict("q", hits([0.1], [0]), {})
    assert (p.deepest_rank, p.novel) == ("species", False)


def test_index_parts_and_novelty_similarity(tmp_path):
    """Stored parts, or (older indexes) a leading `novelty_dim` block; novelty is the cosine of
    the flagged parts alone."""
    generator = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(5, 12, generator=generator), dim=-1)
    queries = F.normalize(torch.randn(3, 12, generator=generator), dim=-1)
    parts = [EmbeddingPart("kmer", 4), EmbeddingPart("aligned", 8, scores_novelty=False)]
    stored = ReferenceIndex(tmp_path, {"parts": [p.to_dict() for p in parts]}, keys.half(), [{}] * 5)
    legacy = ReferenceIndex(tmp_path, {"novelty_dim": 4}, keys.half(), [{}] * 5)
    assert stored.parts == parts and [p.dim for p in legacy.parts] == [4, 8]
    assert [p.scores_novelty for p in legacy.parts] == [True, False]
    expected = (F.normalize(queries[:, :4], dim=-1) @ F.normalize(keys[:, :4], dim=-1).T).max(dim=1).values
    for index in (stored, legacy):
        assert index.scores_novelty_apart
        assert torch.allclose(index.novelty_similarity(queries), expected, atol=2e-3)
    plain = ReferenceIndex(tmp_path, {}, keys.half(), [{}] * 5)
    assert plain.parts == whole(12) and not plain.scores_novelty_apart


def legacy_queries():
    barcodes = json.loads((LEGACY / "barcodes.json").read_text())
    return [{"id": f"q{i}", **dict.fromkeys(RANKS, ""), "dna": barcode, "image": ""}
            for i, barcode in enumerate(barcodes)]


def test_legacy_index_identifies(tmp_path):
    """An index written by commit 19b8be4 (`novelty_dim` in index.json) loads and identifies its
    own references; growing it stores the model's parts instead."""
    identifier = Identifier.load(LEGACY / "index", model_dir=LEGACY / "kmer_profile_aligned")
    index = identifier.index
    assert [(p.dim, p.scores_novelty) for p in index.parts] == [(24, True), (2640, False)]
    predictions = identifier.identify(legacy_queries(), top_k=3)
    references = [r["id"] for r in index.records]
    assert [p.hits[0].id for p in predictions] == references  # the fixture's barcodes, in index order
    assert all(abs(p.similarity - 1) < 1e-3 and abs(p.novelty_similarity - 1) < 1e-3 for p in predictions)
    assert [p.answer["species"] for p in predictions] == [r["species"] for r in index.records]
    assert not any(p.novel for p in predictions)

    copy = tmp_path / "index"
    shutil.copytree(LEGACY / "index", copy)  # the fixture itself stays as written
    meta = json.loads((copy / "index.json").read_text())
    (copy / "index.json").write_text(json.dumps({**meta, "model": str(LEGACY / "kmer_profile_aligned")}))
    grown = add_to_index(copy, [{**legacy_queries()[0], "id": "r3", "order": "Diptera", "species": "S2"}],
                         progress=False)
    assert "novelty_dim" not in grown.meta and grown.meta["count"] == 4
    # the model's own parts: k-mer MLP, sketch (these score novelty, as the legacy 24), aligned MLP, positional
    assert [(p.dim, p.scores_novelty) for p in grown.parts] == [(8, True), (16, True), (8, False), (2632, False)]


def test_predictions_written_before_the_precision_and_error_columns_read_back(tmp_path):
    """A predictions TSV from an older clibd (no *_precision or error columns) still reads."""
    columns = ["query_id", *RANKS, "similarity", "novel", *(f"{r}_support" for r in RANKS), "novelty_similarity",
               "hit1_id", "hit1_species", "hit1_similarity"]
    row = ["q1", "Diptera", "Culicidae", "Aedes", "", "0.9100", "true", "1.00", "1.00", "1.00", "0.00", "0.9000",
           "k1", "Aedes sp1", "0.9100"]
    (tmp_path / "old.tsv").write_text("# clibd 0.1.0 identify; ...\n" + "\t".join(columns) + "\n" + "\t".join(row) + "\n")
    [prediction] = read_predictions_tsv(tmp_path / "old.tsv")
    assert prediction.answer["genus"] == "Aedes" and prediction.novel and prediction.precision == {}
    assert prediction.error == "" and prediction.hits[0].id == "k1"
