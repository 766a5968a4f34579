"""CLIBD: image (timm ViT), DNA (BarcodeBERT) and taxonomy-text (BERT) towers in one embedding space.

Usage:
    model = CLIBDModel.from_pretrained("path/or/hub-id")
    out = model(**processor(images=photos, barcodes=barcodes), return_loss=True)
    out.image_embeds, out.dna_embeds, out.logits_image_dna, out.loss
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform
from transformers.utils import ModelOutput

from .configuration_clibd import CLIBDConfig, CLIBDDNAConfig, CLIBDTextConfig
from .loss import contrastive_loss, modality_pairs
from .processing.alignment import COI_BARCODE_LENGTH


@dataclass
class CLIBDOutput(ModelOutput):
    """Embeddings (L2-normalised) of the modalities given, the scaled similarity logits of every
    present pair (rows = first modality) and, when asked, the contrastive loss."""

    loss: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    dna_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logits_image_dna: torch.Tensor | None = None
    logits_image_text: torch.Tensor | None = None
    logits_dna_text: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class CLIBDDNATower(nn.Module):
    """BERT over k-mer tokens, pooled the official way (`compat`) or by masked mean (`mean`)."""

    def __init__(self, config: CLIBDDNAConfig, projection_dim: int):
        super().__init__()
        self.pooling = config.pooling
        bert_config = config.to_bert_config()
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        if self.pooling == "compat":
            # The official tower keeps BERT's MLM transform and replaces the decoder by this projection.
            self.head_transform = BertPredictionHeadTransform(bert_config)
        self.projection = nn.Linear(config.hidden_size, projection_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "compat":
            # Official behaviour: no attention mask, softmax over features, mean over all tokens.
            hidden = self.bert(input_ids=input_ids).last_hidden_state
            return self.projection(self.head_transform(hidden)).softmax(dim=-1).mean(dim=1)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.projection(masked_mean(hidden, attention_mask))


class CLIBDPositionalBranch(nn.Module):
    """Cosine of an aligned barcode's one-hot with a learned weight per position and a 4 x 4 base
    map per codon position: few parameters, so it learns what separates genera in general rather
    than memorising the genera it was trained on."""

    def __init__(self):
        super().__init__()
        self.log_weight = nn.Parameter(torch.empty(COI_BARCODE_LENGTH))
        self.base_map = nn.Parameter(torch.empty(3, 4, 4))  # for the 1st, 2nd, 3rd base of a codon
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start as the plain cosine of the one-hot: every weight 1, every base map the identity."""
        init.zeros_(self.log_weight)
        init.copy_(self.base_map, torch.eye(4).repeat(3, 1, 1))

    @staticmethod
    def codon_positions(device: torch.device | None = None) -> torch.Tensor:
        """[658] 0, 1, 2 for the 1st, 2nd, 3rd base of a codon (the region starts with the last base of one)."""
        return (torch.arange(COI_BARCODE_LENGTH, device=device) - 1) % 3

    def forward(self, dna_aligned: torch.Tensor) -> torch.Tensor:
        onehot = dna_aligned.view(-1, COI_BARCODE_LENGTH, 4)
        mapped = torch.einsum("bpi,pij->bpj", onehot, self.base_map[self.codon_positions(onehot.device)])
        return F.normalize((mapped * self.log_weight.exp()[None, :, None]).flatten(1), dim=-1)


