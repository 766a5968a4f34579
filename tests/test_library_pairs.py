"""Every query/key pair `evaluate_retrieval` reports can be asked of `clibd identify`, computed as
the evaluation computes it: text queries (a record's taxonomy), concatenated image+DNA queries,
and image+DNA keys (averaged and concatenated) built from a library's stored image and DNA keys.

An untrained tiny three-tower model: both sides are fed the library's stored keys through the
evaluation's `EmbeddingCache`, the queries are embedded by each side itself, so the equalities
below check that identify builds each feature as the evaluation does (not that the model is good).
(A trained model against `evaluate_retrieval`: tests/test_library_retrieval.py.)
"""

import json
import logging
import shutil

import datasets
import pytest
import torch
from library_fixtures import species_photo_records

from clibd.cli import main as cli
from clibd.constants import RANKS
from clibd.data import records_to_dataset
from clibd.evaluation.pairs import evaluation_pairs
from clibd.evaluation.retrieval import EmbeddingCache, evaluate_retrieval
from clibd.identify import Identifier, read_predictions_tsv
from clibd.library_build import build_library, recalibrate_library
from clibd.query_plan import check_widths

# the evaluation's feature names -> identify's --query spelling and --keys
QUERY = {"image": "image", "dna": "dna", "text": "text", "image_dna": "image+dna",
         "image_dna_concat": "image+dna-concat"}
KEYS = {**{name: [spelling] for name, spelling in QUERY.items()}, "all": ["image", "dna", "text"]}
COLUMNS = ("id", *RANKS, "dna", "image")



@pytest.fixture(scope="module")
def split(data_dir, tmp_path_factory):
    """(key pool, seen queries, unseen queries): records with a photo and a barcode, up to 4 per species."""
    rows = species_photo_records(data_dir, tmp_path_factory.mktemp("photos"), 56)
    rows = [{c: r[c] for c in COLUMNS} for r in rows]
    return rows[:40], rows[40:48], rows[48:]


@pytest.fixture(scope="module")
def library(library_model_dir, split, tmp_path_factory):
    return build_library(library_model_dir, split[0], ["image", "dna", "text"], tmp_path_factory.mktemp("lib") / "refs",
                         progress=False)


def _splits(keys: list[dict], seen: list[dict], unseen: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"seen_keys": records_to_dataset(keys), "val_seen": records_to_dataset(seen),
                                 "val_unseen": records_to_dataset(unseen)})


def _top1(predictions, queries: list[dict]) -> dict[str, float]:
    accuracy = {}
    for rank in RANKS:
        pairs = [(p.hits[0].taxonomy[rank], q[rank]) for p, q in zip(predictions, queries, strict=True) if q[rank]]
        accuracy[rank] = sum(a == b for a, b in pairs) / len(pairs)
    return accuracy


NEW_PAIRS = [("text", "image"), ("text", "dna"), ("text", "text"), ("text", "image_dna"),
             ("image_dna_concat", "image_dna_concat"), ("image", "image_dna"), ("dna", "image_dna"),
             ("image_dna", "image_dna")]


@pytest.mark.parametrize(("query", "key"), NEW_PAIRS)
def test_new_pairs_answer_as_evaluate_retrieval_scores(library, split, query, key):
    pool, seen, unseen = split
    identifier = Identifier.load(library.directory)
    assert [r["id"] for r in library.key_sets["image"].records] == [r["id"] for r in pool]
    # text keys: the library's taxa (every rank) stand in for the evaluation's distinct taxonomies
    text_keys = [{**t, "dna": "", "image": ""} for t in library.key_sets["text"].records]
    splits = _splits(text_keys if key == "text" else pool, seen, unseen)
    embed = EmbeddingCache(identifier.model, identifier.processor, 256, False)
    embed.cache.update({("keys", m): library.key_sets[m].embeddings.float() for m in ("image", "dna")})
    embed.cache[("keys-text-unique", "text")] = library.key_sets["text"].embeddings.float()
    metrics = evaluate_retrieval(identifier.model, identifier.processor, splits, pairs=[(query, key)], embed=embed)
    evaluated_keys = embed.cache[("keys-text-unique" if key == "text" else "keys", key)]
    for name, queries in (("seen", seen), ("unseen", unseen)):
        predictions = identifier.identify(queries, top_k=5, keys=KEYS[key], query=QUERY[query])
        expected = {rank: metrics[query][key][name][rank]["micro_top1"] for rank in RANKS}
        assert _top1(predictions, queries) == pytest.approx(expected, abs=1e-12), (query, key, name)
        # the same query embeddings and key set: the same nearest cosine, got from a key that has it
        evaluated = embed.cache[(f"val-{name}", query)]
        assert torch.allclose(identifier.embed(queries, query=QUERY[query]), evaluated, atol=1e-6)
        similarities = evaluated @ evaluated_keys.T
        best = similarities.max(dim=1).values
        assert torch.allclose(torch.tensor([p.similarity for p in predictions]), best, atol=1e-5)
        key_ids = [r["id"] for r in (text_keys if key == "text" else pool)]
        nearest = [similarities[n, key_ids.index(p.hits[0].id)] for n, p in enumerate(predictions)]
        assert torch.allclose(torch.stack(nearest), best, atol=1e-5)  # ties (an untrained tower) may pick either
        assert {p.route for p in predictions} == {KEYS[key][0]}


