"""LoRA adapters as the official CLIBD LoRA run has them: rank r, no scaling (alpha = r), no dropout,
A Kaiming-uniform and B zero (the adapted model starts as the plain one), on the query and value
projections of every attention layer of every tower, and nothing on the keys.

- BERT towers (DNA, text): peft's LoRA on the separate `query` and `value` Linear layers.
- timm's ViT fuses q, k and v into one `qkv` Linear. peft can only adapt a Linear as a whole (one
  adapter over all 3 x dim output rows, k included), so `FusedQKVLoRA` wraps that Linear and adds
  two low-rank deltas, one to the q rows and one to the v rows, as the official `_LoRA_qkv_timm`.

`CLIBDModel.add_lora` puts the adapters in and records the rank in the model config, so a saved
LoRA model loads back with its adapters; `clibd.training.trainable` decides what trains.

Usage:
    model.add_lora(4)                                   # every tower; config.lora_rank = 4
    qkv = FusedQKVLoRA(nn.Linear(768, 3 * 768), rank=4)
"""

from __future__ import annotations

import math

import torch
from torch import nn

BERT_TARGETS = ("query", "value")  # the separate attention projections adapted in BERT towers
LORA_MARK = "lora_"  # in the name of every adapter parameter, peft's and FusedQKVLoRA's


class FusedQKVLoRA(nn.Module):
    """A fused `qkv` Linear (output rows q | k | v, a third each) plus rank-r deltas on the q
    rows (`lora_q_B @ lora_q_A`) and the v rows (`lora_v_B @ lora_v_A`); the k rows are the base
    layer's. The base layer is kept as `base_layer` (peft's name for it).

    Usage:
        blocks[i].attn.qkv = FusedQKVLoRA(blocks[i].attn.qkv, rank=4)
    """

    def __init__(self, base_layer: nn.Linear, rank: int):
        super().__init__()
        if base_layer.out_features % 3:
            raise ValueError(f"a fused qkv Linear has 3 equal output blocks, got {base_layer.out_features} rows")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        dim, width = base_layer.in_features, base_layer.out_features // 3
        self.base_layer = base_layer
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_q_A = nn.Linear(dim, rank, bias=False, **factory)
        self.lora_q_B = nn.Linear(rank, width, bias=False, **factory)
        self.lora_v_A = nn.Linear(dim, rank, bias=False, **factory)
        self.lora_v_B = nn.Linear(rank, width, bias=False, **factory)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        """The input width of the wrapped qkv Linear.

        Usage:
            FusedQKVLoRA(nn.Linear(768, 3 * 768), rank=4).in_features   # 768
        """
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        """The output width of the wrapped qkv Linear (q, k and v rows together).

        Usage:
            FusedQKVLoRA(nn.Linear(768, 3 * 768), rank=4).out_features   # 2304
        """
        return self.base_layer.out_features

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default (Kaiming uniform, a = sqrt 5), B zero: the delta starts at zero.

        Usage:
            qkv.reset_lora_parameters()   # back to the base layer's output
        """
        for a, b in ((self.lora_q_A, self.lora_q_B), (self.lora_v_A, self.lora_v_B)):
            if a.weight.device.type != "meta":
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """q | k | v of the base layer on `x`, with the low-rank deltas added to q and v.

        Usage:
            qkv(torch.randn(2, 197, 768))   # [2, 197, 2304] for qkv = FusedQKVLoRA(nn.Linear(768, 2304), 4)
        """
        q, k, v = self.base_layer(x).chunk(3, dim=-1)
        q = q + self.lora_q_B(self.lora_q_A(x))
        v = v + self.lora_v_B(self.lora_v_A(x))
        return torch.cat([q, k, v], dim=-1)

    def merged_weight(self) -> torch.Tensor:
        """The plain qkv weight this layer computes (the deltas folded into the q and v rows).

        Usage:
            plain = nn.Linear(768, 3 * 768); plain.weight.data = qkv.merged_weight()
        """
        q, k, v = self.base_layer.weight.chunk(3, dim=0)
        return torch.cat([q + self.lora_q_B.weight @ self.lora_q_A.weight, k,
                          v + self.lora_v_B.weight @ self.lora_v_A.weight], dim=0)


def add_vit_lora(vit: nn.Module, rank: int) -> int:
    """Wrap every timm attention `qkv` Linear of `vit` in a `FusedQKVLoRA`; returns how many.

    Usage:
        add_vit_lora(model.encoder_modules("image")[0], rank=4)   # 12 for a ViT-B/16
    """
    attentions = [module for module in vit.modules() if isinstance(getattr(module, "qkv", None), nn.Linear)]
    for module in attentions:
        module.qkv = FusedQKVLoRA(module.qkv, rank)
    return len(attentions)


def add_bert_lora(module: nn.Module, rank: int) -> int:
    """peft LoRA (alpha = rank, no dropout) on the `query` and `value` Linear layers inside
    `module`; returns how many layers it adapted (0: nothing there to adapt, nothing changed).

    Usage:
        add_bert_lora(model.encoder_modules("text")[0], rank=4)   # query and value of every layer
    """
    targets = [name for name, child in module.named_modules()
               if name.split(".")[-1] in BERT_TARGETS and isinstance(child, nn.Linear)]
    if targets:
        from peft import LoraConfig, inject_adapter_in_model  # only LoRA models pay for importing peft

        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(BERT_TARGETS))
        inject_adapter_in_model(config, module)
    return len(targets)
