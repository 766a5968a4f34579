"""Attention rollout of the image tower (paper Fig. 5 / 10) and `clibd plot attention`."""

import pytest
import timm
import torch

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.attention import attention_maps, attention_rollout, class_token_maps, rollout
from clibd.cli import main

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=8)


def tiny_vit(seed: int) -> torch.nn.Module:
    """timm's initialisation (std 0.02) attends almost uniformly: wider q, k weights make it look somewhere."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **TINY_VIT).eval()
    for block in vit.blocks:
        torch.nn.init.normal_(block.attn.qkv.weight, std=0.5)
    return vit


def stochastic(*shape: int) -> torch.Tensor:
    return torch.rand(*shape).softmax(dim=-1)


def test_rollout_is_the_residual_head_mean_product_of_abnar_and_zuidema():
    torch.manual_seed(0)
    first, second = stochastic(1, 2, 5, 5), stochastic(1, 2, 5, 5)

    def step(attention):
        a = 0.5 * attention.mean(dim=1) + 0.5 * torch.eye(5)
        return a / a.sum(dim=-1, keepdim=True)

    assert torch.allclose(rollout([first]), step(first))
    assert torch.allclose(rollout([first, second]), step(second) @ step(first))  # last block on the left


def test_rollout_rows_sum_to_one_and_the_map_is_the_patch_grid():
    vit, pixels = tiny_vit(0), torch.rand(3, 3, 32, 32)
    captured = attention_maps(vit, pixels)
    assert len(captured) == 2 and captured[0].shape == (3, 2, 17, 17)  # 2 blocks, 2 heads, 1 + 4 x 4 tokens
    assert torch.allclose(captured[0].sum(dim=-1), torch.ones(3, 2, 17), atol=1e-5)
    joint = attention_rollout(vit, pixels)
    assert joint.shape == (3, 17, 17)
    assert torch.allclose(joint.sum(dim=-1), torch.ones(3, 17), atol=1e-5)
    maps = class_token_maps(vit, pixels)
    assert maps.shape == (3, 4, 4) and torch.allclose(maps.sum(dim=(1, 2)), torch.ones(3), atol=1e-5)
    # the hooks and the explicit attention are gone afterwards: the model computes what it did
    assert all(block.attn.fused_attn == timm.layers.use_fused_attn() for block in vit.blocks)
    assert not any(block.attn.attn_drop._forward_hooks for block in vit.blocks)


def test_the_captured_attention_is_the_blocks_own():
    """The first block's probabilities, recomputed by hand from its input."""
    vit, pixels = tiny_vit(0), torch.rand(2, 3, 32, 32)
    inputs = []
    vit.blocks[0].attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    captured = attention_maps(vit, pixels)[0]
    attn, x = vit.blocks[0].attn, inputs[0]
    q, k, _ = attn.qkv(x).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
    assert torch.allclose(captured, expected, atol=1e-5)


def test_the_map_differs_when_the_weights_differ():
    pixels = torch.rand(1, 3, 32, 32)
    a, b = class_token_maps(tiny_vit(0), pixels), class_token_maps(tiny_vit(1), pixels)
    assert (a - b).abs().max() > 0.01 and a.std() > 0.01  # not uniform, and not the same
    assert torch.allclose(a, class_token_maps(tiny_vit(0), pixels))
    last_only = class_token_maps(tiny_vit(0), pixels, (2, 2))
    assert not torch.allclose(a, last_only) and torch.allclose(a, class_token_maps(tiny_vit(0), pixels, (1, 2)))


def saved_model(folder, seed: int) -> None:
    torch.manual_seed(seed)
    config = CLIBDConfig.tiny(modalities=["image", "dna"])
    CLIBDModel(config).save_pretrained(folder)
    CLIBDProcessor.from_model_config(config, None).save_pretrained(folder)


def test_cli_plots_a_model_beside_its_unaligned_towers(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # timm's weights: the cache only
    photo = data_dir / "bioscan1m_examples" / "images" / "order_Coleoptera.jpg"
    saved_model(tmp_path / "aligned", 0)
    saved_model(tmp_path / "before", 1)
    out = tmp_path / "attention.png"
    assert main(["plot", "attention", "--model", str(tmp_path / "aligned"), "--image", str(photo),
                 "--unaligned", str(tmp_path / "before"), "--blocks", "1-2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no folder given and no timm weights to load here (offline; and the tiny ViT has none): the model
    # alone, and a message saying why and what to pass
    alone = tmp_path / "alone.png"
    assert main(["plot", "attention", "--model", str(tmp_path / "aligned"), "--image", str(photo),
                 "--blocks", "all", "--out", str(alone)]) == 0
    assert alone.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and alone.stat().st_size < out.stat().st_size
    assert "pass --unaligned MODEL_FOLDER" in capsys.readouterr().err
    assert main(["plot", "attention", "--model", str(tmp_path / "aligned"), "--image", str(photo),
                 "--unaligned", str(tmp_path / "nowhere"), "--out", str(alone)]) == 2
    assert "not a saved clibd model folder" in capsys.readouterr().err
    assert main(["plot", "attention", "--model", str(tmp_path / "aligned"), "--image", str(photo),
                 "--out", str(alone)]) == 2  # the paper's blocks 2-6: the tiny tower has two
    assert "blocks 2-6: this image tower has blocks 1-2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", "attention", "--model", str(tmp_path / "aligned"), "--image", str(photo)])  # --out required
