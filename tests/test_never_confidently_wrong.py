"""Bad input and faults at every door, each with what clibd now does (bench/README.md's table).

The model (conftest's `dna_model`) is a small k-mer-profile DNA tower whose fixed k-mer sketch
makes untrained embeddings already place barcodes by k-mer similarity, so the libraries below
behave like real ones without training. Records (conftest's `records`) are the shared BOLD barcodes.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import save_model
from PIL import Image
from safetensors.torch import load_file, save_file

from clibd import CLIBDConfig
from clibd.cli import main as cli
from clibd.constants import RANKS
from clibd.identify import Identifier, identify_to_tsv, read_predictions_tsv
from clibd.index import ReferenceIndex, add_to_index, build_index, load_model, recalibrate_index
from clibd.thresholds import answers_needed


def write_tsv(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_one_reference_per_species_library_flags_absent_species_novel(dna_model, records, tmp_path, caplog):
    index = build_index(dna_model, records["one_each"], "dna", tmp_path / "refs", progress=False)
    assert all(math.isfinite(value) for value in index.thresholds.values())
    assert index.meta["calibration"]["species"] == "above wrong"  # no second specimen to learn "held" from
    assert "species: only wrong answers" in caplog.text  # the user is told how it was set
    predictions = Identifier.load(tmp_path / "refs").identify(records["absent"])
    novel = [p for p in predictions if p.novel and not p.answer["species"]]
    assert len(novel) >= 0.95 * len(predictions)  # absent species: no species name, flagged novel
    assert any(p.answer["order"] for p in novel)  # but still placed where the library can tell


def test_library_without_species_column_names_no_species(dna_model, records, tmp_path):
    table = write_tsv(tmp_path / "refs.tsv", records["many_each"], ["id", "order", "family", "genus", "dna"])
    assert cli(["index", "build", "--model", str(dna_model), "--records", str(table), "--out",
                str(tmp_path / "refs")]) == 0
    index = ReferenceIndex.load(tmp_path / "refs")
    assert math.isnan(index.thresholds["species"]) and math.isfinite(index.thresholds["genus"])
    predictions = Identifier.load(tmp_path / "refs").identify(records["held"] + records["absent"])
    assert all(p.novel and not p.answer["species"] for p in predictions)
    assert any(p.answer["genus"] for p in predictions)  # the genus is calibrated from genus hold-outs


def test_model_with_non_finite_weights_is_refused(dna_model, records, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in dna_model.iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    weights = load_file(damaged / "model.safetensors")
    name = next(key for key, value in weights.items() if value.is_floating_point() and value.numel() > 1)
    weights[name][0] = float("nan")
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{damaged}: the model's weights hold NaN or inf"):
        load_model(damaged)
    table = write_tsv(tmp_path / "refs.tsv", records["one_each"], ["id", *RANKS, "dna"])
    assert cli(["index", "build", "--model", str(damaged), "--records", str(table), "--out", str(tmp_path / "x")]) == 2
    assert "NaN or inf" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_truncated_model_file_is_a_clear_error(dna_model, records, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for file in dna_model.iterdir():
        data = file.read_bytes()
        (truncated / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".safetensors" else data)
    table = write_tsv(tmp_path / "refs.tsv", records["one_each"], ["id", *RANKS, "dna"])
    assert cli(["index", "build", "--model", str(truncated), "--records", str(table), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "model.safetensors" in err and "Traceback" not in err


def test_index_with_non_finite_embeddings_is_refused(dna_model, records, tmp_path):
    build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    stored = load_file(tmp_path / "refs" / "embeddings.safetensors")
    stored["dna"][3, 0] = float("nan")  # a NaN key outranks every other (NaN sorts first), so it is found
    save_file(stored, tmp_path / "refs" / "embeddings.safetensors")
    identifier = Identifier.load(tmp_path / "refs")
    with pytest.raises(ValueError, match="embeddings.safetensors: holds embeddings that are not finite"):
        identifier.identify(records["many_each"][3:4])


def test_query_whose_embedding_is_not_finite_gets_an_error_row(dna_model, records, tmp_path, monkeypatch):
    build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    import clibd.checked_embedding as checked

    real = checked.embed_records

    def one_damaged(*args, **kwargs):  # as a damaged input or weights would give
        embeddings = real(*args, **kwargs)
        embeddings[1] = float("nan")
        return embeddings

    monkeypatch.setattr(checked, "embed_records", one_damaged)
    queries = records["held"][:4]
    with pytest.raises(ValueError, match=f"{queries[1]['id']}: its embedding is not finite"):
        Identifier.load(tmp_path / "refs").identify(queries)
    predictions = Identifier.load(tmp_path / "refs", on_bad_input="skip").identify(queries)
    assert [p.query_id for p in predictions] == [r["id"] for r in queries]
    assert "not finite" in predictions[1].error and not predictions[1].hits and not predictions[1].novel
    assert all(p.hits and not p.error for i, p in enumerate(predictions) if i != 1)


def test_bad_query_rows_and_duplicate_ids_each_get_an_error_row(dna_model, records, tmp_path):
    build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    held = records["held"]
    fasta = tmp_path / "queries.fasta"
    fasta.write_text(f">{held[0]['id']}\n{held[0]['dna']}\n>{held[1]['id']}\nACGTXXXXACGT\n"
                     f">{held[2]['id']}\n{held[2]['dna'] * 2}\n>{held[0]['id']}\n{held[3]['dna']}\n")
    out = tmp_path / "preds.tsv"
    assert cli(["identify", "--index", str(tmp_path / "refs"), "--fasta", str(fasta), "--out", str(out)]) == 0
    rows = {(p.query_id, p.error) for p in read_predictions_tsv(out)}
    assert len(read_predictions_tsv(out)) == 4  # nothing vanished
    assert (held[0]["id"], "") in rows and (held[2]["id"], "") in rows
    assert any(query == held[1]["id"] and "not nucleotides" in why for query, why in rows)
    assert any(query == held[0]["id"] and "duplicate query id" in why for query, why in rows)
    assert cli(["identify", "--index", str(tmp_path / "refs"), "--fasta", str(fasta), "--on-bad-input", "error",
                "--out", str(tmp_path / "strict.tsv")]) == 2


def test_interrupted_before_the_first_row_resumes_as_one_table(dna_model, records, tmp_path, monkeypatch):
    build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    identifier = Identifier.load(tmp_path / "refs", batch_size=4)
    out = tmp_path / "preds.tsv"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    with monkeypatch.context() as patch:
        patch.setattr(identifier, "iter_identify", interrupted)
        with pytest.raises(KeyboardInterrupt):
            identify_to_tsv(identifier, records["held"], out, top_k=3)
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("# clibd") and lines[1].startswith("query_id\t")
    assert identify_to_tsv(identifier, records["held"], out, top_k=3) == len(records["held"])
    text = out.read_text()
    assert text.count("# clibd") == 1 and text.count("query_id\t") == 1
    assert [p.query_id for p in read_predictions_tsv(out)] == [r["id"] for r in records["held"]]


@pytest.fixture(scope="module")
def photo_library(data_dir, tmp_path_factory):
    """A tiny image+DNA model and an image index of a few shared BIOSCAN photos."""
    folder = tmp_path_factory.mktemp("photos")
    config = CLIBDConfig.tiny(modalities=["image", "dna"])
    model_dir = save_model(config, folder / "model")
    with open(data_dir / "bioscan1m_examples" / "images.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:8]
    references = [{"id": row["image_file"].rsplit("/", 1)[-1], **dict.fromkeys(RANKS, ""), "order": row["order"],
                   "dna": "", "image": str(data_dir / "bioscan1m_examples" / row["image_file"])} for row in rows]
    build_index(model_dir, references, "image", folder / "refs", progress=False)
    return folder, references


def test_photo_folder_with_unreadable_and_oversized_files_keeps_the_good_ones(photo_library, tmp_path, monkeypatch):
    folder, references = photo_library
    photos = tmp_path / "photos"
    photos.mkdir()
    for reference in references[:3]:
        Image.open(reference["image"]).save(photos / f"{reference['id']}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(np.zeros((400, 400), dtype=np.uint8)).save(photos / "huge.png")
    monkeypatch.setenv("CLIBD_MAX_IMAGE_PIXELS", "100000")  # stands in for a 14,000 px photo (the shared: 341 x 256)
    out = tmp_path / "preds.tsv"
    assert cli(["identify", "--index", str(folder / "refs"), "--image", str(photos), "--out", str(out)]) == 0
    predictions = {p.query_id.rsplit("/", 1)[-1]: p for p in read_predictions_tsv(out)}
    assert len(predictions) == 5
    assert "unreadable" in predictions["broken.jpg"].error and "limit" in predictions["huge.png"].error
    assert all(p.hits and not p.error for name, p in predictions.items() if name not in ("broken.jpg", "huge.png"))


def test_index_build_skips_records_it_cannot_embed_and_lists_them(photo_library, tmp_path):
    folder, references = photo_library
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    records = references[:4] + [{**references[4], "id": "broken", "image": str(tmp_path / "broken.jpg")}]
    with pytest.raises(ValueError, match="broken"):
        build_index(folder / "model", records, "image", tmp_path / "strict", progress=False)
    index = build_index(folder / "model", records, "image", tmp_path / "refs", progress=False, on_bad_input="skip")
    assert [r["id"] for r in index.records] == [r["id"] for r in references[:4]]
    skipped = (tmp_path / "refs" / "skipped.tsv").read_text().splitlines()
    assert skipped[0] == "id\treason" and skipped[1].startswith("broken\t") and "unreadable" in skipped[1]


def test_hub_commands_offline_give_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    assert cli(["index", "pull", "me/refs", "--out", str(tmp_path / "pulled")]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face Hub" in err and "Traceback" not in err


def test_legacy_index_without_stored_calibration_is_recalibrated(dna_model, records, tmp_path, caplog):
    index = build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    meta = json.loads((tmp_path / "refs" / "index.json").read_text())
    del meta["calibration"]
    meta["thresholds"] = {**meta["thresholds"], "order": float("nan")}  # as older clibd left one-sided ranks
    (tmp_path / "refs" / "index.json").write_text(json.dumps(meta))
    old = ReferenceIndex.load(tmp_path / "refs")
    assert old.thresholds == pytest.approx(index.thresholds) and "recalibrated in memory" in caplog.text
    assert cli(["index", "recalibrate", str(tmp_path / "refs")]) == 0
    stored = json.loads((tmp_path / "refs" / "index.json").read_text())
    assert stored["thresholds"] == pytest.approx(index.thresholds) and "calibration" in stored
    assert torch.equal(ReferenceIndex.load(tmp_path / "refs").embeddings, index.embeddings)


def test_barcodes_over_660_bp_are_named_when_index_build_and_identify_truncate_them(records, tmp_path, caplog):
    model_dir = save_model(CLIBDConfig.tiny(modalities=["dna"]), tmp_path / "bert")  # BarcodeBERT: 660 bp
    references = records["many_each"][:20]
    long_reference = {**references[0], "dna": references[0]["dna"] * 2}
    build_index(model_dir, [long_reference, *references[1:]], "dna", tmp_path / "refs", progress=False)
    assert f"were truncated: barcode '{long_reference['id']}'" in caplog.text
    caplog.clear()
    query = {**records["held"][0], "dna": records["held"][0]["dna"] * 2}
    Identifier.load(tmp_path / "refs").identify([query, records["held"][1]])
    assert f"1 of 2 barcodes were longer than 660 bp and were truncated: barcode '{query['id']}'" in caplog.text


def test_answers_at_a_stated_precision_report_it_per_rank(dna_model, records, tmp_path):
    table = write_tsv(tmp_path / "refs.tsv", records["many_each"], ["id", *RANKS, "dna"])
    assert cli(["index", "build", "--model", str(dna_model), "--records", str(table), "--out", str(tmp_path / "strict"),
                "--precision", "0.9"]) == 0
    balanced = build_index(dna_model, records["many_each"], "dna", tmp_path / "balanced", progress=False)
    strict = ReferenceIndex.load(tmp_path / "strict")
    assert strict.meta["precision"] == 0.9 and set(strict.meta["calibration"].values()) <= {
        "precision", "precision unreachable", "below right"}
    predictions = Identifier.load(tmp_path / "strict").identify(records["absent"])
    assert strict.meta["precision_confidence"] == 0.95 and balanced.meta["precision_confidence"] is None
    assert "for precision 0.9, borne out at 95% confidence" in Identifier.load(tmp_path / "strict").provenance_line()
    answered = [p for p in predictions if p.answer["order"]]
    assert answered and all(p.precision["order"] >= 0.9 for p in answered)  # the precision it was set for
    assert all(set(p.precision) == {rank for rank in RANKS if p.answer[rank]} for p in predictions)
    assert cli(["index", "recalibrate", str(tmp_path / "balanced"), "--precision", "0.9"]) == 0
    assert ReferenceIndex.load(tmp_path / "balanced").thresholds == strict.thresholds
    recalibrate_index(tmp_path / "balanced", precision=0.99)  # asking more precision answers less
    stricter = Identifier.load(tmp_path / "balanced").identify(records["absent"])
    assert all(sum(bool(p.answer[rank]) for p in stricter) <= sum(bool(p.answer[rank]) for p in predictions)
               for rank in RANKS)
    assert balanced.thresholds != strict.thresholds


def test_a_precision_no_answer_bears_out_leaves_ranks_to_alignment(dna_model, records, tmp_path, caplog):
    """0.999 at 95 % confidence takes 2,703 right calibration answers: none of this library's ranks
    bears it out, so its thresholds are infinite (kept through index.json) and the embedding answers
    no rank; the species check still names the species of a barcode a reference is >= 97 % like."""
    assert (answers_needed(0.98), answers_needed(0.999), answers_needed(0.98, 0.5)) == (133, 2703, 1)
    with caplog.at_level("WARNING", logger="clibd"):
        build_index(dna_model, records["many_each"], "dna", tmp_path / "strict", progress=False, precision=0.999)
    assert "takes at least 2703 right answers" in caplog.text
    index = ReferenceIndex.load(tmp_path / "strict")
    assert index.thresholds == dict.fromkeys(RANKS, math.inf) and index.meta["precision_confidence"] == 0.95
    identifier = Identifier.load(tmp_path / "strict")
    assert "with novelty >= inf" in identifier.provenance_line()  # the floor no embedding answer clears
    queries = records["held"] + records["absent"]
    predictions = identifier.identify(queries)
    named = [p for p in predictions if any(p.answer.values())]
    assert named and all(p.identity >= identifier.index.species_check.identity_cutoff and p.answer["species"]
                         for p in named)  # alignment's answers, whole lineages; nothing from the embedding
    assert all(p.novel for p in predictions if p not in named)


def test_training_names_the_barcodes_it_truncates_once(records):
    from types import SimpleNamespace

    from clibd.data import records_to_dataset
    from clibd.training import ExperimentConfig
    from clibd.training.loop import _report_truncation

    rows = records["held"][:5]
    rows = [{**rows[0], "dna": rows[0]["dna"] * 2}, *rows[1:], {**rows[2], "id": "LONG-2", "dna": rows[2]["dna"] * 3}]
    printed = []
    config = ExperimentConfig.from_dict({"model": {"preset": "tiny", "modalities": ["dna", "text"]},
                                         "data": {"path": "x.tsv"}})
    _report_truncation(SimpleNamespace(print=printed.append), config, records_to_dataset(rows))
    long = [r["id"] for r in rows if len(r["dna"]) > 660]  # the two made long, and any already so
    assert {rows[0]["id"], "LONG-2"} <= set(long)
    assert printed == [f"{len(long)} of 6 training barcodes are longer than 660 bp and are truncated: {', '.join(long)}"]


def test_index_build_never_replaces_what_is_not_an_index(dna_model, records, tmp_path, capsys):
    table = write_tsv(tmp_path / "refs.tsv", records["many_each"], ["id", *RANKS, "dna"])
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.jpg").write_bytes(b"precious")
    for out in (table, photos):  # a mistyped --out: the records themselves, a folder of the user's
        before = {p: p.read_bytes() for p in [out, *out.glob("*")] if p.is_file()}
        assert cli(["index", "build", "--model", str(dna_model), "--records", str(table), "--out", str(out)]) == 2
        assert "would replace it" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in [out, *out.glob("*")] if p.is_file()} == before
    with pytest.raises(ValueError, match="would replace it"):
        build_index(dna_model, records["many_each"], ["dna", "text"], photos, progress=False)
    (tmp_path / "empty").mkdir()
    build_index(dna_model, records["many_each"][:6], "dna", tmp_path / "empty", progress=False, calibrate=False)
    build_index(dna_model, records["many_each"][:8], "dna", tmp_path / "empty", progress=False, calibrate=False)
    assert ReferenceIndex.load(tmp_path / "empty").meta["count"] == 8  # an index is rebuilt in place
    (photos / "index.json").write_text('{"name": "my site"}')  # an index.json, but not a clibd index's
    with pytest.raises(ValueError, match="is a folder whose index.json does not read as a clibd index's .*; building an index there would"):
        build_index(dna_model, records["many_each"][:6], "dna", photos, progress=False, calibrate=False)
    assert (photos / "keep.jpg").read_bytes() == b"precious"
    # through a symbolic link the folder it names is rebuilt or grown; the link stays a link
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    build_index(dna_model, records["many_each"][:6], "dna", tmp_path / "link", progress=False, calibrate=False)
    add_to_index(tmp_path / "link", records["many_each"][6:9], progress=False)
    assert (tmp_path / "link").is_symlink() and ReferenceIndex.load(tmp_path / "empty").meta["count"] == 9


def test_damaged_index_files_are_named_not_a_traceback(dna_model, records, tmp_path, capsys):
    build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    queries = write_tsv(tmp_path / "q.tsv", records["held"][:3], ["id", "dna"])
    intact = {p.name: p.read_bytes() for p in (tmp_path / "refs").iterdir()}
    damages = {"embeddings.safetensors": [b"", intact["embeddings.safetensors"][:-100]],  # empty; cut short
               "index.json": [intact["index.json"][:200], b'{"clibd_version": "0.1.0"}']}  # cut; edited by hand
    for name, versions in damages.items():
        for damaged in versions:
            (tmp_path / "refs" / name).write_bytes(damaged)
            for command in (["identify", "--index", str(tmp_path / "refs"), "--records", str(queries)],
                            ["index", "recalibrate", str(tmp_path / "refs")]):
                assert cli(command) == 2  # before: struct.error's traceback, or numpy's / json's words alone
                assert f"{tmp_path / 'refs' / name}: " in capsys.readouterr().err
        (tmp_path / "refs" / name).write_bytes(intact[name])
    (tmp_path / "refs" / "barcodes.tsv").unlink()  # before: identified without the species check, silently
    with pytest.raises(ValueError, match="barcodes.tsv: missing, yet the index's species check"):
        Identifier.load(tmp_path / "refs").identify(records["held"][:3])


def test_ctrl_c_in_identify_says_how_to_resume_and_resumes(dna_model, records, tmp_path, monkeypatch, capsys):
    build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    queries = write_tsv(tmp_path / "q.tsv", records["held"], ["id", "dna"])
    out = tmp_path / "preds.tsv"
    command = ["identify", "--index", str(tmp_path / "refs"), "--records", str(queries), "--out", str(out),
               "--batch-size", "4"]
    real = Identifier.iter_identify

    def interrupted_after_two_batches(self, *args, **kwargs):
        for n, batch in enumerate(real(self, *args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield batch

    with monkeypatch.context() as patch:
        patch.setattr(Identifier, "iter_identify", interrupted_after_two_batches)
        assert cli(command) == 130  # before: KeyboardInterrupt's traceback
    err = capsys.readouterr().err
    assert f"interrupted; the rows written so far are kept in {out}" in err and "Traceback" not in err
    assert len(read_predictions_tsv(out)) == 8
    assert cli(command) == 0
    assert [p.query_id for p in read_predictions_tsv(out)] == [r["id"] for r in records["held"]]


def test_ctrl_c_before_any_row_or_during_a_build_says_what_was_kept(dna_model, records, tmp_path, monkeypatch, capsys):
    import clibd.index_build

    build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False)
    queries = write_tsv(tmp_path / "q.tsv", records["held"], ["id", "dna"])

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Identifier, "load", interrupt)  # while the model loads: no file yet
        out = tmp_path / "preds.tsv"
        assert cli(["identify", "--index", str(tmp_path / "refs"), "--records", str(queries), "--out", str(out)]) == 130
        assert f"interrupted; nothing was written to {out} yet" in capsys.readouterr().err and not out.exists()
        patch.setattr(clibd.index_build, "build_index", interrupt)
        table = write_tsv(tmp_path / "refs.tsv", records["many_each"], ["id", *RANKS, "dna"])
        assert cli(["index", "build", "--model", str(dna_model), "--records", str(table), "--out",
                    str(tmp_path / "new")]) == 130
        err = capsys.readouterr().err
        assert f"{tmp_path / 'new'} is as it was; finished shards of embeddings (2048 records each) are kept" in err


def test_identify_out_in_a_missing_folder_or_a_folder_is_named(dna_model, records, tmp_path, capsys):
    build_index(dna_model, records["many_each"][:8], "dna", tmp_path / "refs", progress=False, calibrate=False)
    queries = write_tsv(tmp_path / "q.tsv", records["held"][:2], ["id", "dna"])
    command = ["identify", "--index", str(tmp_path / "refs"), "--records", str(queries), "--out"]
    assert cli([*command, str(tmp_path / "nowhere" / "preds.tsv")]) == 2
    assert f"preds.tsv: its folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err  # not .tmp-
    assert cli([*command, str(tmp_path)]) == 2
    assert f"{tmp_path}: is a folder; give the predictions file's name" in capsys.readouterr().err
    # checked before the index and model load: an index that is not there is not what it reports
    assert cli(["identify", "--index", str(tmp_path / "no-index"), "--dna", "ACGTACGTAC", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_barcode_without_a_single_kmer_is_an_error_row_not_a_novel_species(dna_model, records, tmp_path):
    build_index(dna_model, records["many_each"][:8], "dna", tmp_path / "refs", progress=False, calibrate=False)
    held = records["held"][0]
    queries = [held, {"id": "four_bases", "dna": "ACGT"}, {"id": "n_every_fourth", "dna": "ACGN" * 100}]
    predictions = Identifier.load(tmp_path / "refs", on_bad_input="skip").identify(queries)
    assert not predictions[0].error
    for prediction in predictions[1:]:  # before: a similarity of nothing, answered "novel"
        assert f"barcode '{prediction.query_id}': holds no run of 5 bases without N" in prediction.error
        assert not prediction.novel and not prediction.hits
    with pytest.raises(ValueError, match="'four_bases': holds no run of 5 bases"):
        build_index(dna_model, [*records["many_each"][:4], {**held, "id": "four_bases", "dna": "ACGT"}], "dna",
                    tmp_path / "refs2", progress=False, calibrate=False)
