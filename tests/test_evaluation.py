import math

import pytest
import torch
import torch.nn.functional as F

from clibd.constants import RANKS
from clibd.evaluation.is_du import Side, route, search_threshold
from clibd.evaluation.retrieval import (
    evaluation_pairs,
    format_table,
    harmonic_mean,
    rank_metrics,
    selection_score,
    topk_accuracy,
)
from clibd.retrieval import topk_indices


def test_micro_and_macro_differ_when_classes_are_unbalanced():
    true = ["A", "A", "A", "B"]
    predicted = [["A", "B"], ["A", "B"], ["A", "B"], ["X", "B"]]
    assert topk_accuracy(true, predicted, 1) == (0.75, 0.5)  # macro: mean of A=1.0 and B=0.0
    assert topk_accuracy(true, predicted, 2) == (1.0, 1.0)
    assert topk_accuracy(["", "A"], [["A"], ["B"]], 1) == (0.0, 0.0)  # unlabelled queries left out
    assert all(math.isnan(v) for v in topk_accuracy([""], [["A"]], 1))


def test_rank_metrics_from_hand_made_embeddings():
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    key_labels = {"order": ["O1", "O1", "O2"], "family": ["F1", "F2", "F3"],
                  "genus": ["G1", "G2", "G3"], "species": ["s1", "s2", "s3"]}
    # q0 is nearest key 0, q1 nearest key 1 (second key 0), q2 nearest key 2
    queries = F.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.8, 0.0], [0.0, 0.1, 0.9]]), dim=-1)
    topk = topk_indices(queries, keys, 3)
    assert topk[:, 0].tolist() == [0, 1, 2] and topk[1, 1] == 0
    true = {"order": ["O1", "O1", "O1"], "family": ["F1", "F1", "F3"],
            "genus": ["G1", "G1", "G3"], "species": ["s1", "s1", "s9"]}
    predicted = {rank: [[key_labels[rank][j] for j in row] for row in topk.tolist()] for rank in RANKS}
    metrics = rank_metrics(true, predicted)
    assert metrics["order"]["micro_top1"] == pytest.approx(2 / 3)  # q2 -> O2, wrong
    assert metrics["family"]["micro_top1"] == pytest.approx(2 / 3)  # q1 -> F2, wrong
    assert metrics["family"]["macro_top1"] == pytest.approx((0.5 + 1.0) / 2)  # F1: 1 of 2, F3: 1 of 1
    assert metrics["family"]["micro_top3"] == 1.0
    assert metrics["species"]["micro_top5"] == pytest.approx(2 / 3)  # s9 is in no key


def test_topk_indices_match_brute_force_in_chunks():
    torch.manual_seed(0)
    queries, keys = F.normalize(torch.randn(50, 8), dim=-1), F.normalize(torch.randn(30, 8), dim=-1)
    brute = torch.topk(queries @ keys.T, 5, dim=1).indices
    assert torch.equal(topk_indices(queries, keys, 5, chunk_size=7), brute)


def test_harmonic_mean():
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic_mean(0.0, 0.0) == 0.0


def _sides(scores, seen_species, unseen_species):
    """Routing sides whose labels are the species at every rank (one position each)."""
    def as_side(values, species):
        return Side(values, {rank: [[s] for s in species] for rank in RANKS})
    return as_side(torch.tensor(scores)[:, None], seen_species), as_side(None, unseen_species)


def test_is_du_routing_and_threshold_search():
    # seen queries are close to their image keys (0.9), unseen ones are not (0.3)
    seen = (*_sides([0.9, 0.85], ["a", "b"], ["x", "y"]), ["a", "b"])
    unseen = (*_sides([0.3, 0.35], ["a", "a"], ["u", "v"]), ["u", "v"])
    assert route(seen[0], seen[1], 0.5)["species"] == [["a"], ["b"]]
    assert route(unseen[0], unseen[1], 0.5)["species"] == [["u"], ["v"]]
    assert route(unseen[0], unseen[1], 0.1)["species"] == [["a"], ["a"]]  # everything routed to the seen keys
    assert route(seen[0], seen[1], 0.85)["species"] == [["a"], ["y"]]  # strict ">": 0.85 is not above 0.85
    threshold, hm = search_threshold({"seen": seen, "unseen": unseen})
    assert 0.35 <= threshold < 0.85 and hm == 1.0


def test_pairs_table_and_selection_score():
    assert evaluation_pairs(["dna", "text"]) == [("dna", "dna"), ("dna", "text"), ("text", "dna"), ("text", "text")]
    assert ("image_dna", "all") in evaluation_pairs(["image", "dna", "text"])
    ranks = {r: {"micro_top1": 0.5, "macro_top1": 0.25} for r in RANKS}
    metrics = {"dna": {"dna": {"seen": ranks, "unseen": ranks, "hm": ranks}}}
    assert selection_score(metrics) == pytest.approx(0.375)
    table = format_table(metrics)
    assert "| DNA -> DNA | 50.0 | 50.0 | 50.0 |" in table


def test_faiss_backend_matches_exact_torch_search():
    pytest.importorskip("faiss", reason="pip install 'clibd[faiss]' brings faiss-cpu")
    import faiss

    from clibd.retrieval import faiss_index, faiss_search, topk_search

    torch.manual_seed(0)
    keys = F.normalize(torch.randn(5000, 32), dim=-1).to(torch.float16)
    queries = F.normalize(torch.randn(40, 32), dim=-1)
    exact_values, exact_indices = topk_search(queries, keys, 5, key_block=1000, query_chunk=16)
    brute = torch.topk(queries @ keys.float().T, 5, dim=1)
    assert torch.equal(exact_indices, brute.indices) and torch.allclose(exact_values, brute.values, atol=1e-5)
    faiss_values, faiss_indices = faiss_search(queries, faiss_index(keys, block=1024), 5)
    assert torch.equal(faiss_indices, brute.indices) and torch.allclose(faiss_values, brute.values, atol=1e-4)
    every_cell = faiss_index(keys, nlist=16, nprobe=16)
    assert torch.equal(faiss_search(queries, every_cell, 5)[1], brute.indices)
    one_cell = faiss_index(keys, nlist=16, nprobe=1)  # approximate: misses neighbours in other cells
    assert not torch.equal(faiss_search(queries, one_cell, 5)[1], brute.indices)
    quantised = faiss_index(keys, nlist=16, encoding="SQ8", nprobe=16)  # 8-bit codes: near-exact ranking
    assert (faiss_search(queries, quantised, 1)[1][:, 0] == brute.indices[:, 0]).float().mean() >= 0.9
    # 200 cells of ~25 keys, one probed: top-100 needs more keys than the probed cell holds
    sparse = faiss_index(keys, nlist=200, nprobe=1)
    values, indices = faiss_search(queries, sparse, 100)
    assert (indices >= 0).all() and torch.isfinite(values).all()
    assert torch.equal(indices, torch.topk(queries @ keys.float().T, 100, dim=1).indices)  # every cell searched
    assert faiss.extract_index_ivf(sparse).nprobe == 1  # the index is left as it was
