"""The BarcodeBERT DNA tower (the paper's): a BERT over non-overlapping k-mers of a barcode, and
how it starts from the authors' BarcodeBERT checkpoints (released names, `.pth` files, folders).

Usage:
    config = CLIBDConfig(dna_config={"model_type": "clibd_barcodebert", "pooling": "mean"})
    tower = CLIBDBarcodeBERTTower(config.dna_config, projection_dim=768)
    embeds = tower(dna_input_ids=ids, dna_attention_mask=mask)        # [B, 768], unit norm
    tower.load_pretrained("barcodebert-canada-1.5m-5mer")              # BERT + MLM head transform
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedConfig
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from .parts import EmbeddingPart, whole

logger = logging.getLogger(__name__)
DNA_TOKENIZER_FLAVOURS = ("compat", "barcodebert")
POOLINGS = ("compat", "mean")
# Architecture fields passed on to transformers' BertConfig (shared with the text tower's config).
BERT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """A config value that must be one of `choices`, or a ValueError naming the field."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class CLIBDBarcodeBERTConfig(PreTrainedConfig):
    """DNA tower of the paper: a BERT over non-overlapping `kmer_size`-mers of a barcode cut or
    padded to `max_sequence_length` bp.

    `tokenizer_flavour`: `compat` = the official old BarcodeBERT vocabulary (<MASK>=0, <CLS>=1,
    <UNK>=2, k-mers from 3, a leading id 0, no attention mask); `barcodebert` = the new one
    ([MASK]=0, [UNK]=1, k-mers from 2, attention mask over padding).
    `pooling`: `compat` = the official head (MLM transform, Linear to the projection dim, softmax
    over features, mean over every token including padding); `mean` = attention-masked mean of the
    last hidden state then a linear projection (clibd's default for new models).
    `pretrained_model_name_or_path`: the BarcodeBERT that `from_pretrained_towers` starts the BERT
    (and, with `compat` pooling, the MLM head transform) from: a released name (`BARCODEBERT_RELEASES`,
    e.g. `barcodebert-canada-1.5m-5mer`, the paper's), one of the authors' `.pth`/`.pt` files, a
    folder written by `clibd convert-barcodebert` or any transformers BERT folder or Hub id. None:
    the tower starts from random weights.

    Usage:
        CLIBDConfig(dna_config={"tokenizer_flavour": "barcodebert", "pooling": "mean"})   # the default kind
    """

    model_type = "clibd_barcodebert"
    base_config_key = "dna_config"

    kmer_size: int = 5
    max_sequence_length: int = 660
    tokenizer_flavour: Literal["compat", "barcodebert"] = "compat"
    pooling: Literal["compat", "mean"] = "compat"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pretrained_model_name_or_path: str | None = None

    def __post_init__(self, **kwargs):
        check_choice("dna_config.tokenizer_flavour", self.tokenizer_flavour, DNA_TOKENIZER_FLAVOURS)
        check_choice("dna_config.pooling", self.pooling, POOLINGS)
        if self.max_sequence_length % self.kmer_size:
            raise ValueError(
                f"max_sequence_length ({self.max_sequence_length}) must be a multiple of kmer_size ({self.kmer_size})"
            )
        if self.num_tokens > self.max_position_embeddings:
            raise ValueError(
                f"{self.num_tokens} DNA tokens do not fit max_position_embeddings={self.max_position_embeddings}"
            )
        super().__post_init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        specials = 3 if self.tokenizer_flavour == "compat" else 2
        return 4**self.kmer_size + specials

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the BERT: one token per k-mer, plus the leading id in compat mode."""
        return self.max_sequence_length // self.kmer_size + (self.tokenizer_flavour == "compat")

    def to_bert_config(self) -> BertConfig:
        return BertConfig(vocab_size=self.vocab_size, **{name: getattr(self, name) for name in BERT_FIELDS})

    def embedding_dim(self, projection_dim: int) -> int:
        return projection_dim

    def processor_settings(self) -> dict:
        """What `CLIBDProcessor` needs to make this tower's inputs."""
        return {"dna_tokenizer_flavour": self.tokenizer_flavour, "kmer_size": self.kmer_size,
                "max_sequence_length": self.max_sequence_length}

    def describe(self) -> str:
        """One line for the model card."""
        return (f"BERT over non-overlapping {self.kmer_size}-mers ({self.num_hidden_layers} layers, width "
                f"{self.hidden_size}; {self.tokenizer_flavour} vocabulary, {self.pooling} pooling)")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of the positions where `mask` is 1 (all positions when None)."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def load_pretrained_bert(target: BertModel, source: str) -> None:
    """Copy the encoder weights of a pretrained BERT (local dir or Hub id) into `target`; its
    pooler is not used. Any tensor of `target` left without a weight is an error."""
    state = {k: v for k, v in AutoModel.from_pretrained(source).state_dict().items() if not k.startswith("pooler.")}
    result = target.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"pretrained BERT {source} does not fit the tower: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")


