"""Multi-modal reference libraries (image, DNA and taxonomy-text keys in one folder) and identify
across modalities, with an untrained tiny three-tower model: what is stored, which keys answer,
IS+DU routing, growing a library, clear errors, the CLI. (Accuracy against `evaluate_retrieval`
with a trained model: tests/test_library_retrieval.py.)"""

import json
import math
import shutil

import pytest
import torch
from library_fixtures import save_model, species_photo_records

from clibd import CLIBDModel
from clibd.cli import main as cli
from clibd.constants import RANKS
from clibd.identify import Identifier, read_predictions_tsv
from clibd.index import ReferenceIndex, add_to_index, build_index, recalibrate_index
from clibd.library import ReferenceLibrary
from clibd.library_build import build_library, taxon_keys


@pytest.fixture(scope="module")
def records(data_dir, tmp_path_factory):
    """60 barcode records (up to 4 per species) with synthetic photos; a few lose their photo or barcode."""
    rows = species_photo_records(data_dir, tmp_path_factory.mktemp("photos"), 60)
    for i, row in enumerate(rows):
        if i % 7 == 3:
            row["dna"] = ""  # photo only
        elif i % 7 == 5:
            row["image"] = ""  # barcode only
    return rows


@pytest.fixture(scope="module")
def library(library_model_dir, records, tmp_path_factory):
    return build_library(library_model_dir, records, ["image", "dna", "text"], tmp_path_factory.mktemp("lib") / "refs",
                         progress=False)


def test_library_holds_each_records_keys_and_a_text_key_per_taxon(library, records):
    assert library.modalities == ["image", "dna", "text"] and library.meta["count"] == len(records)
    assert len(library.key_sets["image"].records) == sum(bool(r["image"]) for r in records)
    assert len(library.key_sets["dna"].records) == sum(bool(r["dna"]) for r in records)
    # keys are shared by id: a record's image key and dna key point at the same record
    assert [r["id"] for r in library.key_sets["dna"].records] == [r["id"] for r in records if r["dna"]]
    taxa = library.key_sets["text"].records
    family = next(r for r in records if r["family"])
    key = next(t for t in taxa if t["family"] == family["family"] and not t["genus"])
    assert key["id"] == f"{family['order']} {family['family']} not_classified not_classified" and not key["species"]
    assert len(taxa) == len({tuple(t[r] for r in ("order", "family", "genus", "species")) for t in taxa})
    assert sum(bool(t["species"]) for t in taxa) == len({r["species"] for r in records})
    # calibration per (query, keys) pair, and the IS+DU threshold
    meta = json.loads((library.directory / "index.json").read_text())
    assert {"image->dna", "image->image", "dna->dna", "image+dna->dna", "image->text",
            "dna->image dna text"} <= set(meta["pairs"])
    assert set(meta["pairs"]["image->dna"]["thresholds"]) == {"order", "family", "genus", "species"}
    assert -1 <= meta["is_du"]["threshold"] <= 1.01 and meta["is_du"]["queries"] > 0
    assert ReferenceIndex.load(library.directory).modality == "image"  # a library opens as its first key set


def test_taxon_keys_every_rank():
    keys = taxon_keys([{"order": "Diptera", "family": "Culicidae", "genus": "Aedes", "species": "Aedes aegypti"},
                       {"order": "Diptera", "family": "Culicidae", "genus": "", "species": ""}])
    assert [k["id"] for k in keys] == ["Diptera not_classified not_classified not_classified",
                                      "Diptera Culicidae not_classified not_classified",
                                      "Diptera Culicidae Aedes not_classified", "Diptera Culicidae Aedes Aedes aegypti"]


