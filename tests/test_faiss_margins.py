"""identify's taxon margins through the exact faiss backend: the same `MARGIN_DEPTH` (100) nearest
references looked through, so the same per-rank confidences and answers as the torch backend."""

from __future__ import annotations

import pytest

from clibd import identify as identify_module
from clibd.identify import Identifier
from clibd.index import build_index
from clibd.novelty import MARGIN_DEPTH, rank_confidences, taxon_margin

pytest.importorskip("faiss", reason="the faiss backend needs faiss (pip install 'clibd[faiss]')")

# Heavy weights (set by hand, as tests/test_rank_confidence.py does) so that every placing rank's
# answer turns on its margin, whatever weights calibration chose for this tiny untrained model.
WEIGHTS = {"order": 4.0, "family": 4.0, "genus": 4.0, "species": 0.0}


def _identified(index_dir, backend: str, queries: list[dict], monkeypatch) -> tuple[list, list[tuple[int, dict]]]:
    """(predictions, [(how many neighbours each query's margins looked through, its confidences)])."""
    seen: list[tuple[int, dict]] = []

    def spy(similarities, labels, weights):
        confidences = rank_confidences(similarities, labels, weights)
        depth = min(similarities.shape[1], *(column.shape[1] for column in labels.values()))
        seen.extend((depth, confidence) for confidence in confidences)
        return confidences

    monkeypatch.setattr(identify_module, "rank_confidences", spy)
    identifier = Identifier.load(index_dir, backend=backend)
    identifier.index.meta["margin_weights"] = WEIGHTS
    return identifier.identify(queries, top_k=5), seen


def test_faiss_margins_look_as_deep_as_torch(dna_model, records, tmp_path, monkeypatch):
    library = records["many_each"]
    assert len(library) > MARGIN_DEPTH  # the depth, not the library's size, bounds the margins
    index = build_index(dna_model, library, "dna", tmp_path / "refs", progress=False, species_check=False)
    queries = records["absent"][:40] + records["held"][:20]
    by_torch, torch_seen = _identified(tmp_path / "refs", "torch", queries, monkeypatch)
    by_faiss, faiss_seen = _identified(tmp_path / "refs", "faiss", queries, monkeypatch)

    assert {depth for depth, _ in torch_seen} == {depth for depth, _ in faiss_seen} == {MARGIN_DEPTH}
    for (_, ours), (_, theirs) in zip(torch_seen, faiss_seen, strict=True):
        assert set(ours) == set(theirs) == {"order", "family", "genus"}
        assert theirs == pytest.approx(ours, abs=2e-3)  # fp16 keys: torch and faiss round differently
    for ours, theirs in zip(by_torch, by_faiss, strict=True):
        assert theirs.answer == ours.answer and theirs.novel == ours.novel
        assert len(theirs.hits) == len(ours.hits) == 5
        assert [hit.similarity for hit in theirs.hits] == pytest.approx([hit.similarity for hit in ours.hits], abs=2e-3)
        # references of (nearly) equal similarity may come in either order, or one in place of another at the 5th
        clear = {hit.id for hit in theirs.hits if hit.similarity > theirs.hits[-1].similarity + 2e-3}
        assert clear <= {hit.id for hit in ours.hits}
        assert theirs.precision == pytest.approx(ours.precision, abs=1e-3)

    # the depth matters here: for some queries the five hits returned all share a taxon whose first
    # other one lies deeper, so margins read from the hits alone would be smaller than identify's
    genus = index.labels("genus")
    sims, rows = index.search(Identifier.load(tmp_path / "refs").embed(queries), MARGIN_DEPTH)
    shallow = [taxon_margin(ss[:5], [genus[j] for j in js[:5]]) for ss, js in zip(sims.tolist(), rows.tolist(),
                                                                                     strict=True)]
    deep = [(confidence["genus"] - ss[0]) / WEIGHTS["genus"] for (_, confidence), ss in zip(faiss_seen,
                                                                                            sims.tolist(), strict=True)]
    assert any(d > s + 1e-3 for s, d in zip(shallow, deep, strict=True))
    assert len({p.deepest_rank for p in by_faiss}) > 1  # the margins decide between ranks
