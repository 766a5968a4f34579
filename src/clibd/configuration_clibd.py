"""Configuration of a CLIBD model: one sub-config per tower, defaults are the paper's.

Usage:
    config = CLIBDConfig()              # paper sizes: ViT-B/16, BERT-base DNA, BERT-small text
    config = CLIBDConfig.tiny()         # a few layers and small widths, for tests
"""

from __future__ import annotations

import math
from typing import Literal

from transformers import BertConfig, PreTrainedConfig

DNA_TOKENIZER_FLAVOURS = ("compat", "barcodebert")
# Architecture fields shared by the DNA and text sub-configs, passed on to transformers' BertConfig.
BERT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps")
POOLINGS = ("compat", "mean")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class CLIBDImageConfig(PreTrainedConfig):
    """Image tower: a timm model whose classifier is reset to `projection_dim` outputs (CLS pooling).

    `timm_kwargs` are passed to `timm.create_model` to change the architecture (used by the tiny
    config); `pretrained` says whether `CLIBDModel.from_pretrained_towers` loads timm's weights.
    No mean/std normalisation is applied on the timm path (as in the official code).
    """

    model_type = "clibd_image_model"
    base_config_key = "image_config"

    timm_model_name: str = "vit_base_patch16_224"
    pretrained: bool = True
    image_size: int = 224
    resize_size: int = 256
    timm_kwargs: dict | None = None

    def __post_init__(self, **kwargs):
        self.timm_kwargs = dict(self.timm_kwargs or {})
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        super().__post_init__(**kwargs)


class CLIBDDNAConfig(PreTrainedConfig):
    """DNA tower: a BERT over non-overlapping k-mers of a barcode (BarcodeBERT).

    `tokenizer_flavour`: `compat` = the official old BarcodeBERT vocabulary (<MASK>=0, <CLS>=1,
    <UNK>=2, k-mers from 3, a leading id 0, no attention mask); `barcodebert` = the new one
    ([MASK]=0, [UNK]=1, k-mers from 2, attention mask over padding).
    `pooling`: `compat` = the official head (MLM transform, Linear to the projection dim, softmax
    over features, mean over every token including padding); `mean` = attention-masked mean of the
    last hidden state then a linear projection (clibd's default for new models).
    `encoder`: `bert` (the above) or `kmer_profile`: an MLP over the L2-normalised counts of
    overlapping `profile_kmer_size`-mers (the tower of bench/kmer_profile_tower.py, strong on
    species that no reference holds); the BERT fields are then unused. With `profile_sketch_dim`
    > 0 its retrieval embedding also carries a fixed random projection of the profile to that many
    dimensions (a sketch whose cosines approximate raw k-mer-profile cosines), weighted by
    `profile_sketch_weight` against the learned part: the learned part places a barcode among
    genera and families, the sketch keeps the fine alignment-free similarity between close
    barcodes. Only for DNA-only models (the retrieval embedding is wider than `projection_dim`).
    With `profile_aligned` the tower also reads the barcode placed on the 658 positions of the
    COI-5P region (`clibd.processing.aligned_onehot`) through two more branches, each trained with
    its own loss: an MLP (`profile_hidden_size` wide) and a positional model (a learned weight per
    position and a 4 x 4 base map per codon position, whose cosine is its embedding); the
    retrieval embedding is then the four parts with equal weight (bench/README.md, idea 5: better
    at genus and family for species that no reference holds, weaker at telling them new).
    """

    model_type = "clibd_dna_model"
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
    encoder: Literal["bert", "kmer_profile"] = "bert"
    profile_kmer_size: int = 6
    profile_hidden_size: int = 1024
    profile_sketch_dim: int = 0
    profile_sketch_weight: float = 1.0
    profile_aligned: bool = False

    def __post_init__(self, **kwargs):
        _check_choice("dna_config.encoder", self.encoder, ("bert", "kmer_profile"))
        if self.profile_sketch_dim < 0 or self.profile_sketch_weight < 0:
            raise ValueError("dna_config.profile_sketch_dim and profile_sketch_weight must be >= 0")
        if self.profile_sketch_dim and self.encoder != "kmer_profile":
            raise ValueError("dna_config.profile_sketch_dim needs encoder: kmer_profile")
        if self.profile_aligned and self.encoder != "kmer_profile":
            raise ValueError("dna_config.profile_aligned needs encoder: kmer_profile")
        _check_choice("dna_config.tokenizer_flavour", self.tokenizer_flavour, DNA_TOKENIZER_FLAVOURS)
        _check_choice("dna_config.pooling", self.pooling, POOLINGS)
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