def test_photo_queries_against_each_key_set(library, records, library_model_dir):
    identifier = Identifier.load(library.directory)
    pictured = [r for r in records if r["image"]][:8]
    photos = [{"id": f"q{i}", "image": r["image"], "dna": r["dna"]} for i, r in enumerate(pictured)]
    to_dna = identifier.identify(photos, keys=["dna"], query="image", top_k=3)
    assert all(h.modality == "dna" for p in to_dna for h in p.hits) and {p.route for p in to_dna} == {"dna"}
    dna_ids = {r["id"] for r in library.key_sets["dna"].records}
    assert all(h.id in dna_ids for p in to_dna for h in p.hits)
    to_text = identifier.identify(photos, keys=["text"], query="image", top_k=3)
    assert all(h.id.count(" ") >= 3 and h.modality == "text" for p in to_text for h in p.hits)
    stacked = identifier.identify(photos, keys=["image", "dna"], query="image", top_k=200)
    assert {h.modality for h in stacked[0].hits} == {"image", "dna"}
    kind_of, images = library.key_modality(["dna", "image"]), len(library.key_sets["image"].records)
    assert (kind_of(images - 1), kind_of(images)) == ("image", "dna")  # image keys first, then DNA keys
    for outside in (-1, images + len(library.key_sets["dna"].records)):
        with pytest.raises(IndexError):
            kind_of(outside)
    assert len(stacked[0].hits) == len(library.key_sets["image"].records) + len(library.key_sets["dna"].records)
    # the photo's own image key is its nearest image key (a record is in the library): similarity 1
    to_image = identifier.identify(photos, keys=["image"], query="image", top_k=1)
    assert all(abs(p.similarity - 1) < 2e-3 for p in to_image)
    # image+dna: the normalised mean of both; a query without a barcode gets an error row
    mean = Identifier.load(library.directory, on_bad_input="skip").identify(photos, query="image+dna", top_k=1)
    assert [bool(p.error) for p in mean] == [not r["dna"] for r in pictured] and any(p.error for p in mean)
    embeddings = identifier.embed([photos[0]], query="image+dna")
    expected = torch.nn.functional.normalize(identifier.embed([photos[0]], query="image")
                                             + identifier.embed([photos[0]], query="dna"), dim=-1)
    assert torch.allclose(embeddings, expected) and embeddings.device.type == "cpu"


def test_is_du_routes_by_the_image_similarity(library, records):
    identifier = Identifier.load(library.directory)
    photos = [{"id": r["id"], "image": r["image"]} for r in records[:20] if r["image"]]
    threshold = library.is_du_threshold()
    routed = identifier.identify(photos, strategy="is-du", top_k=2)
    best_image = [p.similarity for p in identifier.identify(photos, keys=["image"], query="image", top_k=1)]
    assert [p.route for p in routed] == ["image" if s > threshold else "dna" for s in best_image]
    # a threshold given: every query above -1 goes to the image keys, none above 1.5
    assert {p.route for p in identifier.identify(photos, strategy="is-du", is_du_threshold=-1.5)} == {"image"}
    down = identifier.identify(photos, strategy="is-du", is_du_threshold=1.5)
    assert {p.route for p in down} == {"dna"} and all(h.modality == "dna" for p in down for h in p.hits)
    with pytest.raises(ValueError, match="is-du answers photo queries"):
        identifier.identify(photos, strategy="is-du", query="dna")
    # the image route judges its ranks by the image->image pair's confidence: with thresholds (set by
    # hand) just above every photo's similarity, the similarity alone answers no family, a heavy
    # margin weight answers some, on the same hits
    up = identifier.identify(photos, strategy="is-du", is_du_threshold=-1.5)
    pair = identifier.library.meta["pairs"]["image->image"]
    saved = dict(pair)
    above = max(p.similarity for p in up) + 1e-3
    try:
        pair["thresholds"] = {"order": -1.0, "family": above, "genus": above, "species": math.inf}
        pair["margin_weights"] = {}
        plain = identifier.identify(photos, strategy="is-du", is_du_threshold=-1.5)
        pair["margin_weights"] = {"order": 0.0, "family": 4.0, "genus": 4.0, "species": 0.0}
        heavy = identifier.identify(photos, strategy="is-du", is_du_threshold=-1.5)
    finally:
        pair.clear()
        pair.update(saved)
    assert [p.hits for p in heavy] == [p.hits for p in plain] == [p.hits for p in up]
    assert all(p.answer["order"] and not p.answer["family"] for p in plain)
    assert any(p.answer["family"] for p in heavy)