class CLIBDBarcodeBERTTower(nn.Module):
    """BERT over k-mer tokens, pooled the official way (`compat`) or by masked mean (`mean`),
    projected and L2-normalised."""

    config_class = CLIBDBarcodeBERTConfig

    def __init__(self, config: CLIBDBarcodeBERTConfig, projection_dim: int):
        super().__init__()
        self.pooling = config.pooling
        bert_config = config.to_bert_config()
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        if self.pooling == "compat":
            # The official tower keeps BERT's MLM transform and replaces the decoder by this projection.
            self.head_transform = BertPredictionHeadTransform(bert_config)
        self.projection = nn.Linear(config.hidden_size, projection_dim)

    def forward(self, dna_input_ids: torch.Tensor | None = None, dna_attention_mask: torch.Tensor | None = None,
                **other_inputs: torch.Tensor | None) -> torch.Tensor:
        if dna_input_ids is None:
            raise ValueError("this model's DNA tower (BarcodeBERT) reads k-mer token ids: pass dna_input_ids "
                             "(the processor of this model makes them)")
        if self.pooling == "compat":
            # Official behaviour: no attention mask, softmax over features, mean over all tokens.
            hidden = self.bert(input_ids=dna_input_ids).last_hidden_state
            # float32 softmax, as CUDA autocast runs it for the official code
            pooled = self.projection(self.head_transform(hidden)).float().softmax(dim=-1).mean(dim=1)
        else:
            hidden = self.bert(input_ids=dna_input_ids, attention_mask=dna_attention_mask).last_hidden_state
            pooled = self.projection(masked_mean(hidden, dna_attention_mask))
        return F.normalize(pooled.float(), dim=-1)  # in float32 under autocast too (`clibd.loss`)

    def embedding_parts(self) -> list[EmbeddingPart]:
        return whole(self.projection.out_features)

    def load_pretrained(self, source: str) -> None:
        """Start the BERT (and the MLM head transform of `compat` pooling) from a BarcodeBERT
        checkpoint (`pretrained_model_name_or_path`); see `read_barcodebert_checkpoint`."""
        state, bert_config = read_barcodebert_checkpoint(source)
        load_barcodebert_weights(self, state, bert_config, source)

    def encoder_modules(self) -> list[nn.Module]:
        """The pretrained part (frozen by `train.freeze`, adapted by LoRA): all but the projection."""
        return [self.bert] + ([self.head_transform] if self.pooling == "compat" else [])


# ---------------------------------------------------------------------------------------------
# Starting the tower from the authors' BarcodeBERT checkpoints. This lives with the tower, not in
# `clibd.convert`, because the tower resolves `pretrained_model_name_or_path` itself and the model
# layer may not import the apps layer; `clibd.convert.barcodebert` re-exports it and writes folders.


@dataclass(frozen=True)
class BarcodeBERTRelease:
    """Where one released BarcodeBERT checkpoint lives: files in a Hub repo (tried in order), or a URL."""

    description: str
    repo_id: str | None = None
    filenames: tuple[str, ...] = ()
    url: str | None = None