class CLIBDKmerProfileTower(nn.Module):
    """MLP over L2-normalised overlapping k-mer counts (`dna_profile`, from the processor), an
    optional fixed random projection of the counts (`profile_sketch_dim`; a saved buffer, never
    trained) and, with `profile_aligned`, two branches over the aligned barcode (`dna_aligned`)."""

    def __init__(self, config: CLIBDDNAConfig, projection_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4**config.profile_kmer_size, config.profile_hidden_size), nn.GELU())
        self.projection = nn.Linear(config.profile_hidden_size, projection_dim)
        self.sketch_weight = config.profile_sketch_weight
        sketch = None
        if config.profile_sketch_dim:
            generator = torch.Generator().manual_seed(0)
            sketch = torch.randn(4**config.profile_kmer_size, config.profile_sketch_dim, generator=generator)
        self.register_buffer("sketch", sketch)
        self.aligned_mlp = self.positional = None
        if config.profile_aligned:
            self.aligned_mlp = nn.Sequential(nn.Linear(4 * COI_BARCODE_LENGTH, config.profile_hidden_size), nn.GELU(),
                                             nn.Linear(config.profile_hidden_size, projection_dim))
            self.positional = CLIBDPositionalBranch()

    def forward(self, dna_profile: torch.Tensor) -> torch.Tensor:
        return self.projection(self.mlp(dna_profile))

    def branch_widths(self) -> list[int]:
        """Widths of the learned branches, in the order of `branches`."""
        width = self.projection.out_features
        return [width] + ([width, 4 * COI_BARCODE_LENGTH] if self.positional is not None else [])

    def branches(self, dna_profile: torch.Tensor, dna_aligned: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each learned branch's unit embedding: the k-mer MLP, then the aligned MLP and the positional model."""
        parts = [F.normalize(self(dna_profile), dim=-1)]
        if self.positional is not None:
            if dna_aligned is None:
                raise ValueError("this model's DNA tower also reads aligned barcodes: pass dna_aligned (the "
                                 "processor of this model makes it)")
            parts += [F.normalize(self.aligned_mlp(F.normalize(dna_aligned, dim=-1)), dim=-1),
                      self.positional(dna_aligned)]
        return parts

    def retrieval_embedding(self, dna_profile: torch.Tensor, dna_aligned: torch.Tensor | None = None) -> torch.Tensor:
        """Unit vectors whose cosines are the weighted mean of the parts' cosines: the learned
        branches (weight 1 each) and the sketch (`profile_sketch_weight`)."""
        parts = self.branches(dna_profile, dna_aligned)
        weights = [1.0] * len(parts)
        if self.sketch is not None:
            parts.insert(1, F.normalize(dna_profile @ self.sketch.to(dna_profile.dtype), dim=-1))
            weights.insert(1, self.sketch_weight)
        if len(parts) == 1:
            return parts[0]
        return torch.cat([w**0.5 * part for w, part in zip(weights, parts, strict=True)], dim=-1) / sum(weights) ** 0.5


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
    image_config = config.image_config
    return timm.create_model(
        image_config.timm_model_name,
        pretrained=pretrained,
        num_classes=config.projection_dim,
        **image_config.timm_kwargs,
    )


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
        if isinstance(module, CLIBDPositionalBranch):
            module.reset_parameters()


class CLIBDModel(CLIBDPreTrainedModel):
    """Three towers and a trainable temperature; any subset of modalities per call.

    Usage:
        model = CLIBDModel(CLIBDConfig.tiny())
        dna = model.get_dna_features(dna_input_ids=ids)          # [B, projection_dim], unit norm
    """

    def __init__(self, config: CLIBDConfig):
        super().__init__(config)
        self.image_encoder = create_image_encoder(config) if "image" in config.modalities else None
        dna_tower = CLIBDKmerProfileTower if config.dna_config.encoder == "kmer_profile" else CLIBDDNATower
        self.dna_encoder = dna_tower(config.dna_config, config.projection_dim) if "dna" in config.modalities else None
        self.text_encoder = (CLIBDTextTower(config.text_config, config.projection_dim)
                             if "text" in config.modalities else None)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

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
        model = cls(config)
        if model.image_encoder is not None and config.image_config.pretrained:
            model.image_encoder = create_image_encoder(config, pretrained=True)
        if model.text_encoder is not None and text_source:
            _load_pretrained_bert(model.text_encoder.bert, text_source)
        dna_source = config.dna_config.pretrained_model_name_or_path
        if model.dna_encoder is not None and dna_source:
            _load_pretrained_bert(model.dna_encoder.bert, dna_source)
        return model

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
    def embedding_dim(self, modality: str) -> int:
        """Width of `get_<modality>_features`: `projection_dim`, plus the sketch and the aligned
        branches of a k-mer-profile DNA tower that has them."""
        if modality != "dna" or not isinstance(self.dna_encoder, CLIBDKmerProfileTower):
            return self.config.projection_dim
        return sum(self.dna_encoder.branch_widths()) + self.config.dna_config.profile_sketch_dim

    def novelty_dim(self, modality: str) -> int:
        """How many leading dimensions of `get_<modality>_features` score novelty ("does the
        library hold this species?"); all of them except with `profile_aligned`, where only the
        k-mer parts (learned k-mer branch and sketch) do. The aligned branches place a new species
        better but score partly covered barcodes of known species low (their missing positions
        cost cosine), so they would blur the novel flag. Cut, then re-normalise (`novelty_part`)."""
        if modality == "dna" and isinstance(self.dna_encoder, CLIBDKmerProfileTower) \
                and self.dna_encoder.positional is not None:
            return self.config.projection_dim + self.config.dna_config.profile_sketch_dim
        return self.embedding_dim(modality)

    def split_dna_embeds(self, dna_embeds: torch.Tensor) -> list[torch.Tensor]:
        """The training-time DNA embeddings (`forward`'s `dna_embeds`) cut into the tower's learned
        branches, each a unit vector with its own loss: one part except for `profile_aligned`."""
        if not isinstance(self.dna_encoder, CLIBDKmerProfileTower):
            return [dna_embeds]
        return list(dna_embeds.split(self.dna_encoder.branch_widths(), dim=-1))

    def _tower(self, name: str) -> nn.Module:
        tower = getattr(self, f"{name}_encoder")
        if tower is None:
            raise ValueError(f"this model has no {name} tower (modalities: {self.config.modalities})")
        return tower

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, projection_dim] from `pixel_values` [B, 3, H, W]."""
        return F.normalize(self._tower("image")(pixel_values), dim=-1)

    def get_dna_features(
        self,
        dna_input_ids: torch.Tensor | None = None,
        dna_attention_mask: torch.Tensor | None = None,
        dna_profile: torch.Tensor | None = None,
        dna_aligned: torch.Tensor | None = None,
        with_sketch: bool = True,
    ) -> torch.Tensor:
        """L2-normalised barcode embeddings [B, projection_dim] from k-mer ids [B, tokens] (BERT
        tower) or k-mer count profiles [B, 4^k] (`kmer_profile` tower). A `kmer_profile` tower with
        a sketch (`profile_sketch_dim`) returns [B, projection_dim + profile_sketch_dim] for
        retrieval, or the learned part alone with `with_sketch=False` (what training sees). With
        `profile_aligned` it also reads `dna_aligned` [B, 4 x 658] and both widen by the aligned
        branches (`embedding_dim`; `split_dna_embeds` cuts the training-time one into branches).

        Usage:
            embeds = model.get_dna_features(**processor(barcodes=["ACGT..."]))
        """
        tower = self._tower("dna")
        if isinstance(tower, CLIBDKmerProfileTower):
            if dna_profile is None:
                raise ValueError("this model's DNA tower reads k-mer profiles: pass dna_profile (the processor "
                                 "of this model makes it)")
            if with_sketch:
                return tower.retrieval_embedding(dna_profile, dna_aligned)
            return torch.cat(tower.branches(dna_profile, dna_aligned), dim=-1)
        if dna_input_ids is None:
            raise ValueError("this model's DNA tower reads k-mer token ids: pass dna_input_ids")
        return F.normalize(tower(dna_input_ids, dna_attention_mask), dim=-1)

    def get_text_features(
        self,
        text_input_ids: torch.Tensor,
        text_attention_mask: torch.Tensor | None = None,
        text_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L2-normalised taxonomy-text embeddings [B, projection_dim]."""
        return F.normalize(self._tower("text")(text_input_ids, text_attention_mask, text_token_type_ids), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        dna_input_ids: torch.Tensor | None = None,
        dna_attention_mask: torch.Tensor | None = None,
        dna_profile: torch.Tensor | None = None,
        dna_aligned: torch.Tensor | None = None,
        text_input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        text_token_type_ids: torch.Tensor | None = None,
        return_loss: bool = False,
        **kwargs,
    ) -> CLIBDOutput:
        """Embed whichever modalities are given; logits for every present pair; loss if asked."""
        embeds = {
            "image": self.get_image_features(pixel_values) if pixel_values is not None else None,
            "dna": (self.get_dna_features(dna_input_ids, dna_attention_mask, dna_profile, dna_aligned, with_sketch=False)
                    if dna_input_ids is not None or dna_profile is not None else None),
            "text": (self.get_text_features(text_input_ids, text_attention_mask, text_token_type_ids)
                     if text_input_ids is not None else None),
        }
        if all(value is None for value in embeds.values()):
            raise ValueError("give at least one of pixel_values, dna_input_ids or text_input_ids")
        present = {name: value for name, value in embeds.items() if value is not None}
        scale = self.logit_scale.exp()
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


def _load_pretrained_bert(target: BertModel, source: str) -> None:
    """Copy the encoder weights of a pretrained BERT (local dir or Hub id) into `target`; its
    pooler is not used. Any tensor of `target` left without a weight is an error."""
    state = {k: v for k, v in AutoModel.from_pretrained(source).state_dict().items() if not k.startswith("pooler.")}
    result = target.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"pretrained BERT {source} does not fit the tower: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")


AutoConfig.register(CLIBDConfig.model_type, CLIBDConfig)
AutoModel.register(CLIBDConfig, CLIBDModel)
