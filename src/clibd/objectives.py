"""Training objectives as objects, built from the train config by one factory.

An objective turns a batch's embeddings (and labels, if it needs them) into the loss. The training
loop and gradient caching both call it, so every objective works with gradient caching.

Usage:
    objective = create_objective(config.train, model)    # model: the unwrapped CLIBDModel
    collator = ContrastiveCollator(processor, modalities, train=True, label_ranks=objective.label_ranks)
    inputs, labels = split_labels(batch)
    output = model(**inputs)
    loss = objective(output_embeds(output), labels, output.logit_scale)

Objectives (`train.objective`):
- `clip` (`PairwiseContrastive`): the paper's symmetric InfoNCE over every pair of modalities,
  with the model's learned temperature.
- `supcon` (`SupervisedContrastive`): a supervised contrastive loss on the DNA embedding, with
  positives = records sharing a label at a rank, weighted per rank (`supcon_weights`) at a fixed
  temperature (`supcon_temperature`), applied to each trained part of the embedding (a k-mer-profile
  tower's fixed sketch has no loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .constants import MODALITIES
from .data.collate import LABEL_PREFIX
from .loss import contrastive_loss, supervised_contrastive_loss
from .towers.parts import EmbeddingPart, split_parts

if TYPE_CHECKING:
    from .modeling_clibd import CLIBDModel

OBJECTIVES = ("clip", "supcon")


class ObjectiveConfig(Protocol):
    """What `create_objective` reads from the `train` section of an experiment config."""

    objective: str
    supcon_weights: Mapping[str, float]
    supcon_temperature: float


class Objective:
    """A training loss over a batch's embeddings. Subclasses say which labels they need and
    whether the model's temperature (`logit_scale`) trains with them."""

    label_ranks: tuple[str, ...] = ()  # ranks the collator must add as `labels_<rank>`
    trains_temperature: bool = True  # False: the loop freezes `logit_scale`

    def __call__(self, embeds: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
                 logit_scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PairwiseContrastive(Objective):
    """The paper's CLIP loss over every pair of present modalities (`clibd.loss.contrastive_loss`).

    Usage:
        loss = PairwiseContrastive()({"dna": d, "text": t}, {}, model.logit_scale)
    """

    def __call__(self, embeds: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
                 logit_scale: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(embeds, logit_scale)

    def __repr__(self) -> str:
        return "PairwiseContrastive()"


@dataclass(frozen=True)
class SupervisedContrastive(Objective):
    """Sum over the trained parts of `modality`'s embedding and over ranks of weight x the
    supervised contrastive loss whose positives share the label at that rank.

    Usage:
        objective = SupervisedContrastive({"species": 1.0, "genus": 0.5}, 0.1, model.embedding_parts("dna"))
        loss = objective({"dna": dna_embeds}, {"species": s, "genus": g}, model.logit_scale)
    """

    weights: Mapping[str, float]
    temperature: float
    parts: Sequence[EmbeddingPart]
    modality: str = "dna"
    trains_temperature = False  # no pairwise logits: the model's temperature is not used

    @property
    def label_ranks(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def __call__(self, embeds: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
                 logit_scale: torch.Tensor) -> torch.Tensor:
        units = split_parts(embeds[self.modality], self.parts)
        trained = [unit for unit, part in zip(units, self.parts, strict=True) if part.trained]
        return sum(weight * supervised_contrastive_loss(unit, labels[rank], self.temperature)
                   for unit in trained for rank, weight in self.weights.items())


def create_objective(train_config: ObjectiveConfig, model: CLIBDModel) -> Objective:
    """The objective `train_config.objective` names, shaped by the model's embedding parts.

    Usage:
        objective = create_objective(config.train, model)
    """
    if train_config.objective == "clip":
        return PairwiseContrastive()
    if train_config.objective == "supcon":
        return SupervisedContrastive(dict(train_config.supcon_weights), train_config.supcon_temperature,
                                     tuple(model.embedding_parts("dna")))
    raise ValueError(f"unknown objective {train_config.objective!r}; known: {OBJECTIVES}")


def split_labels(batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A collated batch as (model inputs, labels by rank): the labels are not model inputs.

    Usage:
        inputs, labels = split_labels(batch)     # labels: {"species": LongTensor [B], ...}
    """
    inputs = {key: value for key, value in batch.items() if not key.startswith(LABEL_PREFIX)}
    labels = {key[len(LABEL_PREFIX):]: value for key, value in batch.items() if key.startswith(LABEL_PREFIX)}
    return inputs, labels


def output_embeds(output: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The embeddings of a model output by modality (those present), in float32 for the loss.

    Usage:
        embeds = output_embeds(model(**inputs))   # {"dna": ..., "text": ...}
    """
    embeds = {modality: output.get(f"{modality}_embeds") for modality in MODALITIES}
    return {modality: value.float() for modality, value in embeds.items() if value is not None}
