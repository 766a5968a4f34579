"""DNA towers as registered kinds: the k-mer-profile tower (configs/bold_dna.yaml) with its parts,
the registry and factory, models saved before the towers were separate kinds, and the
supervised contrastive objective that trains each part."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor, register_dna_tower
from clibd.loss import supervised_contrastive_loss
from clibd.processing import kmer_profiles
from clibd.towers import CLIBDKmerProfileConfig, upgrade_legacy_dna_config
from clibd.towers.parts import EmbeddingPart, select_parts, split_parts
from clibd.training import ExperimentConfig, train

LEGACY = __import__("pathlib").Path(__file__).parent / "fixtures" / "legacy_19b8be4"
PROFILE = {"model_type": "clibd_kmer_profile"}


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
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config={**PROFILE, "kmer_size": 3, "hidden_size": 16})
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
    dna = {**PROFILE, "kmer_size": 4, "hidden_size": 16, "sketch_dim": 4096, "sketch_weight": 0.5}
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config=dna)
    model = CLIBDModel(config).eval()
    processor = CLIBDProcessor.from_model_config(config)
    barcodes = ["ACGTTGCAAGTCCA" * 40, "ACGTTGCAAGTCCT" * 40, "TTGACCAGGA" * 50]
    batch = processor(barcodes=barcodes)
    with torch.no_grad():
        retrieval = model.get_dna_features(**batch)
        assert torch.equal(model(**batch).dna_embeds, retrieval)  # forward returns the same embedding
    parts = model.embedding_parts("dna")
    assert parts == [EmbeddingPart("kmer_mlp", 32), EmbeddingPart("kmer_sketch", 4096, 0.5, trained=False)]
    learned, _ = split_parts(retrieval, parts)
    assert retrieval.shape == (3, 32 + 4096) and learned.shape == (3, 32)
    assert model.embedding_dim("dna") == 32 + 4096 and model.embedding_dim("image") == 32
    assert torch.allclose(retrieval.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():  # the learned part is the k-mer MLP's unit output
        tower = model.dna_encoder
        assert torch.allclose(learned, F.normalize(tower.projection(tower.mlp(batch["dna_profile"])), dim=-1),
                              atol=1e-6)
    # retrieval cosine = (learned cosine + 0.5 x sketch cosine) / 1.5, the sketch ~ raw profile cosine
    raw = kmer_profiles(barcodes, 4) @ kmer_profiles(barcodes, 4).T
    sketch_cosine = (1.5 * retrieval @ retrieval.T - learned @ learned.T) / 0.5
    assert torch.allclose(sketch_cosine, raw, atol=0.05)
    model.save_pretrained(tmp_path)  # the sketch is a saved buffer: same embeddings after reload
    assert torch.equal(CLIBDModel.from_pretrained(tmp_path).eval().get_dna_features(**batch), retrieval)
    with pytest.raises(ValueError, match="only for DNA-only models"):
        CLIBDConfig.tiny(modalities=["dna", "text"], dna_config=dna)


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


@pytest.mark.slow
def test_supcon_training_run_and_config_checks(data_dir, tmp_path):
    experiment = {
        "model": {"preset": "tiny", "modalities": ["dna"],
                  "dna": {**PROFILE, "kmer_size": 4, "hidden_size": 64}},
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


@pytest.mark.slow
def test_aligned_branches_widen_the_embedding_and_train_one_loss_each(data_dir, tmp_path):
    from clibd.data import read_records
    from clibd.processing import INSECT_COI5P_CONSENSUS, aligned_onehot

    dna = {**PROFILE, "kmer_size": 3, "hidden_size": 16, "sketch_dim": 64, "aligned": True}
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
        retrieval = model.get_dna_features(**batch)
    assert retrieval.shape == (4, model.embedding_dim("dna")) == (4, 32 + 64 + 32 + 4 * 658)
    assert torch.allclose(retrieval.norm(dim=-1), torch.ones(4), atol=1e-5)
    parts = model.embedding_parts("dna")
    assert [(p.name, p.trained, p.scores_novelty) for p in parts] == [
        ("kmer_mlp", True, True), ("kmer_sketch", False, True), ("aligned_mlp", True, False),
        ("positional", True, False)]
    kmer, _, aligned, positional = split_parts(retrieval, parts)
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

    experiment = {
        "model": {"preset": "tiny", "modalities": ["dna"], "dna": {**dna, "kmer_size": 4, "hidden_size": 64}},
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
    """An index of an aligned model judges novelty on the parts that score it (the k-mer parts):
    identify's novelty_similarity is their best cosine; similarity is that of the whole embedding."""
    from clibd.data import read_records
    from clibd.identify import Identifier
    from clibd.index import build_index

    dna = {**PROFILE, "kmer_size": 3, "hidden_size": 16, "sketch_dim": 64, "aligned": True}
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config=dna)
    model = CLIBDModel(config).eval()
    model.save_pretrained(tmp_path / "model")
    processor = CLIBDProcessor.from_model_config(config)
    processor.save_pretrained(tmp_path / "model")
    records = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv")[:60]
    keys, queries = records[:50], records[50:]
    # no species check: the embedding alone decides novelty (with one, alignment settles most queries)
    index = build_index(tmp_path / "model", keys, "dna", tmp_path / "refs", progress=False, species_check=False)
    saved = json.loads((tmp_path / "refs" / "index.json").read_text())["parts"]
    assert [EmbeddingPart.from_dict(p) for p in saved] == model.embedding_parts("dna")
    predictions = Identifier.load(tmp_path / "refs").identify(queries, top_k=3)
    with torch.no_grad():
        embed = lambda rs: model.get_dna_features(**processor(barcodes=[r["dna"] for r in rs]))  # noqa: E731
        query_embeds, key_embeds = embed(queries), embed(keys)
    parts = model.embedding_parts("dna")
    whole = (query_embeds @ key_embeds.T).max(dim=1).values
    novelty = (select_parts(query_embeds, parts, "scores_novelty")
               @ select_parts(key_embeds, parts, "scores_novelty").T).max(dim=1).values
    got_whole = torch.tensor([p.similarity for p in predictions])
    got_novelty = torch.tensor([p.novelty_similarity for p in predictions])
    assert torch.allclose(got_whole, whole, atol=2e-3) and torch.allclose(got_novelty, novelty, atol=2e-3)
    assert not torch.allclose(got_whole, got_novelty, atol=1e-2)
    species = index.thresholds["species"]
    assert all(p.novel == (p.novelty_similarity < species) for p in predictions)