CLIBD_HUB_REPO = "bioscan-ml/clibd"
VAULT = "https://vault.cs.uwaterloo.ca/s"
# name                           | where                                                       | layout
# barcodebert-canada-1.5m-5mer   | bioscan-ml/clibd ckpt/BarcodeBERT/.../model_41.pth            | bare DDP BertForMaskedLM
#   (the paper's start: clibd's global_config `bioscan_bert_checkpoint`; older clibd docs give 5_mer/)
# barcodebert-canada-1.5m-4mer   | bioscan-ml/clibd .../CANADA-1.5M-BEST_k4_4_4_w1_m0_r0_wd.pt  | {"model": DDP
# barcodebert-bioscan-5m-4mer    | bioscan-ml/clibd .../BIOSCAN-5M-BEST_k4_6_6_w1_m0_r0.pt      |   BertForTokenClassification,
#                                                                                              |   "bert_config", ...}
#   (k4_H_L: 4-mers, H heads, L layers, as BarcodeBERT names its architectures)
#   (clibd's global_config names these two `..._trained_with_bioscan_5_m` / `..._canada_1_5_m` the
#   wrong way round since 2025-05-05; the table keys them by the file, which says what it is)
# barcodebert-v1-{4,5,6}mer      | BarcodeBERT's io.py `available_archs` (vault URLs, 12 x 12)   | bare DDP BertForMaskedLM
BARCODEBERT_RELEASES: dict[str, BarcodeBERTRelease] = {
    "barcodebert-canada-1.5m-5mer": BarcodeBERTRelease(
        "old BarcodeBERT, 5-mers, BERT-base, trained on CANADA-1.5M (epoch 41): the CLIBD paper's DNA start",
        CLIBD_HUB_REPO, ("ckpt/BarcodeBERT/old_checkpoints/trained_with_canada_1_5M/model_41.pth",
                         "ckpt/BarcodeBERT/5_mer/model_41.pth")),
    "barcodebert-canada-1.5m-4mer": BarcodeBERTRelease(
        "new BarcodeBERT, 4-mers, 4 layers x 4 heads, trained on CANADA-1.5M", CLIBD_HUB_REPO,
        ("ckpt/BarcodeBERT/new_checkpoints/trained_with_canada_1_5M/CANADA-1.5M-BEST_k4_4_4_w1_m0_r0_wd.pt",)),
    "barcodebert-bioscan-5m-4mer": BarcodeBERTRelease(
        "new BarcodeBERT, 4-mers, 6 layers x 6 heads, trained on BIOSCAN-5M", CLIBD_HUB_REPO,
        ("ckpt/BarcodeBERT/new_checkpoints/trained_with_5m/BIOSCAN-5M-BEST_k4_6_6_w1_m0_r0.pt",)),
    **{f"barcodebert-v1-{k}mer": BarcodeBERTRelease(
        f"BarcodeBERT paper v1, {k}-mers, BERT-base (old vocabulary)", url=f"{VAULT}/{share}/download/new_model_{k}.pth")
       for k, share in ((4, "5XdqgegTC6xe2yQ"), (5, "Cb6yzBpPdHQzjzg"), (6, "GCfZdeZEDCcdSNf"))},
}
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
HEAD_TRANSFORM = "cls.predictions.transform."
# Present in the checkpoints, never used by the tower: BERT's pooler, the MLM decoder (the authors'
# tower replaces it by the projection) and its orphaned bias.
UNUSED_PREFIXES = ("bert.pooler.", "cls.predictions.decoder.", "cls.predictions.bias")
CHECKED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps",
                  "position_embedding_type")


