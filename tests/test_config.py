"""Experiment configs are checked before any data is read: keys, types, the towers' own fields."""

import pytest

from clibd.training import ExperimentConfig

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
