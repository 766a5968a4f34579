import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.data import read_records
from clibd.loss import contrastive_loss, supervised_contrastive_loss
from clibd.objectives import (
    PairwiseContrastive,
    SupervisedContrastive,
    create_objective,
    output_embeds,
    split_labels,
)
from clibd.towers.parts import EmbeddingPart, combine_parts
from clibd.training import ExperimentConfig, TrainSection, train
from clibd.training.grad_cache import grad_cache_step

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
KMER_PROFILE = {"model_type": "clibd_kmer_profile", "kmer_size": 3, "hidden_size": 16, "sketch_dim": 8, "aligned": True}
SUPCON_WEIGHTS = {"species": 1.0, "genus": 0.5, "family": 0.25}


def assert_same_gradients(model, reference):
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def uncached_loss(model, batch, objective):
    inputs, labels = split_labels(batch)
    output = model(**inputs)
    loss = objective(output_embeds(output), labels, output.logit_scale)
    loss.backward()
    return loss


def test_factory_builds_each_objective_with_what_it_needs():
    model = CLIBDModel(CLIBDConfig.tiny(modalities=["dna"], dna_config=KMER_PROFILE))
    pairwise = create_objective(TrainSection(), model)
    assert isinstance(pairwise, PairwiseContrastive)
    assert pairwise.label_ranks == () and pairwise.trains_temperature
    supcon = create_objective(TrainSection(objective="supcon", supcon_weights={"species": 1.0, "order": 0.1},
                                           supcon_temperature=0.2), model)
    assert isinstance(supcon, SupervisedContrastive)
    assert supcon.label_ranks == ("species", "order") and not supcon.trains_temperature
    assert supcon.temperature == 0.2 and list(supcon.parts) == model.embedding_parts("dna")
    with pytest.raises(ValueError, match="unknown objective"):
        create_objective(TrainSection(objective="triplet"), model)
    inputs, labels = split_labels({"dna_profile": torch.ones(2, 3), "labels_species": torch.tensor([4, 5])})
    assert list(inputs) == ["dna_profile"] and torch.equal(labels["species"], torch.tensor([4, 5]))


def test_pairwise_objective_is_the_clip_loss():
    torch.manual_seed(0)
    embeds = {m: F.normalize(torch.randn(6, 8), dim=-1) for m in ("dna", "text")}
    scale = torch.tensor(2.0)
    assert torch.equal(PairwiseContrastive()(embeds, {}, scale), contrastive_loss(embeds, scale))


def test_supervised_contrastive_sums_trained_parts_and_ranks_and_skips_untrained():
    torch.manual_seed(0)
    parts = (EmbeddingPart("learned", 4), EmbeddingPart("sketch", 3, weight=0.5, trained=False),
             EmbeddingPart("other", 2))
    units = [F.normalize(torch.randn(8, part.dim), dim=-1) for part in parts]
    labels = {"species": torch.tensor([0, 0, 1, 1, 2, 2, 3, -1]), "genus": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])}
    objective = SupervisedContrastive({"species": 1.0, "genus": 0.5}, 0.1, parts)
    expected = sum(w * supervised_contrastive_loss(units[i], labels[r], 0.1)
                   for i in (0, 2) for r, w in (("species", 1.0), ("genus", 0.5)))
    loss = objective({"dna": combine_parts(units, parts)}, labels, torch.tensor(0.0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    units[1] = F.normalize(torch.randn(8, 3), dim=-1)  # another sketch: the loss does not see it
    moved = objective({"dna": combine_parts(units, parts)}, labels, torch.tensor(0.0))
    assert moved.item() == pytest.approx(loss.item(), rel=1e-5)


def test_gradient_caching_equals_full_batch_for_the_pairwise_loss(tiny_processor):
    config = CLIBDConfig.tiny(dna_config={"pooling": "mean", "tokenizer_flavour": "barcodebert", **NO_DROPOUT},
                              text_config=NO_DROPOUT)
    torch.manual_seed(0)
    model = CLIBDModel(config)
    reference = copy.deepcopy(model)
    bases = "ACGT"
    barcodes = ["".join(bases[(i * 7 + j * j) % 4] for j in range(200 + 13 * i)) for i in range(12)]
    images = [torch.rand(3, 40, 40) for _ in range(12)]
    from torchvision.transforms.functional import to_pil_image

    processor = type(tiny_processor).from_model_config(config, tiny_processor.text_tokenizer)
    batch = dict(processor(images=[to_pil_image(i) for i in images], barcodes=barcodes,
                           taxonomy=[{"order": f"O{i % 3}", "family": f"F{i}"} for i in range(12)]))
    objective = PairwiseContrastive()
    loss_reference = uncached_loss(reference, batch, objective)
    assert loss_reference.item() == pytest.approx(model(**batch, return_loss=True).loss.item(), rel=1e-6)
    loss = grad_cache_step(model, batch, objective, chunk_size=5)
    assert loss.item() == pytest.approx(loss_reference.item(), rel=1e-5)
    assert model.logit_scale.grad is not None
    assert_same_gradients(model, reference)


def test_gradient_caching_equals_full_batch_for_supervised_contrastive(data_dir):
    config = CLIBDConfig.tiny(modalities=["dna"], dna_config=KMER_PROFILE)
    torch.manual_seed(0)
    model = CLIBDModel(config)
    reference = copy.deepcopy(model)
    records = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv", limit=400)[::33]
    batch = dict(CLIBDProcessor.from_model_config(config, None)(barcodes=[r["dna"] for r in records]))
    size = len(records)
    batch["labels_species"] = torch.arange(size) // 2
    batch["labels_genus"] = torch.arange(size) // 4
    batch["labels_family"] = torch.where(torch.arange(size) < 3, -1, torch.arange(size) // 6)
    objective = create_objective(TrainSection(objective="supcon", supcon_weights=SUPCON_WEIGHTS), model)
    loss_reference = uncached_loss(reference, batch, objective)
    loss = grad_cache_step(model, batch, objective, chunk_size=5)
    assert loss.item() == pytest.approx(loss_reference.item(), rel=1e-5)
    assert model.logit_scale.grad is None  # the temperature is fixed
    assert model.dna_encoder.positional.log_weight.grad is not None  # every trained part has its loss
    assert_same_gradients(model, reference)


@pytest.mark.slow
def test_supcon_training_with_gradient_caching_matches_without(data_dir, tmp_path):
    """The loop hands labels and the objective to gradient caching: same weights after an epoch."""
    def experiment(name, **train_overrides):
        return ExperimentConfig.from_dict({
            "model": {"preset": "tiny", "modalities": ["dna"], "dna": KMER_PROFILE},
            "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 600},
            "train": {"output_dir": str(tmp_path / name), "objective": "supcon", "supcon_weights": SUPCON_WEIGHTS,
                      "epochs": 1, "batch_size": 64, "max_lr": 2e-3, "checkpoint_every": 1000,
                      "eval_from_epoch": 99, "log_every": 1, **train_overrides}})

    train(experiment("plain"), progress=False)
    train(experiment("cached", grad_cache_chunk=24), progress=False)
    plain = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    cached = load_file(tmp_path / "cached" / "final" / "model.safetensors")
    assert plain.keys() == cached.keys()
    for key in plain:
        assert torch.allclose(plain[key], cached[key], atol=1e-5), key
    initial = CLIBDModel(CLIBDConfig.tiny(modalities=["dna"], dna_config=KMER_PROFILE)).logit_scale.detach()
    assert torch.equal(plain["logit_scale"], initial)  # supcon: the loop froze the temperature