def test_every_evaluation_pair_can_be_asked_of_identify(library, split, library_model_dir):
    identifier = Identifier.load(library.directory)
    model = identifier.model
    pairs = evaluation_pairs(["image", "dna", "text"], {m: model.embedding_dim(m) for m in model.config.modalities})
    assert len(pairs) == 21
    queries = split[1][:4]
    for query, key in pairs:
        predictions = identifier.identify(queries, top_k=3, keys=KEYS[key], query=QUERY[query])
        assert len(predictions) == 4 and not any(p.error for p in predictions), (query, key)
        assert {h.modality for p in predictions for h in p.hits} <= set(KEYS[key])
        thresholds, _ = library.calibration(QUERY[query], KEYS[key])  # calibrated per pair, as the others
        assert set(thresholds) == set(RANKS)
    # combined keys: the records with both, their own key removed when calibrating on the library itself
    combined = library.keys(["image+dna-concat"])
    assert combined.embeddings.shape == (40, 2 * model.embedding_dim("image"))
    assert torch.allclose(combined.embeddings.norm(dim=1), torch.ones(40))
    calibration = library._calibrations["image+dna->image+dna"]
    assert sum(right + wrong for right, wrong in calibration.counts.values()) > 0


def test_width_and_input_errors_name_both_sides(library, split):
    identifier = Identifier.load(library.directory)
    width = identifier.model.embedding_dim("image")
    with pytest.raises(ValueError, match=rf"image\+dna-concat queries are {2 * width} wide and dna keys {width} wide"):
        identifier.identify(split[1][:2], keys=["dna"], query="image+dna-concat")
    with pytest.raises(ValueError, match=rf"image queries are {width} wide and image\+dna-concat keys {2 * width}"):
        identifier.identify(split[1][:2], keys=["image+dna-concat"], query="image")
    with pytest.raises(ValueError, match="image queries are 4 wide and dna keys 6 wide"):
        check_widths("image", ["dna"], {"image": 4, "dna": 6})
    with pytest.raises(ValueError, match="image is 4 wide, dna 6"):
        check_widths("image+dna", ["text"], {"image": 4, "dna": 6, "text": 4})
    with pytest.raises(ValueError, match="searched alone"):
        identifier.identify(split[1][:2], keys=["image+dna", "text"], query="image")
    # a text query reads the ranks: a record without any is named
    nameless = [{**split[1][0], **dict.fromkeys(RANKS, ""), "id": "nameless"}, split[1][1]]
    with pytest.raises(ValueError, match="nameless: no taxonomy"):
        identifier.identify(nameless, keys=["dna"], query="text")
    skipped = Identifier.load(library.directory, on_bad_input="skip").identify(nameless, keys=["dna"], query="text")
    assert "no taxonomy" in skipped[0].error and not skipped[1].error


def test_cli_text_and_concatenated_queries(library, split, tmp_path):
    table = tmp_path / "queries.tsv"
    table.write_text("\t".join(COLUMNS) + "\n" + "".join("\t".join(r[c] for c in COLUMNS) + "\n" for r in split[1]))
    for query, keys in (("text", "image+dna"), ("image+dna-concat", "image+dna-concat")):
        out = tmp_path / f"{query}.tsv"
        assert cli(["identify", "--index", str(library.directory), "--records", str(table), "--query", query,
                    "--keys", keys, "--out", str(out), "--top-k", "2"]) == 0
        predictions = read_predictions_tsv(out)
        assert len(predictions) == len(split[1]) and {p.route for p in predictions} == {keys}
        assert f"query {query} -> keys {keys}" in out.read_text().splitlines()[0]


def test_each_pair_records_what_its_calibration_held_out(library, split, tmp_path, caplog):
    """Stored pairs and pairs calibrated in memory alike; with the model's training species known,
    how many new species there were (too few here: all species held out, with a warning)."""
    unknown = {"references": len(split[0]), "new_species_held": None, "new_references": None, "untrained_only": False}
    assert library.calibration_sample("image", ["dna"]) == unknown  # stored when the library was built
    assert library.calibration_sample("text", ["dna"])["new_species_held"] is None  # calibrated now, in memory
    folder = tmp_path / "refs"
    shutil.copytree(library.directory, folder)
    meta = json.loads((folder / "index.json").read_text())
    species = sorted({r["species"] for r in split[0]})
    (folder / "index.json").write_text(json.dumps({**meta, "trained_species": species[:2]}))
    with caplog.at_level(logging.WARNING, logger="clibd"):
        again = recalibrate_library(folder)
    sample = again.calibration_sample("image", ["dna"])
    assert sample["new_species_held"] == len(species) - 2 and not sample["untrained_only"]
    assert "species the model did not train on that calibration can hold out" in caplog.text
    text = again.calibration_sample("text", ["text"])  # one taxon key per species
    assert text["new_species_held"] == text["new_references"] == len(species) - 2
    assert again.precision_confidence("image", ["dna"]) is None  # no stated precision
    stated = recalibrate_library(folder, precision=0.9)
    pairs = json.loads((folder / "index.json").read_text())["pairs"]
    assert {pair["precision_confidence"] for pair in pairs.values()} == {0.95}
    assert stated.precision_confidence("image", ["dna"]) == 0.95


def test_the_library_tells_a_pair_whether_its_queries_are_taxon_names(library, monkeypatch):
    """Text queries (one per taxon name) are held out by species count, specimens by references
    (`calibrate_pair(text_queries=...)`): the library says which, rather than leaving it to be guessed."""
    import clibd.library

    told, real = {}, clibd.library.calibrate_pair

    def spy(*args, **kwargs):
        told[kwargs["query_kind"]] = kwargs["text_queries"]
        return real(*args, **{k: v for k, v in kwargs.items() if k != "query_kind"})

    for query, keys in (("text", ["dna"]), ("image", ["dna"]), ("dna", ["text"])):
        monkeypatch.setattr(clibd.library, "calibrate_pair", lambda *a, q=query, **k: spy(*a, query_kind=q, **k))
        library.calibrate(query, keys)
    assert told == {"text": True, "image": False, "dna": False}