def resolve_barcodebert_source(source: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local file or folder as it is; a released name (`BARCODEBERT_RELEASES`), `hf://OWNER/REPO/path`,
    an http(s) URL or a Hub repo id (a transformers BERT folder) downloaded to the cache first.

    Usage:
        path = resolve_barcodebert_source("barcodebert-canada-1.5m-5mer")
    """
    path, text = Path(source), str(source)
    if path.exists():
        return path
    from huggingface_hub import hf_hub_download, snapshot_download

    if text in BARCODEBERT_RELEASES:
        return _download_release(text, BARCODEBERT_RELEASES[text], cache_dir)
    if text.startswith("hf://") and text.count("/") >= 4:
        owner, repo, filename = text[len("hf://"):].split("/", 2)
        return Path(hf_hub_download(f"{owner}/{repo}", filename, cache_dir=cache_dir))
    if text.startswith(("http://", "https://")):
        suffix = Path(urlparse(text).path).suffix or ".pth"  # kept: a .safetensors file is read as one
        return _download_url(text, hashlib.sha256(text.encode()).hexdigest()[:16] + suffix, cache_dir)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.endswith(CHECKPOINT_SUFFIXES):  # not a mistyped file
        return Path(snapshot_download(text, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"],
                                      cache_dir=cache_dir))
    raise FileNotFoundError(f"{text}: no such file or folder, and not a released BarcodeBERT "
                            f"({', '.join(BARCODEBERT_RELEASES)}), hf://OWNER/REPO/path, URL or Hub repo id")


def _download_release(name: str, release: BarcodeBERTRelease, cache_dir: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if release.url:
        return _download_url(release.url, f"{name}.pth", cache_dir)
    for filename in release.filenames[:-1]:  # the authors moved the file once: older places first tried
        try:
            return Path(hf_hub_download(release.repo_id, filename, cache_dir=cache_dir))
        except EntryNotFoundError:
            continue
    return Path(hf_hub_download(release.repo_id, release.filenames[-1], cache_dir=cache_dir))


def _download_url(url: str, filename: str, cache_dir: str | None) -> Path:
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "clibd_barcodebert"
    target = folder / filename
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target))  # to a temporary file, renamed when complete
    return target


def read_barcodebert_checkpoint(source: str | os.PathLike, cache_dir: str | None = None,
                                ) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, BertConfig fields) of a BarcodeBERT checkpoint, read without running pickled code.

    Reads the authors' layouts: a bare (DistributedDataParallel) `BertForMaskedLM` state dict (the
    paper's `model_41.pth`, BarcodeBERT v1), `{"model": ..., "bert_config": ...}` training
    checkpoints (newer BarcodeBERT, `BertForTokenClassification`), and folders (`config.json` +
    `model.safetensors`). Keys come back as `bert.*` / `cls.predictions.*`: wrapper prefixes
    stripped, `position_ids` buffers and the token classifier dropped. A checkpoint that stores no
    config gets the fields its tensor shapes show (not the head count).

    Usage:
        state, bert_config = read_barcodebert_checkpoint("barcodebert-canada-1.5m-5mer")
    """
    path = resolve_barcodebert_source(source, cache_dir)
    state, bert_config = _read_folder(path) if path.is_dir() else _read_file(path)
    state = normalise_barcodebert_state(state)
    if not any(key.startswith("bert.") for key in state):
        raise ValueError(f"{path}: no BERT weights found (keys start with {sorted({k.split('.')[0] for k in state})})")
    return state, dict(bert_config) if bert_config else _shape_config(state)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    if path.suffix == ".safetensors":
        return load_safetensors(path), None
    try:
        # The newer checkpoints keep their training arguments (an argparse.Namespace, a plain
        # attribute container) beside the weights: the one class allowed besides tensors.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds pickled objects other than tensors; clibd reads checkpoints with "
                         f"weights_only=True and does not run them ({str(error).splitlines()[0]})") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state dict or a dict with 'model', got {type(checkpoint).__name__}")
    for name in ("model", "state_dict"):
        if isinstance(checkpoint.get(name), dict):
            return checkpoint[name], checkpoint.get("bert_config")
    return checkpoint, None


def _read_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    if (path / "model.safetensors").is_file():
        return load_safetensors(path / "model.safetensors"), config
    if (path / "pytorch_model.bin").is_file():
        return _read_file(path / "pytorch_model.bin")[0], config
    raise FileNotFoundError(f"{path}: a BERT folder needs model.safetensors or pytorch_model.bin")


def normalise_barcodebert_state(state: dict) -> dict[str, torch.Tensor]:
    """Wrapper prefixes stripped, a bare `BertModel` put under `bert.`, `position_ids` and the
    token classifier (`classifier.*`, the newer BarcodeBERT's pretraining head) dropped."""
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"expected a state dict of tensors; not tensors: {bad[:5]}")
    normalised = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key.startswith(("embeddings.", "encoder.", "pooler.")):
            key = f"bert.{key}"
        if not key.endswith("position_ids") and not key.startswith("classifier."):
            normalised[key] = value
    return normalised


def _shape_config(state: dict[str, torch.Tensor]) -> dict:
    """The BertConfig fields the tensor shapes give (the head count is not among them)."""
    vocab, hidden = state["bert.embeddings.word_embeddings.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))}
    return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": len(layers),
            "intermediate_size": state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            "max_position_embeddings": state["bert.embeddings.position_embeddings.weight"].shape[0],
            "type_vocab_size": state["bert.embeddings.token_type_embeddings.weight"].shape[0]}