def test_clear_errors_for_keys_and_towers(library_model_dir, records, tmp_path, text_tokenizer):
    # a library with text keys takes names-only records (a checklist): their taxa become text keys
    checklist = {"id": "checklist-1", "order": "Diptera", "family": "Culicidae", "genus": "Aedes", "species": "",
                 "dna": "", "image": ""}
    dna_text = build_library(library_model_dir, [r for r in records if r["dna"]][:20] + [checklist], ["dna", "text"],
                             tmp_path / "dt", progress=False)
    assert "Diptera Culicidae Aedes not_classified" in [t["id"] for t in dna_text.key_sets["text"].records]
    assert len(dna_text.key_sets["dna"].records) == 20
    with pytest.raises(ValueError, match="checklist-1: no image or dna"):
        build_library(library_model_dir, records[:5] + [checklist], ["image", "dna"], tmp_path / "no_text", progress=False)
    with pytest.raises(ValueError, match="holds no image keys"):
        Identifier.load(dna_text.directory).identify(records[:2], keys=["image"], query="dna")
    no_image = save_model(tmp_path / "dna_text_model", text_tokenizer, ("dna", "text"))
    with pytest.raises(ValueError, match="the model has no image tower"):
        build_library(no_image, records[:10], ["image", "dna"], tmp_path / "x", progress=False)
    dna_only = build_library(no_image, [r for r in records if r["dna"]][:20], ["dna", "text"], tmp_path / "y",
                             progress=False)
    with pytest.raises(ValueError, match="the model has no image tower"):
        Identifier.load(dna_only.directory).identify(records[:2], keys=["dna"], query="image")


def test_add_grows_every_key_set_and_single_modality_folders_still_load(library, records, library_model_dir, tmp_path):
    first = build_library(library_model_dir, records[:30], ["image", "dna", "text"], tmp_path / "grow", progress=False)
    grown = add_to_index(first.directory, records[30:], progress=False)
    assert isinstance(grown, ReferenceLibrary)
    for modality in ("image", "dna", "text"):
        assert len(grown.key_sets[modality].records) == len(library.key_sets[modality].records)
        assert torch.allclose(grown.key_sets[modality].embeddings.float(),
                              library.key_sets[modality].embeddings.float(), atol=2e-3)
    replaced = add_to_index(first.directory, [{**records[0], "image": ""}], replace=True, progress=False)
    assert records[0]["id"] not in [r["id"] for r in replaced.key_sets["image"].records]
    assert records[0]["id"] in [r["id"] for r in replaced.key_sets["dna"].records]
    # relabelling every record of a species removes its name from the text keys
    species = records[1]["species"]
    relabelled = [{**r, "species": "Relabelled species"} for r in records[:30] if r["species"] == species]
    after = add_to_index(first.directory, relabelled, replace=True, progress=False)
    names = [r["species"] for r in after.key_sets["text"].records]
    assert species not in names and "Relabelled species" in names
    assert len(after.key_sets["text"].records) == after.key_sets["text"].embeddings.shape[0]
    # a folder the single-modality code writes opens as a library of one key set, with its own thresholds
    single = build_index(library_model_dir, [r for r in records if r["dna"]], "dna", tmp_path / "single", progress=False)
    as_library = ReferenceLibrary.load(single.directory)
    assert as_library.modalities == ["dna"] and not as_library.is_library
    assert as_library.calibration("dna", ["dna"])[0] == single.thresholds
    assert as_library.margin_weights("dna", ["dna"]) == single.margin_weights and set(single.margin_weights) == set(RANKS)
    # a library stores each pair's margin weights; a cross-modal pair has none to weigh (nearest key only)
    assert library.margin_weights("dna", ["dna"]) == library.meta["pairs"]["dna->dna"]["margin_weights"]
    assert set(library.margin_weights("dna", ["dna"])) == set(RANKS)
    assert not any(library.margin_weights("image", ["dna"]).values())
    [prediction] = Identifier.load(single.directory).identify([{"id": "q", "dna": records[0]["dna"]}], top_k=1)
    assert prediction.route == "dna" and math.isfinite(prediction.similarity)
    # photos against a DNA-only index: nothing to calibrate that pair on, so hits but no answer
    photo = next(r for r in records if r["image"])
    [prediction] = Identifier.load(single.directory).identify([{"id": "p", "image": photo["image"]}], keys=["dna"],
                                                              query="image", top_k=2)
    assert len(prediction.hits) == 2 and prediction.deepest_rank is None and prediction.route == "dna"