def test_models_saved_before_the_tower_registry_load_unchanged():
    """Models saved by commit 19b8be4 (`encoder` switch, `profile_*` fields) load as today's kinds
    and embed bit for bit as they did then."""
    expected = load_file(LEGACY / "expected_embeddings.safetensors")
    barcodes = json.loads((LEGACY / "barcodes.json").read_text())
    for name, kind in (("kmer_profile_aligned", "clibd_kmer_profile"), ("barcodebert", "clibd_barcodebert")):
        model = CLIBDModel.from_pretrained(LEGACY / name).eval()
        processor = CLIBDProcessor.from_pretrained(LEGACY / name)
        assert model.config.dna_config.model_type == kind
        with torch.no_grad():
            assert torch.equal(model.get_dna_features(**processor(barcodes=barcodes)), expected[name])
    legacy = json.loads((LEGACY / "kmer_profile_aligned" / "config.json").read_text())["dna_config"]
    assert legacy["encoder"] == "kmer_profile" and legacy["model_type"] == "clibd_dna_model"
    upgraded = upgrade_legacy_dna_config(legacy)
    assert upgraded == {"model_type": "clibd_kmer_profile", "kmer_size": 3, "hidden_size": 8, "sketch_dim": 16,
                        "sketch_weight": 1.0, "aligned": True}


class LinearProfileConfig(CLIBDKmerProfileConfig):
    model_type = "clibd_test_linear_profile"


class LinearProfileTower(nn.Module):
    """A linear map of k-mer frequencies: a real (if weak) DNA tower of another kind. Defined once
    per process, so registering it again (a rerun of the test) is the same registration."""

    def __init__(self, config, projection_dim):
        super().__init__()
        self.projection = nn.Linear(4**config.kmer_size, projection_dim)

    def forward(self, dna_profile=None, **other_inputs):
        return F.normalize(self.projection(dna_profile), dim=-1)

    def embedding_parts(self):
        return [EmbeddingPart("linear_profile", self.projection.out_features)]

    def encoder_modules(self):
        return []


def test_dna_tower_kinds_are_chosen_by_model_type_and_registered(tmp_path):
    with pytest.raises(ValueError, match="clibd_no_such_tower"):
        CLIBDConfig.tiny(modalities=["dna"], dna_config={"model_type": "clibd_no_such_tower"})
    with pytest.raises(ValueError, match="encoder must be 'bert' or 'kmer_profile'"):
        CLIBDConfig.tiny(modalities=["dna"], dna_config={"encoder": "lstm"})
    # an experiment config names the tower kind's own fields; a typo is an error naming the kind
    experiment = {"model": {"modalities": ["dna"], "dna": {**PROFILE, "kmer_sise": 7}}, "data": {"path": "x.tsv"},
                  "train": {"objective": "supcon"}}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kmer_sise'\] for the clibd_kmer_profile DNA tower"):
        ExperimentConfig.from_dict(experiment)
    experiment["model"]["dna"] = {"pooling": "mean", "sketch_dim": 8}  # BarcodeBERT has no sketch
    with pytest.raises(ValueError, match=r"\['sketch_dim'\] for the clibd_barcodebert DNA tower"):
        ExperimentConfig.from_dict(experiment)

    register_dna_tower(LinearProfileConfig, LinearProfileTower)
    with pytest.raises(ValueError, match="already registered to CLIBDBarcodeBERTTower"):
        register_dna_tower(type("Other", (LinearProfileConfig,), {"model_type": "clibd_barcodebert"}), LinearProfileTower)
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config={"model_type": "clibd_test_linear_profile", "kmer_size": 2})
    model = CLIBDModel(config).eval()
    assert isinstance(model.dna_encoder, LinearProfileTower) and model.embedding_dim("dna") == 32
    batch = CLIBDProcessor.from_model_config(config)(barcodes=["ACGTTGCA" * 20, "TTGACCA" * 20])
    model.save_pretrained(tmp_path)
    reloaded = CLIBDModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded.get_dna_features(**batch), model.get_dna_features(**batch))