class CLIBDTextConfig(PreTrainedConfig):
    """Taxonomy-text tower: a BERT (the paper's `prajjwal1/bert-small`) over "order family genus species".

    `pooling`: `compat` = the official unmasked mean over all `max_length` positions; `mean` =
    attention-masked mean. Either is followed by a linear projection to the projection dim.
    """

    model_type = "clibd_text_model"
    base_config_key = "text_config"

    pretrained_model_name_or_path: str | None = "prajjwal1/bert-small"
    max_length: int = 20
    pooling: Literal["compat", "mean"] = "compat"
    vocab_size: int = 30522
    hidden_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12

    def __post_init__(self, **kwargs):
        _check_choice("text_config.pooling", self.pooling, POOLINGS)
        super().__post_init__(**kwargs)

    def to_bert_config(self) -> BertConfig:
        return BertConfig(vocab_size=self.vocab_size, type_vocab_size=self.type_vocab_size,
                          **{name: getattr(self, name) for name in BERT_FIELDS})

    def update_from_bert_config(self, bert: BertConfig) -> None:
        """Copy the architecture of a pretrained BERT so that the tower can hold its weights."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps"):
            setattr(self, name, getattr(bert, name))


class CLIBDConfig(PreTrainedConfig):
    """Configuration of `CLIBDModel`: three towers, a shared projection dim and a trainable temperature.

    `modalities` lists the towers the model has (any non-empty subset of image, dna, text); the
    official image+DNA checkpoints have no text tower.

    Usage:
        config = CLIBDConfig(modalities=["dna", "text"], dna_config={"pooling": "mean"})
    """

    model_type = "clibd"
    sub_configs_defaults = {
        "image_config": CLIBDImageConfig,
        "dna_config": CLIBDDNAConfig,
        "text_config": CLIBDTextConfig,
    }

    image_config: dict | CLIBDImageConfig | None = None
    dna_config: dict | CLIBDDNAConfig | None = None
    text_config: dict | CLIBDTextConfig | None = None
    modalities: list[str] | None = None
    projection_dim: int = 768
    logit_scale_init_value: float = math.log(1 / 0.07)

    def __post_init__(self, **kwargs):
        self.modalities = list(self.modalities or ["image", "dna", "text"])
        unknown = set(self.modalities) - {"image", "dna", "text"}
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of image, dna, text; got {self.modalities}")
        super().__post_init__(**kwargs)
        for wider in ("profile_sketch_dim", "profile_aligned"):
            if getattr(self.dna_config, wider) and self.modalities != ["dna"]:
                raise ValueError(f"dna_config.{wider} widens the DNA embedding beyond projection_dim: only "
                                 f"for DNA-only models, not modalities {self.modalities}")

    @classmethod
    def tiny(cls, **overrides) -> CLIBDConfig:
        """A small config (2 layers, widths 32-64, 32x32 images) with the paper's structure, for tests."""
        settings = dict(
            projection_dim=32,
            image_config=dict(
                pretrained=False, image_size=32, resize_size=36,
                timm_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
            ),
            dna_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=160),
            text_config=dict(pretrained_model_name_or_path=None, vocab_size=30522, hidden_size=32,
                             num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64),
        )
        for key, value in overrides.items():
            if key in settings and isinstance(value, dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
        return cls(**settings)