def test_add_without_recalibrating_keeps_every_calibration_until_recalibrated(library_model_dir, records, tmp_path):
    first = build_library(library_model_dir, records[:30], ["image", "dna", "text"], tmp_path / "lib", progress=False)
    kept = add_to_index(first.directory, records[30:], recalibrate=False, progress=False)
    assert len(kept.records) == len(records)
    for entry in ("pairs", "is_du"):
        assert kept.meta[entry] == first.meta[entry]  # learnt on the first 30, stored as they were
    assert kept.meta["keys"]["dna"]["species_check"] == first.meta["keys"]["dna"]["species_check"]
    again = recalibrate_index(first.directory)
    assert again.meta["pairs"]["dna->dna"]["counts"] != first.meta["pairs"]["dna->dna"]["counts"]  # more to learn from
    single = build_index(library_model_dir, [r for r in records[:30] if r["dna"]], "dna", tmp_path / "one", progress=False)
    before = single.thresholds, single.species_check  # read before the folder is rewritten
    grown = add_to_index(single.directory, [r for r in records[30:] if r["dna"]], recalibrate=False, progress=False)
    assert (grown.thresholds, grown.species_check) == before and before[1] is not None
    assert len(grown.records) > len(single.records)


def test_cli_builds_a_library_and_identifies_photos_with_routes(library_model_dir, records, tmp_path, capsys):
    table = tmp_path / "refs.tsv"
    table.write_text("id\torder\tfamily\tgenus\tspecies\tdna\timage\n" + "".join(
        "\t".join(r[c] for c in ("id", "order", "family", "genus", "species", "dna", "image")) + "\n"
        for r in records))
    assert cli(["index", "build", "--model", str(library_model_dir), "--records", str(table), "--modality", "image", "dna",
                "text", "--out", str(tmp_path / "refs")]) == 0
    assert "IS+DU threshold" in capsys.readouterr().out
    photos = tmp_path / "photos"
    photos.mkdir()
    for r in [r for r in records if r["image"]][:4]:
        shutil.copy(r["image"], photos / f"{r['id']}.png")
    for strategy, keys in (("nearest", ["--keys", "dna"]), ("is-du", [])):
        out = tmp_path / f"{strategy}.tsv"
        assert cli(["identify", "--index", str(tmp_path / "refs"), "--images", str(photos), "--query", "image",
                    "--strategy", strategy, *keys, "--out", str(out), "--top-k", "2"]) == 0
        predictions = read_predictions_tsv(out)
        assert len(predictions) == len(list(photos.iterdir())) and all(p.route for p in predictions)
        assert f"strategy {strategy}" in out.read_text().splitlines()[0]
    assert {p.route for p in read_predictions_tsv(tmp_path / "nearest.tsv")} == {"dna"}
    assert cli(["identify", "--index", str(tmp_path / "refs"), "--images", str(photos), "--strategy", "is-du",
                "--query", "dna"]) == 2  # a clear error, not a crash
    assert "is-du answers photo queries" in capsys.readouterr().err


