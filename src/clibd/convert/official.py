"""Convert the authors' released CLIBD checkpoints (`best.pth`) into a `CLIBDModel` + processor.

What it does (facts from the official release, see the project's checkpoint notes):
- reads the `.pth` with `torch.load(weights_only=True)` only;
- accepts both wrapper namings (`lora_vit` / `base_image_encoder`, `lora_barcode_bert` /
  `base_dna_encoder`, `lora_bert` / `base_language_encoder`);
- merges the image tower's rank-4 LoRA (inside the fused qkv: B_q A_q added to the q rows, B_v A_v to
  the v rows, no scaling) and the DNA / text LoRA wrappers (`.w`, `.w_a`, `.w_b`) into plain weights;
- drops stale `position_ids` buffers, the text pooler and the orphaned `cls.predictions.bias`;
- sets the `compat` tokenizer and DNA pooling, the text tower's unmasked mean + projection and the
  stored log-space temperature. Any key left over, or any tensor the model needs and did not get,
  is an error that lists them.

Usage:
    model, processor = convert_official("best.pth", text_tokenizer=DEFAULT_TEXT_MODEL)
    model.save_pretrained("clibd-bioscan1m"); processor.save_pretrained("clibd-bioscan1m")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..configuration_clibd import CLIBDConfig
from ..constants import DEFAULT_TEXT_MODEL
from ..modeling_clibd import CLIBDModel
from ..processing import CLIBDProcessor

HUB_REPO = "bioscan-ml/clibd"
RELEASED = {
    # short name: file in the Hub model repo bioscan-ml/clibd
    f"{data}-{kind}": f"ckpt/bioscan_clip/ver_1_0/{folder}/{kind.replace('-', '_')}_4gpu/best.pth"
    for data, folder in (("bioscan-1m", "bioscan_1m"), ("bioscan-5m", "bioscan_5m"))
    for kind in ("image-dna", "image-dna-text")
}
WRAPPERS = {
    "image": ("image_encoder.lora_vit.", "image_encoder.base_image_encoder."),
    "dna": ("dna_encoder.lora_barcode_bert.", "dna_encoder.base_dna_encoder."),
    "text": ("language_encoder.lora_bert.", "language_encoder.base_language_encoder."),
}
DROPPED = (re.compile(r"(^|\.)position_ids$"), re.compile(r"^pooler\."), re.compile(r"^cls\.predictions\.bias$"))


def resolve_checkpoint(source: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local `.pth`, or one of the released checkpoints fetched from the Hub: a short name
    (`bioscan-1m-image-dna-text`, ...), `hf://OWNER/REPO/path/in/repo.pth`, or a path inside
    `bioscan-ml/clibd`."""
    path = Path(source)
    if path.is_file():
        return path
    from huggingface_hub import hf_hub_download

    text = str(source)
    if text in RELEASED:
        repo, filename = HUB_REPO, RELEASED[text]
    elif text.startswith("hf://"):
        parts = text[len("hf://") :].split("/")
        if len(parts) < 3:
            raise ValueError(f"{text}: expected hf://OWNER/REPO/path/to/best.pth")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    elif text.endswith(".pth") and not path.exists():
        repo, filename = HUB_REPO, text
    else:
        raise FileNotFoundError(f"{text}: no such file, and not a released checkpoint name ({', '.join(RELEASED)})")
    return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=cache_dir))