def barcodebert_dna_settings(bert_config: dict) -> dict:
    """The `dna_config` under which the DNA tower fits a checkpoint: k-mer size and vocabulary from
    the vocabulary size (4^k + 3: old, `compat`; 4^k + 2: new, `barcodebert`), sizes from the config.

    Usage:
        CLIBDConfig(dna_config=barcodebert_dna_settings(bert_config))
    """
    vocab = bert_config["vocab_size"]
    match = [(k, extra) for k in range(2, 9) for extra in (3, 2) if vocab == 4**k + extra]
    if not match:
        raise ValueError(f"a vocabulary of {vocab} ids is neither 4^k + 3 (old BarcodeBERT) nor 4^k + 2 (new); "
                         "k-mers with N as tokens (5^k + 2) are not read by clibd's tokenizer")
    k, extra = match[0]
    sizes = {name: bert_config[name] for name in BERT_FIELDS if name in bert_config}
    sizes.setdefault("num_attention_heads", max(1, bert_config["hidden_size"] // 64))  # BERT's head width 64
    # The old checkpoints are the paper's (their embedding is the MLM-head pooling); the new ones
    # embed by the masked mean of the last hidden state and carry no MLM head.
    flavour = "compat" if extra == 3 else "barcodebert"
    return {"model_type": "clibd_barcodebert", "kmer_size": k, "tokenizer_flavour": flavour,
            "pooling": "compat" if extra == 3 else "mean", **sizes}


def check_bert_config(target: BertConfig, bert_config: dict, source: str) -> None:
    """A ValueError naming every architecture field in which the checkpoint and the tower differ."""
    defaults = {"position_embedding_type": "absolute"}
    differ = [f"{name}: checkpoint {bert_config[name]!r}, tower {getattr(target, name, defaults.get(name))!r}"
              for name in CHECKED_FIELDS
              if name in bert_config and bert_config[name] != getattr(target, name, defaults.get(name))]
    if differ:
        try:
            hint = f"; a dna_config that fits: {barcodebert_dna_settings(bert_config)}"
        except ValueError as error:
            hint = f"; {error}"
        raise ValueError(f"BarcodeBERT {source} does not fit the DNA tower ({'; '.join(differ)}){hint}")


def load_barcodebert_weights(tower: CLIBDBarcodeBERTTower, state: dict[str, torch.Tensor], bert_config: dict,
                             source: str = "checkpoint") -> list[str]:
    """Copy the BERT body (and, with `compat` pooling, the MLM head transform) into `tower`. A tensor
    the tower needs and the checkpoint lacks is an error naming it; tensors left over (other than
    the known unused pooler and MLM decoder) are named in a warning and returned.

    Usage:
        load_barcodebert_weights(model.dna_encoder, *read_barcodebert_checkpoint(path), source=path)
    """
    check_bert_config(tower.bert.config, bert_config, source)
    parts = {"bert.": tower.bert}
    if tower.pooling == "compat":
        parts[HEAD_TRANSFORM] = tower.head_transform
    wanted = {prefix + key: (module, key) for prefix, module in parts.items() for key in module.state_dict()}
    missing = sorted(set(wanted) - set(state))
    if missing:
        hint = (" (this checkpoint has no MLM head, as the newer BarcodeBERT's do not: use pooling: mean)"
                if any(k.startswith(HEAD_TRANSFORM) for k in missing) else "")
        raise ValueError(f"BarcodeBERT {source} lacks {len(missing)} tensors the DNA tower needs: {missing}{hint}")
    for prefix, module in parts.items():
        subset = {key: state[prefix + key] for key in module.state_dict()}
        module.load_state_dict(subset, strict=True)  # a shape mismatch is an error naming the tensor
    unused = UNUSED_PREFIXES + (() if tower.pooling == "compat" else (HEAD_TRANSFORM,))
    leftover = sorted(k for k in set(state) - set(wanted) if not k.startswith(unused))
    if leftover:
        logger.warning("BarcodeBERT %s: %d tensors not used by the DNA tower: %s", source, len(leftover), leftover)
    logger.info("DNA tower starts from BarcodeBERT %s", source)
    return leftover