def test_identify_embeds_on_the_gpu_when_there_is_one_and_returns_cpu_tensors(library, records, monkeypatch):
    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(CLIBDModel, "to", lambda self, device: moved.append(device) or self)
    Identifier.load(library.directory)
    assert moved == ["cuda"]  # a GPU is used when there is one (here only asked for: the machine has none)
    monkeypatch.undo()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    identifier = Identifier.load(library.directory, device=device)
    assert next(identifier.model.parameters()).device.type == device
    photos = [{"id": r["id"], "image": r["image"]} for r in records if r["image"]][:5]
    embeddings = identifier.embed(photos, query="image")
    assert embeddings.device.type == "cpu" and embeddings.dtype == torch.float32  # each batch back on the CPU
    assert all(k.embeddings.device.type == "cpu" for k in identifier.library.key_sets.values())
    assert len(identifier.identify(photos, keys=["dna"], query="image", top_k=2)) == 5


def test_demo_builds_a_library_from_the_shared_photos_and_identifies_them(data_dir, tmp_path, capsys):
    assert cli(["demo", "--data-dir", str(data_dir), "--limit", "30", "--show", "2", "--library",
                str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "photo -> DNA" in out and "photo -> image" in out and "IS+DU" in out
    library = ReferenceLibrary.load(tmp_path / "demo" / "refs")
    assert len(library.key_sets["dna"].records) == 30 and len(library.key_sets["image"].records) == 19
    assert library.key_sets["image"].records[0]["id"].startswith("order_")  # images.csv: ids from file names
    # the demo's library answers the same commands a user would type
    photos = data_dir / "bioscan1m_examples" / "images"
    assert cli(["identify", "--index", str(tmp_path / "demo" / "refs"), "--images", str(photos / "order_Diptera.jpg"),
                "--keys", "dna", "--query", "image", "--top-k", "1"]) == 0
    assert "\tdna\t" in capsys.readouterr().out


def test_photos_against_a_dna_index_are_a_clear_error_not_an_error_row_each(library_model_dir, records, tmp_path):
    barcodes = [r for r in records if r["dna"]][:20]
    photos_only = [{**r, "dna": ""} for r in records if r["image"]][:3]
    index = build_index(library_model_dir, barcodes, "dna", tmp_path / "dna", progress=False)
    identifier = Identifier.load(index.directory)
    with pytest.raises(ValueError, match="the queries are image but .* holds dna keys: .*--modality image dna"):
        identifier.identify(photos_only)
    dna_text = build_library(library_model_dir, barcodes, ["dna", "text"], tmp_path / "dna_text", progress=False)
    with pytest.raises(ValueError, match="the queries are image but .* holds dna and text keys"):
        Identifier.load(dna_text.directory).identify(photos_only)  # a library without photos alike
    assert Identifier.load(dna_text.directory).plan_for(photos_only, keys=["text"]).keys == ("text",)  # asked for
    assert identifier.plan_for(barcodes[:2] + photos_only).query == "dna"  # some carry barcodes: the index's own
    # asked for explicitly, image -> DNA runs, and says nothing it cannot stand behind
    asked = identifier.identify(photos_only, query="image")
    assert all(p.hits and not any(p.answer.values()) for p in asked)


def test_a_library_refuses_ids_with_a_tab_or_line_break_as_an_index_does(library_model_dir, records, tmp_path):
    tabbed = [{**records[0], "id": "BOLD\t1"}, *[r for r in records[1:] if r["dna"]][:5]]
    with pytest.raises(ValueError, match="BOLD\t1: id holds a tab or a line break"):
        build_library(library_model_dir, tabbed, ["dna", "text"], tmp_path / "lib", progress=False)