def _split_towers(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Tower-relative tensors per tower; keys that belong to no tower are returned as left over."""
    towers: dict[str, dict[str, torch.Tensor]] = {"image": {}, "dna": {}, "text": {}, "top": {}}
    leftover = []
    for key, value in state.items():
        if key == "logit_scale":
            towers["top"][key] = value
            continue
        if key.startswith("language_encoder.proj."):
            towers["top"]["text_projection." + key[len("language_encoder.proj.") :]] = value
            continue
        for tower, prefixes in WRAPPERS.items():
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is not None:
                towers[tower][key[len(prefix) :]] = value
                break
        else:
            leftover.append(key)
    return towers, leftover


def _merge_bert_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`X.w.weight` + `X.w_b.weight @ X.w_a.weight` -> `X.weight` (and `X.w.bias` -> `X.bias`)."""
    merged = {}
    for key, value in state.items():
        if key.endswith((".w_a.weight", ".w_b.weight")):
            continue
        if ".w." in key:
            base = key.replace(".w.", ".", 1)
            if key.endswith(".w.weight"):
                stem = key[: -len(".w.weight")]
                value = value + state[f"{stem}.w_b.weight"] @ state[f"{stem}.w_a.weight"]
            merged[base] = value
        else:
            merged[key] = value
    return merged


def _merge_vit_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT with the official LoRA wrapper on every fused qkv -> plain timm keys."""
    merged = {}
    for key, value in state.items():
        if re.search(r"attn\.qkv\.linear_[ab]_[qv]\.weight$", key):
            continue
        match = re.match(r"(blocks\.\d+\.attn\.qkv)\.qkv\.(weight|bias)$", key)
        if match is None:
            merged[key] = value
            continue
        stem, kind = match.groups()
        if kind == "weight":
            value = value.clone()
            dim = value.shape[1]
            if f"{stem}.linear_a_q.weight" in state:
                value[:dim] += state[f"{stem}.linear_b_q.weight"] @ state[f"{stem}.linear_a_q.weight"]
                value[2 * dim :] += state[f"{stem}.linear_b_v.weight"] @ state[f"{stem}.linear_a_v.weight"]
        merged[f"{stem}.{kind}"] = value
    return merged


def _drop(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not any(p.search(k) for p in DROPPED)}


def _bert_sizes(state: dict[str, torch.Tensor], prefix: str = "") -> dict:
    layers = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.", k))}
    vocab, hidden = state[f"{prefix}embeddings.word_embeddings.weight"].shape
    return {
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // 64),  # BERT convention (head width 64); not stored in weights
        "intermediate_size": state[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": state[f"{prefix}embeddings.position_embeddings.weight"].shape[0],
    }, vocab


def official_config(towers: dict[str, dict[str, torch.Tensor]]) -> CLIBDConfig:
    """The CLIBDConfig whose shapes are those of the checkpoint, in the official (compat) modes."""
    image = towers["image"]
    dim, _, patch, _ = image["patch_embed.proj.weight"].shape
    grid = int(round((image["pos_embed"].shape[1] - 1) ** 0.5))
    depth = len({int(m.group(1)) for k in image if (m := re.match(r"blocks\.(\d+)\.", k))})
    projection_dim = image["head.weight"].shape[0]
    timm_kwargs = {}
    if (dim, depth, patch, grid * patch) != (768, 12, 16, 224):
        timm_kwargs = {"img_size": grid * patch, "patch_size": patch, "embed_dim": dim, "depth": depth,
                       "num_heads": max(1, dim // 64)}
    dna_sizes, dna_vocab = _bert_sizes(towers["dna"], "bert.")
    if dna_vocab != 4**5 + 3:
        raise ValueError(f"DNA word embeddings have {dna_vocab} rows; the official 5-mer vocabulary has {4**5 + 3}")
    modalities = ["image", "dna"] + (["text"] if towers["text"] else [])
    settings = {
        "modalities": modalities,
        "projection_dim": projection_dim,
        "image_config": {"pretrained": False, "image_size": grid * patch, "resize_size": 256 * grid * patch // 224,
                         "timm_kwargs": timm_kwargs},
        "dna_config": {"tokenizer_flavour": "compat", "pooling": "compat", **dna_sizes},
    }
    if towers["text"]:
        text_sizes, text_vocab = _bert_sizes(towers["text"])
        settings["text_config"] = {"pretrained_model_name_or_path": None, "pooling": "compat",
                                   "vocab_size": text_vocab,
                                   "type_vocab_size": towers["text"]["embeddings.token_type_embeddings.weight"].shape[0],
                                   **text_sizes}
    return CLIBDConfig(**settings)


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[CLIBDConfig, dict[str, torch.Tensor]]:
    """(config, clibd state dict) from an official state dict; see the module doc for the rules."""
    towers, leftover = _split_towers(state)
    if leftover:
        raise ValueError(f"unexpected keys in the checkpoint (no known tower prefix): {sorted(leftover)}")
    if not towers["image"] or not towers["dna"]:
        raise ValueError("not an official CLIBD checkpoint: image_encoder.* and dna_encoder.* keys are required")
    towers["image"] = _merge_vit_lora(towers["image"])
    towers["dna"] = _drop(_merge_bert_lora(towers["dna"]))
    towers["text"] = _drop(_merge_bert_lora(towers["text"]))
    config = official_config(towers)
    converted: dict[str, torch.Tensor] = {}
    for key, value in towers["image"].items():
        converted[f"image_encoder.{key}"] = value
    for key, value in towers["dna"].items():
        if key.startswith("bert."):
            converted[f"dna_encoder.{key}"] = value
        elif key.startswith("cls.predictions.transform."):
            converted["dna_encoder.head_transform." + key[len("cls.predictions.transform.") :]] = value
        elif key.startswith("cls.predictions.decoder."):
            converted["dna_encoder.projection." + key[len("cls.predictions.decoder.") :]] = value
        else:
            converted[f"dna_encoder.UNMAPPED.{key}"] = value
    for key, value in towers["text"].items():
        converted[f"text_encoder.bert.{key}"] = value
    for key, value in towers["top"].items():
        name = key.replace("text_projection.", "text_encoder.projection.")
        converted[name] = value.reshape(()) if key == "logit_scale" else value
    return config, converted


def load_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a `.pth`, read safely (tensors only: `weights_only=True`)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def convert_official(source: str | os.PathLike, text_tokenizer: str | None = DEFAULT_TEXT_MODEL,
                     cache_dir: str | None = None) -> tuple[CLIBDModel, CLIBDProcessor]:
    """A `CLIBDModel` and `CLIBDProcessor` equivalent to the official pipeline for `source`."""
    from transformers import AutoTokenizer

    config, state = convert_state_dict(load_official_checkpoint(resolve_checkpoint(source, cache_dir)))
    model = CLIBDModel(config).eval()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError("checkpoint does not convert cleanly: "
                         + "; ".join(f"{name}: {items}" for name, items in
                                     (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                                     if items))
    model.load_state_dict(state, strict=True)
    tokenizer = None
    if "text" in config.modalities and text_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(text_tokenizer)
    return model, CLIBDProcessor.from_model_config(config, tokenizer)
