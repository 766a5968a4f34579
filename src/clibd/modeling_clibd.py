"""CLIBD: image (timm ViT), DNA (a registered kind, `clibd.towers`) and taxonomy-text (BERT) towers
in one embedding space.

Usage:
    model = CLIBDModel.from_pretrained("path/or/hub-id")
    out = model(**processor(images=photos, barcodes=barcodes), return_loss=True)
    out.image_embeds, out.dna_embeds, out.logits_image_dna, out.loss
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_clibd import CLIBDConfig, CLIBDTextConfig
from .constants import MODALITIES
from .lora import add_bert_lora, add_vit_lora
from .loss import contrastive_loss, full_precision, modality_pairs
from .towers import create_dna_tower
from .towers.barcodebert import load_pretrained_bert, masked_mean
from .towers.parts import EmbeddingPart, whole


@dataclass
class CLIBDOutput(ModelOutput):
    """Embeddings of the modalities given (L2-normalised; each equal to `get_<modality>_features`),
    the scaled similarity logits of every present pair (rows = first modality) and, when asked,
    the contrastive loss. A DNA embedding wider than `projection_dim` (a k-mer-profile tower with
    a sketch or aligned branches: DNA-only models) has no pairwise logits."""

    loss: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    dna_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logits_image_dna: torch.Tensor | None = None
    logits_image_text: torch.Tensor | None = None
    logits_dna_text: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


class CLIBDTextTower(nn.Module):
    """BERT over the taxonomy string, mean-pooled (unmasked in `compat` mode) and projected."""

    def __init__(self, config: CLIBDTextConfig, projection_dim: int):
        super().__init__()
        self.pooling = config.pooling
        self.bert = BertModel(config.to_bert_config(), add_pooling_layer=False)
        self.projection = nn.Linear(config.hidden_size, projection_dim)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        pooled = hidden.mean(dim=1) if self.pooling == "compat" else masked_mean(hidden, attention_mask)
        return self.projection(pooled)


def create_image_encoder(config: CLIBDConfig, pretrained: bool = False) -> nn.Module:
    """The timm image model with its classifier reset to the projection dim (CLS-token pooling)."""
    import timm  # here, not at the top: a DNA-only model (identify, index) never pays timm's import (~3 s)

    image_config = config.image_config
    return timm.create_model(
        image_config.timm_model_name,
        pretrained=pretrained,
        num_classes=config.projection_dim,
        **image_config.timm_kwargs,
    )


def _unit(features: torch.Tensor) -> torch.Tensor:
    """A tower's output L2-normalised in float32, autocast or not: under CUDA autocast the official
    `F.normalize` of bf16 features already returns float32 (its norm runs in float32); casting first
    makes every device (CPU autocast keeps bf16) give those same features."""
    return F.normalize(features.float(), dim=-1)


class CLIBDPreTrainedModel(PreTrainedModel):
    config_class = CLIBDConfig
    base_model_prefix = "clibd"
    main_input_name = "dna_input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CLIBDModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        if callable(getattr(module, "init_tower_weights", None)):
            # parameters transformers' default initialisation does not know (e.g. the positional branch)
            module.init_tower_weights()


class CLIBDModel(CLIBDPreTrainedModel):
    """Three towers and a trainable temperature; any subset of modalities per call.

    Usage:
        model = CLIBDModel(CLIBDConfig.tiny())
        dna = model.get_dna_features(dna_input_ids=ids)          # [B, projection_dim], unit norm
    """

    def __init__(self, config: CLIBDConfig):
        super().__init__(config)
        self.image_encoder = create_image_encoder(config) if "image" in config.modalities else None
        self.dna_encoder = (create_dna_tower(config.dna_config, config.projection_dim)
                            if "dna" in config.modalities else None)
        self.text_encoder = (CLIBDTextTower(config.text_config, config.projection_dim)
                             if "text" in config.modalities else None)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()
        if config.lora_rank:  # a saved LoRA model: the adapters exist before its weights load
            self._add_adapters(config.lora_rank)

    @classmethod
    def from_pretrained_towers(cls, config: CLIBDConfig) -> CLIBDModel:
        """A new model whose towers start from pretrained weights, as the paper's training does.

        The image tower loads timm's weights when `image_config.pretrained`; the DNA and text BERTs
        load from `pretrained_model_name_or_path` (a local directory or a Hub id) when set; the text
        config takes the architecture of the checkpoint it loads. Projections start at random.
        """
        text_source = config.text_config.pretrained_model_name_or_path
        if "text" in config.modalities and text_source:
            config.text_config.update_from_bert_config(AutoConfig.from_pretrained(text_source))
        lora_rank, config.lora_rank = config.lora_rank, None  # adapters go on the pretrained weights
        model = cls(config)
        if model.image_encoder is not None and config.image_config.pretrained:
            model.image_encoder = create_image_encoder(config, pretrained=True)
        if model.text_encoder is not None and text_source:
            load_pretrained_bert(model.text_encoder.bert, text_source)
        dna_source = getattr(config.dna_config, "pretrained_model_name_or_path", None)
        if model.dna_encoder is not None and dna_source:  # a tower kind that starts from weights loads them
            model.dna_encoder.load_pretrained(dna_source)
        if lora_rank:
            model.add_lora(lora_rank)
        return model

    def encoder_modules(self, tower: str) -> list[nn.Module]:
        """The pretrained part of a tower (all but its projection into the shared space; for the
        image tower the timm model, whose `head` is that projection)."""
        if tower == "image":
            return [self._tower("image")]
        module = self._tower(tower)
        return module.encoder_modules() if tower == "dna" else [module.bert]

    def add_lora(self, rank: int) -> dict[str, int]:
        """Add rank-`rank` LoRA adapters to the attention of every tower as the official LoRA run
        (`clibd.lora`: peft on BERT query and value; separate q and v adapters on timm's fused qkv,
        k untouched) and record `config.lora_rank`, so that `save_pretrained` / `from_pretrained`
        keep them. Freezes nothing (`clibd.training.trainable` does). Returns the adapted layers
        per tower.

        Usage:
            model.add_lora(4)     # {"image": 12, "dna": 24, "text": 8}
        """
        if self.config.lora_rank is not None:
            raise ValueError(f"this model already has rank-{self.config.lora_rank} LoRA adapters")
        counts = self._add_adapters(rank)
        self.config.lora_rank = rank
        return counts

    def _add_adapters(self, rank: int) -> dict[str, int]:
        counts = {}
        for tower in (t for t in MODALITIES if getattr(self, f"{t}_encoder") is not None):
            add = add_vit_lora if tower == "image" else add_bert_lora
            counts[tower] = sum(add(module, rank) for module in self.encoder_modules(tower))
        return counts

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, strict: bool = True, **kwargs):
        """Load a saved CLIBD model (safetensors). With `strict` (the default) a checkpoint whose
        tensors are missing, unexpected or of another shape than the config says is an error that
        names them, instead of a model with silently re-initialised weights."""
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs["output_loading_info"] = True
        if strict:  # let transformers finish loading so that the error below can name every tensor
            kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        problems = []
        if info.get("mismatched_keys"):
            problems.append("shape mismatch: " + ", ".join(
                f"{key} (checkpoint {tuple(saved)}, model {tuple(expected)})"
                for key, saved, expected in info["mismatched_keys"]))
        if info.get("missing_keys"):
            problems.append("missing from the checkpoint: " + ", ".join(sorted(info["missing_keys"])))
        if info.get("unexpected_keys"):
            problems.append("not in the model: " + ", ".join(sorted(info["unexpected_keys"])))
        if strict and problems:
            raise ValueError(f"checkpoint {pretrained_model_name_or_path} does not match its config: "
                             + "; ".join(problems))
        return (model, info) if wants_info else model

    # --- features -------------------------------------------------------------------------------
    def embedding_parts(self, modality: str) -> list[EmbeddingPart]:
        """The parts of `get_<modality>_features` (`clibd.towers.parts`): one, except for DNA towers
        that declare several (e.g. the k-mer-profile tower's branches and sketch)."""
        if modality == "dna":
            return self._tower("dna").embedding_parts()
        return whole(self.config.projection_dim)

    def embedding_dim(self, modality: str) -> int:
        """Width of `get_<modality>_features`: `projection_dim` unless the DNA tower has several parts."""
        return sum(part.dim for part in self.embedding_parts(modality))

    def _tower(self, name: str) -> nn.Module:
        tower = getattr(self, f"{name}_encoder")
        if tower is None:
            raise ValueError(f"this model has no {name} tower (modalities: {self.config.modalities})")
        return tower

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, projection_dim] from `pixel_values` [B, 3, H, W]."""
        return _unit(self._tower("image")(pixel_values))

    def get_dna_features(self, dna_input_ids: torch.Tensor | None = None,
                         dna_attention_mask: torch.Tensor | None = None, **dna_inputs: torch.Tensor) -> torch.Tensor:
        """L2-normalised barcode embeddings [B, embedding_dim("dna")] from what the processor made
        for this model's DNA tower: k-mer ids [B, tokens] (BarcodeBERT), or `dna_profile` k-mer
        count profiles [B, 4^k] and `dna_aligned` barcodes [B, 4 x 658] (k-mer-profile tower), or
        whatever `dna_*` inputs another registered tower reads. A missing input the tower needs is
        a ValueError saying which.

        Usage:
            embeds = model.get_dna_features(**processor(barcodes=["ACGT..."]))
        """
        # DNA towers normalise their own output (part by part where they have several): only cast it.
        return self._tower("dna")(dna_input_ids=dna_input_ids, dna_attention_mask=dna_attention_mask,
                                  **dna_inputs).float()

    def get_text_features(
        self,
        text_input_ids: torch.Tensor,
        text_attention_mask: torch.Tensor | None = None,
        text_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L2-normalised taxonomy-text embeddings [B, projection_dim]."""
        return _unit(self._tower("text")(text_input_ids, text_attention_mask, text_token_type_ids))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        text_input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        text_token_type_ids: torch.Tensor | None = None,
        return_loss: bool = False,
        **dna_inputs: torch.Tensor | None,
    ) -> CLIBDOutput:
        """Embed whichever modalities are given (`dna_*` inputs: those of the DNA tower, see
        `get_dna_features`); logits for every present pair; loss if asked."""
        unknown = sorted(name for name in dna_inputs if not name.startswith("dna_"))
        if unknown:
            raise TypeError(f"CLIBDModel.forward got unexpected arguments {unknown}")
        dna_inputs = {name: value for name, value in dna_inputs.items() if value is not None}
        embeds = {
            "image": self.get_image_features(pixel_values) if pixel_values is not None else None,
            "dna": self.get_dna_features(**dna_inputs) if dna_inputs else None,
            "text": (self.get_text_features(text_input_ids, text_attention_mask, text_token_type_ids)
                     if text_input_ids is not None else None),
        }
        if all(value is None for value in embeds.values()):
            raise ValueError("give at least one of pixel_values, dna_* inputs (the processor's) or text_input_ids")
        present = {name: value for name, value in embeds.items() if value is not None}
        with full_precision(self.logit_scale.device):  # the logits in float32 even under autocast, as the loss
            scale = self.logit_scale.float().exp()
            logits = {f"logits_{a}_{b}": scale * present[a] @ present[b].T for a, b in modality_pairs(list(present))}
        loss = contrastive_loss(present, self.logit_scale) if return_loss else None
        return CLIBDOutput(
            loss=loss,
            image_embeds=embeds["image"],
            dna_embeds=embeds["dna"],
            text_embeds=embeds["text"],
            logit_scale=self.logit_scale,
            **logits,
        )


AutoConfig.register(CLIBDConfig.model_type, CLIBDConfig)
AutoModel.register(CLIBDConfig, CLIBDModel)
