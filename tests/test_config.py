"""Experiment configs are checked before any data is read: keys, types, the towers' own fields."""

from pathlib import Path

import pytest

from clibd.training import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"preset": "tiny", "modalities": ["dna", "text"]}, "data": {"path": "bold.tsv"}}


def config(**train):
    return ExperimentConfig.from_dict({**BASE, "train": train}, where="run.yaml")


def test_unambiguous_values_are_coerced():
    # YAML reads `1e-3` (no dot) as a string, and a user may quote a number
    train = config(max_lr="1e-3", epochs="2", batch_size=32.0, supcon_weights={"species": 1}).train
    assert train.max_lr == 0.001 and isinstance(train.max_lr, float)
    assert train.epochs == 2 and isinstance(train.epochs, int)
    assert train.batch_size == 32 and isinstance(train.batch_size, int)
    assert train.supcon_weights == {"species": 1.0} and isinstance(train.supcon_weights["species"], float)
    assert config(grad_cache_chunk=None).train.grad_cache_chunk is None


@pytest.mark.parametrize(("train", "message"), [
    ({"batch_size": 32.5}, r"run.yaml: train.batch_size must be an int, got 32.5"),
    ({"epochs": "two"}, r"run.yaml: train.epochs must be an int, got 'two'"),
    ({"lora": "yes"}, r"run.yaml: train.lora must be a bool, got 'yes'"),
    ({"max_lr": [1]}, r"run.yaml: train.max_lr must be a float, got \[1\]"),
    ({"freeze": ["text", 3]}, r"run.yaml: train.freeze\[1\] must be a str, got 3"),
    ({"supcon_weights": {"genus": "half"}}, r"run.yaml: train.supcon_weights.genus must be a float, got 'half'"),
    ({"lora": 1}, r"run.yaml: train.lora must be a bool, got 1"),
])
def test_wrong_types_name_the_key(train, message):
    with pytest.raises(ValueError, match=message):
        config(**train)


def test_data_and_model_sections_are_typed_too():
    with pytest.raises(ValueError, match=r"data.split_seed must be an int, got 'x'"):
        ExperimentConfig.from_dict({**BASE, "data": {"path": "bold.tsv", "split_seed": "x"}})
    with pytest.raises(ValueError, match=r"model.projection_dim must be an int, got 1.5"):
        ExperimentConfig.from_dict({"model": {"projection_dim": 1.5}, "data": {"path": "bold.tsv"}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hiden_size'\] for the clibd_barcodebert DNA tower"):
        ExperimentConfig.from_dict({"model": {"dna": {"hiden_size": 64}}, "data": {"path": "bold.tsv"}})


# The official final configs' `eval_skip_epoch` (bioscanclip/config/model_config/for_bioscan_*/
# final_experiments/*_seed_42.yaml); train_cl.py validates when `epoch > eval_skip_epoch`, epoch
# counted from 0. The LoRA run (small_experiments/test_training_time_of_lora_and_full/lora.yaml)
# sets none: -1.
OFFICIAL_EVAL_SKIP_EPOCH = {"bioscan1m_image_dna.yaml": 23, "bioscan1m_image_dna_text.yaml": 23,
                            "bioscan1m_image_text.yaml": 23, "bioscan5m_image_dna.yaml": 10,
                            "bioscan5m_image_dna_text.yaml": 10, "bioscan1m_lora.yaml": -1}


@pytest.mark.parametrize("name", sorted(OFFICIAL_EVAL_SKIP_EPOCH))
def test_paper_configs_validate_after_the_official_epochs(name, monkeypatch):
    from types import SimpleNamespace

    from clibd.training import steps
    from clibd.training.checkpointing import TrainState

    train = ExperimentConfig.from_yaml(ROOT / "configs" / name).train
    official = [epoch + 1 for epoch in range(train.epochs) if epoch > OFFICIAL_EVAL_SKIP_EPOCH[name]]
    validated = []  # the epochs (from 1) after which the loop validates
    monkeypatch.setattr(steps, "validate", lambda run: validated.append(run.state.epoch))
    monkeypatch.setattr(steps, "save_checkpoint", lambda *args: None)
    run = SimpleNamespace(config=SimpleNamespace(train=train), state=TrainState(), accelerator=None,
                          run_dir=None, scheduler=None)
    for _ in range(train.epochs):
        steps.end_epoch(run)
    assert validated == official


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("bioscan*.yaml")), ids=lambda p: p.name)
def test_paper_configs_pin_the_vit_weights_the_paper_started_from(path):
    """timm ~1.0.9 (the official requirements) resolved `vit_base_patch16_224` to this tag; the
    configs name it, so a later timm with another default cannot change the starting weights."""
    import timm

    from clibd.configuration_clibd import PAPER_VIT, CLIBDImageConfig

    name = ExperimentConfig.from_yaml(path).model_config().image_config.timm_model_name
    assert name == PAPER_VIT == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert CLIBDImageConfig().timm_model_name == PAPER_VIT
    architecture, tag = timm.models.split_model_name_tag(name)
    assert architecture == "vit_base_patch16_224" and tag
    assert timm.models.get_pretrained_cfg(name) is not None  # a tag timm knows, not a typo
