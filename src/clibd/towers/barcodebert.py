"""The BarcodeBERT DNA tower (the paper's): a BERT over non-overlapping k-mers of a barcode.

Usage:
    config = CLIBDConfig(dna_config={"model_type": "clibd_barcodebert", "pooling": "mean"})
    tower = CLIBDBarcodeBERTTower(config.dna_config, projection_dim=768)
    embeds = tower(dna_input_ids=ids, dna_attention_mask=mask)        # [B, 768], unit norm
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedConfig
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from .parts import EmbeddingPart, whole

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
    `pretrained_model_name_or_path`: a BarcodeBERT checkpoint that `from_pretrained_towers` loads.

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
            pooled = self.projection(self.head_transform(hidden)).softmax(dim=-1).mean(dim=1)
        else:
            hidden = self.bert(input_ids=dna_input_ids, attention_mask=dna_attention_mask).last_hidden_state
            pooled = self.projection(masked_mean(hidden, dna_attention_mask))
        return F.normalize(pooled, dim=-1)

    def embedding_parts(self) -> list[EmbeddingPart]:
        return whole(self.projection.out_features)

    def load_pretrained(self, source: str) -> None:
        """Start the BERT from a BarcodeBERT checkpoint (`pretrained_model_name_or_path`)."""
        load_pretrained_bert(self.bert, source)

    def encoder_modules(self) -> list[nn.Module]:
        """The pretrained part (frozen by `train.freeze`, adapted by LoRA): all but the projection."""
        return [self.bert] + ([self.head_transform] if self.pooling == "compat" else [])
