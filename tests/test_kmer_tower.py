"""The k-mer-profile DNA tower and the supervised contrastive objective (configs/bold_dna.yaml)."""

import csv
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.loss import supervised_contrastive_loss
from clibd.processing import kmer_profiles
from clibd.training import ExperimentConfig, train


def test_kmer_profiles_count_overlapping_kmers():
    profile = kmer_profiles(["acgtaNacgt-a"], k=3)[0]  # lower case, a gap, an N
    index = {"".join(p): i for i, p in enumerate(itertools.product("ACGT", repeat=3))}
    counts = torch.zeros(64)
    for kmer in ("ACG", "CGT", "GTA", "ACG", "CGT", "GTA"):  # "TAN", "ANA", "NAC" skipped
        counts[index[kmer]] += 1
    assert torch.allclose(profile, counts / counts.norm())
    with pytest.raises(ValueError, match="barcode 'q7'"):
        kmer_profiles(["ACGT", "AC1T"], k=3, ids=["q6", "q7"])


def test_profile_tower_model_processor_round_trip(tmp_path):
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config={"encoder": "kmer_profile", "profile_kmer_size": 3,
                                                              "profile_hidden_size": 16})
    model = CLIBDModel(config).eval()
    processor = CLIBDProcessor.from_model_config(config)
    batch = processor(barcodes=["ACGTTGCAAGT" * 80, "TTGACCA" * 20])
    assert set(batch) == {"dna_profile"} and batch["dna_profile"].shape == (2, 64)  # whole barcode, no 660 limit
    features = model.get_dna_features(**batch)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = CLIBDModel.from_pretrained(tmp_path).eval(), CLIBDProcessor.from_pretrained(tmp_path)
    assert torch.equal(reloaded.get_dna_features(**reprocessor(barcodes=["ACGTTGCAAGT" * 80, "TTGACCA" * 20])),
                       features)
    with pytest.raises(ValueError, match="reads k-mer profiles"):
        model.get_dna_features(dna_input_ids=torch.zeros(1, 133, dtype=torch.long))


