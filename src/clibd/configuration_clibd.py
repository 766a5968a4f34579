"""Configuration of a CLIBD model: one sub-config per tower, defaults are the paper's.

Usage:
    config = CLIBDConfig()              # paper sizes: ViT-B/16, BERT-base DNA, BERT-small text
    config = CLIBDConfig.tiny()         # a few layers and small widths, for tests
"""

from __future__ import annotations

import math
from typing import Literal

from transformers import AutoConfig, BertConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .constants import DEFAULT_TEXT_MODEL, MODALITIES
from .towers import DEFAULT_DNA_TOWER, DNA_CONFIGS, upgrade_legacy_dna_config
from .towers.barcodebert import BERT_FIELDS, POOLINGS, check_choice

PAPER_VIT = "vit_base_patch16_224.augreg2_in21k_ft_in1k"  # timm name.tag of the paper's image tower start


class CLIBDImageConfig(PreTrainedConfig):
    """Image tower: a timm model whose classifier is reset to `projection_dim` outputs (CLS pooling).

    `timm_kwargs` are passed to `timm.create_model` to change the architecture (used by the tiny
    config); `pretrained` says whether `CLIBDModel.from_pretrained_towers` loads timm's weights.
    No mean/std normalisation is applied on the timm path (as in the official code).

    The default names the weights' tag: the official code asks timm for `vit_base_patch16_224`,
    which timm ~1.0.9 (the paper's; and timm since 0.9) resolves to `augreg2_in21k_ft_in1k`; the
    untagged name would follow whatever default a later timm picks.
    """

    model_type = "clibd_image_model"
    base_config_key = "image_config"

    timm_model_name: str = PAPER_VIT
    pretrained: bool = True
    image_size: int = 224
    resize_size: int = 256
    timm_kwargs: dict | None = None

    def __post_init__(self, **kwargs):
        self.timm_kwargs = dict(self.timm_kwargs or {})
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")
        super().__post_init__(**kwargs)


class CLIBDTextConfig(PreTrainedConfig):
    """Taxonomy-text tower: a BERT (the paper's `prajjwal1/bert-small`, `DEFAULT_TEXT_MODEL`) over "order family genus species".

    `pooling`: `compat` = the official unmasked mean over all `max_length` positions; `mean` =
    attention-masked mean. Either is followed by a linear projection to the projection dim.
    """

    model_type = "clibd_text_model"
    base_config_key = "text_config"

    pretrained_model_name_or_path: str | None = DEFAULT_TEXT_MODEL
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
        check_choice("text_config.pooling", self.pooling, POOLINGS)
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
    official image+DNA checkpoints have no text tower. `lora_rank` is set by `CLIBDModel.add_lora`
    (LoRA training): the model then has rank-`lora_rank` adapters on attention q and v, and loads
    back with them. `trained_species` is set by `clibd train` (the species of its training
    records; None: not known, e.g. converted official checkpoints): an index built with the model
    holds out the library's other species to calibrate how it places species it never saw
    (`clibd.novelty.calibration_sample`).

    Usage:
        config = CLIBDConfig(modalities=["dna", "text"], dna_config={"pooling": "mean"})
    """

    model_type = "clibd"
    sub_configs_defaults = {
        "image_config": CLIBDImageConfig,
        # the DNA tower kind is chosen by dna_config["model_type"] (clibd.towers); BarcodeBERT by default
        "dna_config": SubConfigSpec(AutoConfig, model_type=DEFAULT_DNA_TOWER),
        "text_config": CLIBDTextConfig,
    }

    image_config: dict | CLIBDImageConfig | None = None
    dna_config: dict | PreTrainedConfig | None = None
    text_config: dict | CLIBDTextConfig | None = None
    modalities: list[str] | None = None
    projection_dim: int = 768
    logit_scale_init_value: float = math.log(1 / 0.07)
    lora_rank: int | None = None
    trained_species: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be None or >= 1, got {self.lora_rank}")
        self.modalities = list(self.modalities or MODALITIES)
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of image, dna, text; got {self.modalities}")
        if isinstance(self.dna_config, dict):
            self.dna_config = upgrade_legacy_dna_config(self.dna_config)
        super().__post_init__(**kwargs)
        width = self.dna_config.embedding_dim(self.projection_dim)
        if width != self.projection_dim and self.modalities != ["dna"]:
            raise ValueError(f"this dna_config ({self.dna_config.model_type}) makes {width}-d DNA embeddings, wider "
                             f"than projection_dim {self.projection_dim} (a sketch or aligned branches): only for "
                             f"DNA-only models, not modalities {self.modalities}")

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
        dna = overrides.get("dna_config")
        if isinstance(dna, dict) and upgrade_legacy_dna_config(dna).get("model_type", DEFAULT_DNA_TOWER) \
                != DEFAULT_DNA_TOWER:
            settings.pop("dna_config")  # the tiny sizes are BarcodeBERT's; other kinds take theirs as given
        for key, value in overrides.items():
            if key in settings and isinstance(value, dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
        return cls(**settings)


def check_tower_keys(tower: str, values: dict) -> None:
    """Settings given for a tower (`image`, `dna` or `text`, e.g. from a YAML file) must be fields
    of its config class (for `dna`, of the kind its `model_type` names): a typo is an error, not a
    silently ignored key.

    Usage:
        check_tower_keys("dna", {"model_type": "clibd_kmer_profile", "kmer_sise": 7})   # ValueError
    """
    if tower == "dna":
        values = upgrade_legacy_dna_config(values)
        kind = values.get("model_type", DEFAULT_DNA_TOWER)
        if kind not in DNA_CONFIGS:
            raise ValueError(f"model.dna.model_type: unknown DNA tower {kind!r}; registered: {sorted(DNA_CONFIGS)}")
        config_class, name = DNA_CONFIGS[kind], f"the {kind} DNA tower"
    else:
        config_class, name = {"image": CLIBDImageConfig, "text": CLIBDTextConfig}[tower], f"the {tower} tower"
    unknown = sorted(set(values) - set(config_class.__dataclass_fields__) - {"model_type"})
    if unknown:
        raise ValueError(f"model.{tower}: unknown key(s) {unknown} for {name} ({config_class.__name__})")
