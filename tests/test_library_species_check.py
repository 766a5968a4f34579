"""The species check of a multi-modal library's DNA keys (`clibd.species_check` through
`clibd.library_build`): the barcodes and the calibrated check it stores, DNA queries named by
alignment through the library, the options, add / replace / recalibrate, and libraries of an older
clibd (no barcodes.tsv). A tiny untrained DNA + text model whose DNA tower is a k-mer-profile MLP
(no sketch: a library's towers share one width; its random projection of the k-mer counts already
places whole barcodes, partial ones less well), on the shared BOLD barcodes (the `records` fixture
of conftest.py)."""

import json
import math
import shutil

import pytest
import torch

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.identify import Identifier
from clibd.index import ReferenceIndex, add_to_index, build_index, recalibrate_index
from clibd.library import ReferenceLibrary
from clibd.library_build import build_library
from clibd.novelty import MARGIN_DEPTH
from clibd.species_check import NOVEL_NAMED, SpeciesCheck

MODALITIES = ["dna", "text"]
DNA = {"model_type": "clibd_kmer_profile", "kmer_size": 5, "hidden_size": 256, "sketch_dim": 0}


@pytest.fixture(scope="module")
def model(tmp_path_factory, text_tokenizer):
    """A tiny untrained DNA (k-mer profile) + text model, seeded."""
    folder = tmp_path_factory.mktemp("dna_text_model")
    torch.manual_seed(0)
    config = CLIBDConfig.tiny(modalities=MODALITIES, dna_config=DNA)
    CLIBDModel(config).eval().save_pretrained(folder)
    CLIBDProcessor.from_model_config(config, text_tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def libraries(model, records, tmp_path_factory):
    folder = tmp_path_factory.mktemp("library_check")
    checked = build_library(model, records["many_each"], MODALITIES, folder / "checked", progress=False)
    plain = build_library(model, records["many_each"], MODALITIES, folder / "plain", progress=False,
                          species_check=False)
    return checked, plain


def dna_predictions(library: ReferenceLibrary, queries: list[dict]):
    return Identifier.load(library.directory).identify(queries, keys=["dna"], query="dna")


def species_rate(predictions, queries) -> float:
    return sum(p.answer["species"] == q["species"] for p, q in zip(predictions, queries, strict=True)) / len(queries)


def test_library_keeps_its_dna_keys_barcodes_and_calibrated_check(libraries, records):
    checked, plain = libraries
    keys = checked.key_sets["dna"]
    lines = (checked.directory / "barcodes.tsv").read_text().splitlines()
    assert lines[0] == "id\tdna"
    assert [line.split("\t")[0] for line in lines[1:]] == [r["id"] for r in keys.records]
    assert keys.barcodes == [r["dna"] for r in records["many_each"]]  # the DNA key order is the records'
    stored = json.loads((checked.directory / "index.json").read_text())["keys"]["dna"]["species_check"]
    assert keys.species_check == SpeciesCheck.from_dict(stored) and math.isfinite(keys.species_check.embedding_threshold)
    assert keys.species_check.specimens > 0
    # only the DNA keys carry it: the text keys and stacked keys answer by the embedding alone
    assert "species_check" not in checked.key_sets["text"].meta
    assert checked.keys(["dna", "text"]).species_check is None
    # the folder's barcodes.tsv is the DNA keys': other key sets read none from it
    assert checked.key_sets["text"].barcodes == [] and checked.keys(["dna", "text"]).barcodes == []
    # species_check=False: the barcodes are kept (as a DNA index keeps them), no check is calibrated
    assert plain.key_sets["dna"].species_check is None and plain.key_sets["dna"].barcodes == keys.barcodes
    assert json.loads((plain.directory / "index.json").read_text())["keys"]["dna"]["species_check"] is False


def test_dna_queries_are_named_by_alignment_through_the_library(libraries, records):
    checked, plain = libraries
    check = checked.key_sets["dna"].species_check
    # partial barcodes of held species: a lower embedding similarity, alignment unmoved
    partial = [{**q, "dna": q["dna"][100:350]} for q in records["held"]]
    predictions = dna_predictions(checked, partial)
    assert species_rate(predictions, partial) > species_rate(dna_predictions(plain, partial), partial) + 0.1
    settled = [p for p in predictions if p.identity >= check.identity_cutoff]
    assert settled and all(not p.novel and p.answer["species"] for p in settled)
    assert all(math.isnan(p.identity) for p in dna_predictions(plain, partial[:3]))
    # a reference's own barcode: identity 1, its species
    reference = records["many_each"][0]
    [exact] = dna_predictions(checked, [{"id": "q", "dna": reference["dna"]}])
    assert exact.identity == 1.0 and exact.answer["species"] == reference["species"] and not exact.novel
    # absent species: named only by a >= 97 % identical reference or where the check's confidence
    # (novelty similarity + weight x species margin over the MARGIN_DEPTH nearest) clears its threshold
    absent = Identifier.load(checked.directory).identify(records["absent"], keys=["dna"], query="dna",
                                                         top_k=MARGIN_DEPTH)
    assert all(p.identity >= check.identity_cutoff or check.confidence(
        p.novelty_similarity, [h.similarity for h in p.hits], [h.taxonomy["species"] for h in p.hits])
        >= check.embedding_threshold for p in absent if p.answer["species"])
    assert sum(p.novel for p in absent) >= 0.5 * len(absent)
    header = Identifier.load(checked.directory).provenance_line(
        Identifier.load(checked.directory).plan_for([], keys=["dna"], query="dna"))
    assert "species check: identity >= 0.97" in header


def test_index_build_options_reach_the_librarys_check(model, records, tmp_path):
    from clibd.cli import main as cli

    table = tmp_path / "refs.tsv"
    table.write_text("id\torder\tfamily\tgenus\tspecies\tdna\n" + "".join(
        "\t".join(r[c] for c in ("id", "order", "family", "genus", "species", "dna")) + "\n"
        for r in records["many_each"]))
    common = ["index", "build", "--model", str(model), "--records", str(table), "--modality", *MODALITIES]
    assert cli([*common, "--out", str(tmp_path / "a"), "--identity-cutoff", "0.98", "--novel-named", "0.05",
                "--species-margin-weight", "0"]) == 0
    check = ReferenceLibrary.load(tmp_path / "a").key_sets["dna"].species_check
    assert (check.identity_cutoff, check.novel_named, check.margin_weight) == (0.98, 0.05, 0.0)
    assert cli([*common, "--out", str(tmp_path / "b"), "--no-species-check"]) == 0
    assert ReferenceLibrary.load(tmp_path / "b").key_sets["dna"].species_check is None
    with pytest.raises(ValueError, match="novel_named must be between 0 and 1"):
        build_index(model, records["many_each"], MODALITIES, tmp_path / "c", species_check={"novel_named": 2})


def test_add_and_recalibrate_keep_the_barcodes_and_the_check(model, records, tmp_path):
    rows = records["many_each"][:120]  # enough species with two references to calibrate on, and fast
    half = len(rows) // 2
    build_library(model, rows[:half], MODALITIES, tmp_path / "refs", progress=False,
                  species_check={"novel_named": 0.05})
    grown = add_to_index(tmp_path / "refs", rows[half:], progress=False).key_sets["dna"]
    assert grown.barcodes == [r["dna"] for r in rows] and grown.species_check.novel_named == 0.05
    # --replace: the replaced records' barcodes go with them, in the new DNA key order
    replaced = [{**r, "dna": r["dna"][50:]} for r in rows[:3]]
    after = add_to_index(tmp_path / "refs", replaced, replace=True, progress=False).key_sets["dna"]
    assert after.labels("id") == [r["id"] for r in rows[3:] + replaced]
    assert after.barcodes == [r["dna"] for r in rows[3:] + replaced]
    assert after.species_check is not None and after.species_check.novel_named == 0.05
    # recalibrate (no model): the same check from the stored embeddings, barcodes and options
    assert recalibrate_index(tmp_path / "refs").key_sets["dna"].species_check == after.species_check
    meta = json.loads((tmp_path / "refs" / "index.json").read_text())
    del meta["keys"]["dna"]["species_check"]  # as no check was stored: recalibrate calibrates one
    (tmp_path / "refs" / "index.json").write_text(json.dumps(meta))
    assert ReferenceLibrary.load(tmp_path / "refs").key_sets["dna"].species_check is None
    again = recalibrate_index(tmp_path / "refs").key_sets["dna"].species_check
    assert again is not None and again.novel_named == NOVEL_NAMED


def test_a_library_of_an_older_clibd_works_without_a_check(libraries, records, model, tmp_path):
    checked, plain = libraries
    # one built with species_check=False stays without it when recalibrated
    shutil.copytree(plain.directory, tmp_path / "plain")
    assert recalibrate_index(tmp_path / "plain").key_sets["dna"].species_check is None
    assert json.loads((tmp_path / "plain" / "index.json").read_text())["keys"]["dna"]["species_check"] is False
    assert checked.key_sets["dna"].species_check is not None
    shutil.copytree(checked.directory, tmp_path / "old")
    (tmp_path / "old" / "barcodes.tsv").unlink()  # an older clibd kept no barcodes and stored no check
    meta = json.loads((tmp_path / "old" / "index.json").read_text())
    del meta["keys"]["dna"]["species_check"]
    (tmp_path / "old" / "index.json").write_text(json.dumps(meta))
    old = ReferenceLibrary.load(tmp_path / "old")
    assert old.key_sets["dna"].species_check is None and old.key_sets["dna"].barcodes == []
    predictions = dna_predictions(old, records["held"][:5])
    assert all(math.isnan(p.identity) and p.hits for p in predictions)
    # recalibrate: no barcodes to calibrate on, still no check; add: the new keys' barcodes are kept,
    # the old keys' are unknown (""), so still no check (as an old DNA index)
    assert recalibrate_index(tmp_path / "old").key_sets["dna"].species_check is None
    extra = [{**records["absent"][0], "id": "new-1"}]
    grown = add_to_index(tmp_path / "old", extra, progress=False).key_sets["dna"]
    assert grown.barcodes == [""] * len(checked.key_sets["dna"].records) + [extra[0]["dna"]]
    assert grown.species_check is None
    assert all(math.isnan(p.identity) for p in dna_predictions(ReferenceLibrary.load(tmp_path / "old"),
                                                               records["held"][:3]))
    assert ReferenceIndex.load(tmp_path / "old").modality == "dna"  # a library opens as its first key set