def test_profile_sketch_mixes_learned_and_raw_profile_cosines(tmp_path):
    dna = {"encoder": "kmer_profile", "profile_kmer_size": 4, "profile_hidden_size": 16,
           "profile_sketch_dim": 4096, "profile_sketch_weight": 0.5}
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config=dna)
    model = CLIBDModel(config).eval()
    processor = CLIBDProcessor.from_model_config(config)
    barcodes = ["ACGTTGCAAGTCCA" * 40, "ACGTTGCAAGTCCT" * 40, "TTGACCAGGA" * 50]
    batch = processor(barcodes=barcodes)
    with torch.no_grad():
        retrieval = model.get_dna_features(**batch)
        learned = model.get_dna_features(**batch, with_sketch=False)
        trained_on = model(**batch).dna_embeds
    assert retrieval.shape == (3, 32 + 4096) and learned.shape == (3, 32)
    assert model.embedding_dim("dna") == 32 + 4096 and model.embedding_dim("image") == 32
    assert torch.allclose(retrieval.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(trained_on, learned)  # the losses see the learned part only
    # retrieval cosine = (learned cosine + 0.5 x sketch cosine) / 1.5, the sketch ~ raw profile cosine
    raw = kmer_profiles(barcodes, 4) @ kmer_profiles(barcodes, 4).T
    sketch_cosine = (1.5 * retrieval @ retrieval.T - learned @ learned.T) / 0.5
    assert torch.allclose(sketch_cosine, raw, atol=0.05)
    model.save_pretrained(tmp_path)  # the sketch is a saved buffer: same embeddings after reload
    assert torch.equal(CLIBDModel.from_pretrained(tmp_path).eval().get_dna_features(**batch), retrieval)
    with pytest.raises(ValueError, match="only for DNA-only models"):
        CLIBDConfig.tiny(modalities=["dna", "text"], dna_config=dna)
    with pytest.raises(ValueError, match="needs encoder: kmer_profile"):
        CLIBDConfig.tiny(modalities=["dna"], dna_config={"profile_sketch_dim": 8})


def test_supervised_contrastive_loss_by_hand():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    t = 0.5
    sims = z @ z.T / t
    # anchors 0 and 1 have one positive each (each other); anchor 2 has none and adds 0
    log_p01 = sims[0, 1] - torch.logsumexp(torch.stack([sims[0, 1], sims[0, 2]]), 0)
    log_p10 = sims[1, 0] - torch.logsumexp(torch.stack([sims[1, 0], sims[1, 2]]), 0)
    expected = -(log_p01 + log_p10) / 3
    assert supervised_contrastive_loss(z, labels, t).item() == pytest.approx(expected.item(), rel=1e-6)
    unknown = supervised_contrastive_loss(z, torch.tensor([-1, -1, 5]), t)
    assert unknown.item() == 0.0  # unknown labels are never positives


def test_supcon_training_run_and_config_checks(data_dir, tmp_path):
    experiment = {
        "model": {"preset": "tiny", "modalities": ["dna"],
                  "dna": {"encoder": "kmer_profile", "profile_kmer_size": 4, "profile_hidden_size": 64}},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 1500},
        "train": {"output_dir": str(tmp_path / "run"), "objective": "supcon", "epochs": 4, "batch_size": 128,
                  "max_lr": 2e-3, "checkpoint_every": 1000, "eval_from_epoch": 4, "log_every": 1},
    }
    result = train(ExperimentConfig.from_dict(experiment), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert result.test_metrics["dna"]["dna"]["unseen"]["genus"]["micro_top1"] > 0.5
    assert not math.isinf(result.best_score)
    with pytest.raises(ValueError, match="needs two or three modalities"):
        ExperimentConfig.from_dict({**experiment, "train": {"objective": "clip"}})
    with pytest.raises(ValueError, match="add dna"):
        ExperimentConfig.from_dict({**experiment, "model": {"modalities": ["image", "text"]},
                                    "train": {"objective": "supcon"}})


def test_aligned_branches_widen_the_embedding_and_train_one_loss_each(data_dir, tmp_path):
    from clibd.data import read_records
    from clibd.processing import INSECT_COI5P_CONSENSUS, aligned_onehot

    dna = {"encoder": "kmer_profile", "profile_kmer_size": 3, "profile_hidden_size": 16,
           "profile_sketch_dim": 64, "profile_aligned": True}
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config=dna)
    model = CLIBDModel(config).eval()
    processor = CLIBDProcessor.from_model_config(config)
    records = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv")[:4]
    barcodes = [r["dna"] for r in records]
    batch = processor(barcodes=barcodes)
    assert set(batch) == {"dna_profile", "dna_aligned"} and batch["dna_aligned"].shape == (4, 4 * 658)
    assert torch.equal(batch["dna_aligned"], aligned_onehot(barcodes).flatten(1))
    again = processor(barcodes=barcodes[::-1] + [barcodes[0]])["dna_aligned"]  # placed once, remembered
    assert torch.equal(again, aligned_onehot(barcodes[::-1] + [barcodes[0]]).flatten(1))
    with torch.no_grad():
        retrieval, trained_on = model.get_dna_features(**batch), model(**batch).dna_embeds
    assert retrieval.shape == (4, model.embedding_dim("dna")) == (4, 32 + 64 + 32 + 4 * 658)
    assert torch.allclose(retrieval.norm(dim=-1), torch.ones(4), atol=1e-5)
    kmer, aligned, positional = model.split_dna_embeds(trained_on)
    assert [b.shape[1] for b in (kmer, aligned, positional)] == [32, 32, 4 * 658]
    assert all(torch.allclose(b.norm(dim=-1), torch.ones(4), atol=1e-5) for b in (kmer, aligned, positional))
    # an untrained positional branch is the plain cosine of the aligned one-hot
    onehot = F.normalize(batch["dna_aligned"], dim=-1)
    assert torch.allclose(positional @ positional.T, onehot @ onehot.T, atol=1e-5)
    # the consensus sits on its own positions; a barcode is nearest to itself
    consensus = processor(barcodes=[INSECT_COI5P_CONSENSUS])["dna_aligned"].view(658, 4)
    assert consensus.sum() == 658 and (consensus.argmax(dim=1) == torch.tensor(["ACGT".index(b) for b in
                                                                                    INSECT_COI5P_CONSENSUS])).all()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = CLIBDModel.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.get_dna_features(**CLIBDProcessor.from_pretrained(tmp_path)(barcodes=barcodes)),
                       retrieval)
    with pytest.raises(ValueError, match="pass dna_aligned"):
        model.get_dna_features(dna_profile=batch["dna_profile"])
    with pytest.raises(ValueError, match="only for DNA-only models"):
        CLIBDConfig.tiny(modalities=["dna", "text"], dna_config=dna)
    with pytest.raises(ValueError, match="profile_aligned needs encoder: kmer_profile"):
        CLIBDConfig.tiny(modalities=["dna"], dna_config={"profile_aligned": True})

    experiment = {
        "model": {"preset": "tiny", "modalities": ["dna"], "dna": {**dna, "profile_kmer_size": 4,
                                                                    "profile_hidden_size": 64}},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 1500},
        "train": {"output_dir": str(tmp_path / "run"), "objective": "supcon", "epochs": 3, "batch_size": 128,
                  "max_lr": 2e-3, "checkpoint_every": 1000, "eval_from_epoch": 3, "log_every": 1},
    }
    result = train(ExperimentConfig.from_dict(experiment), progress=False)
    trained = CLIBDModel.from_pretrained(tmp_path / "run" / "final")
    assert not torch.equal(trained.dna_encoder.positional.log_weight, torch.zeros(658))  # every branch learns
    assert not torch.equal(trained.dna_encoder.positional.base_map, torch.eye(4).repeat(3, 1, 1))
    assert result.test_metrics["dna"]["dna"]["unseen"]["genus"]["micro_top1"] > 0.5


def test_aligned_model_scores_novelty_on_the_kmer_parts(data_dir, tmp_path):
    """An index of a profile_aligned model judges novelty on the k-mer parts alone: identify's
    novelty_similarity is the best cosine of those parts, re-normalised; similarity is the whole."""
    from clibd.data import read_records
    from clibd.identify import identify
    from clibd.index import build_index
    from clibd.novelty import novelty_part

    dna = {"encoder": "kmer_profile", "profile_kmer_size": 3, "profile_hidden_size": 16,
           "profile_sketch_dim": 64, "profile_aligned": True}
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config=dna)
    model = CLIBDModel(config).eval()
    assert model.novelty_dim("dna") == 32 + 64 < model.embedding_dim("dna")
    assert CLIBDModel(CLIBDConfig.tiny(modalities=["dna"], dna_config={**dna, "profile_aligned": False})
                      ).novelty_dim("dna") == 32 + 64
    model.save_pretrained(tmp_path / "model")
    processor = CLIBDProcessor.from_model_config(config)
    processor.save_pretrained(tmp_path / "model")
    records = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv")[:60]
    keys, queries = records[:50], records[50:]
    index = build_index(tmp_path / "model", keys, "dna", tmp_path / "refs", progress=False)
    assert index.novelty_dim == 96 and json.loads((tmp_path / "refs" / "index.json").read_text())["novelty_dim"] == 96
    identify(tmp_path / "refs", queries, tmp_path / "preds.tsv", top_k=3, progress=False)
    with open(tmp_path / "preds.tsv") as f:
        rows = list(csv.DictReader((line for line in f if not line.startswith("# ")), delimiter="\t"))
    with torch.no_grad():
        embed = lambda rs: model.get_dna_features(**processor(barcodes=[r["dna"] for r in rs]))  # noqa: E731
        query_embeds, key_embeds = embed(queries), embed(keys)
    whole = (query_embeds @ key_embeds.T).max(dim=1).values
    novelty = (novelty_part(query_embeds, 96) @ novelty_part(key_embeds, 96).T).max(dim=1).values
    got_whole = torch.tensor([float(r["similarity"]) for r in rows])
    got_novelty = torch.tensor([float(r["novelty_similarity"]) for r in rows])
    assert torch.allclose(got_whole, whole, atol=2e-3) and torch.allclose(got_novelty, novelty, atol=2e-3)
    assert not torch.allclose(got_whole, got_novelty, atol=1e-2)
    species = index.thresholds["species"]
    assert all((r["novel"] == "true") == (float(r["novelty_similarity"]) < species) for r in rows)
