"""The supervised seen-species classifier of IS+DU's linear variant (the authors'
`scripts/method_linear.py`): a linear layer over image features, one output per seen species,
trained with cross-entropy, AdamW and a one-cycle schedule on the `train_seen` records.

Two ways to train it:

- `train_linear_classifier`: the head alone, on frozen CLIBD image embeddings (seconds on a CPU;
  clibd's default, it measures the CLIBD embedding itself);
- `fine_tune_linear_classifier`: the authors' recipe, the head and a copy of the image encoder
  fine-tuned together (AdamW 1e-4, 15 epochs, batch 150): a GPU training job.

Usage:
    classifier = train_linear_classifier(embed("train_seen", train, "image"), labels(train))
    scores, labels_by_rank = classifier.predict(classifier.features(queries_dataset, query_embeddings), 5)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import DataLoader

from ..constants import RANKS
from ..data.collate import ContrastiveCollator
from ..modeling_clibd import CLIBDModel
from ..processing import CLIBDProcessor


@dataclass
class LinearClassifier:
    """A linear layer over image features, one output per seen species; `classes[i]` is output
    i's taxonomy ({rank: label}). With `encoder` (a fine-tuned image tower and the `processor`
    that feeds it) the features are that encoder's outputs for the records' images, else the
    CLIBD image embeddings.

    Usage:
        scores, labels = classifier.predict(classifier.features(dataset, embeddings), k=5)
    """

    layer: torch.nn.Linear
    classes: list[dict[str, str]]
    encoder: torch.nn.Module | None = None
    processor: CLIBDProcessor | None = None
    batch_size: int = 150

    @torch.no_grad()
    def features(self, dataset: datasets.Dataset, embeddings: torch.Tensor) -> torch.Tensor:
        """What the head reads for `dataset`'s records: `embeddings` (their CLIBD image
        embeddings), or the fine-tuned encoder's outputs for their images.

        Usage:
            features = classifier.features(queries_dataset, query_embeddings)   # [Q, in_features]
        """
        if self.encoder is None:
            return embeddings
        self.encoder.eval()
        device = next(self.encoder.parameters()).device
        loader = DataLoader(dataset, batch_size=self.batch_size,
                            collate_fn=ContrastiveCollator(self.processor, ["image"]))
        chunks = [self.encoder(batch["pixel_values"].to(device)).float().cpu() for batch in loader]
        return torch.cat(chunks) if chunks else torch.empty(0, self.layer.in_features)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, dict[str, list[list[str]]]]:
        """Top-k softmax confidences [Q, k] and, per rank, the top-k classes' labels.

        Usage:
            scores, labels_by_rank = classifier.predict(features, k=5); labels_by_rank["species"][0]
        """
        layer = self.layer.cpu()
        probabilities = torch.softmax(layer(features.float().cpu()), dim=-1)
        values, indices = torch.topk(probabilities, min(k, len(self.classes)), dim=1)
        top = indices.tolist()
        return values, {rank: [[self.classes[j][rank] for j in row] for row in top] for rank in RANKS}


def _classes(taxonomy: dict[str, list[str]]) -> tuple[list[dict[str, str]], list[int], torch.Tensor]:
    """The seen species in sorted order with the taxonomy of each one's first record, the rows
    that have a species, and their class indices (the authors' `load_all_seen_species_name_and_create_label_map`)."""
    species = sorted({s for s in taxonomy["species"] if s})
    if not species:
        raise ValueError("the linear IS+DU classifier needs training records with a species label")
    first: dict[str, int] = {}
    for i, s in enumerate(taxonomy["species"]):
        first.setdefault(s, i)
    index = {s: i for i, s in enumerate(species)}
    rows = [i for i, s in enumerate(taxonomy["species"]) if s]
    return ([{rank: taxonomy[rank][first[s]] for rank in RANKS} for s in species], rows,
            torch.tensor([index[taxonomy["species"][i]] for i in rows]))


def _seeded_linear(width: int, classes: int, seed: int) -> torch.nn.Linear:
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's generator
        torch.manual_seed(seed)
        return torch.nn.Linear(width, classes)


def train_linear_classifier(features: torch.Tensor, taxonomy: dict[str, list[str]], epochs: int = 15,
                            batch_size: int = 150, lr: float = 1e-3, seed: int = 0) -> LinearClassifier:
    """A linear species classifier on frozen image embeddings [N, D] of seen-species records
    (`taxonomy`: {rank: labels}); records without a species are left out. Cross-entropy, AdamW
    and a one-cycle schedule, as the authors' `method_linear.py` (batch 150, 15 epochs); only the
    head learns, so its learning rate is 1e-3 (theirs, 1e-4, is for the encoder and head together).

    Usage:
        classifier = train_linear_classifier(embed("train_seen", splits["train_seen"], "image"),
                                             labels(splits["train_seen"]))
    """
    classes, rows, y = _classes(taxonomy)
    x = features[rows].float()
    layer = _seeded_linear(x.shape[1], len(classes), seed)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=max(epochs * -(-len(rows) // batch_size), 1))
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(rows), generator=generator).split(batch_size):
                loss = torch.nn.functional.cross_entropy(layer(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return LinearClassifier(layer.eval(), classes)


def fine_tune_linear_classifier(model: CLIBDModel, processor: CLIBDProcessor, dataset: datasets.Dataset,
                                taxonomy: dict[str, list[str]], epochs: int = 15, batch_size: int = 150,
                                lr: float = 1e-4, seed: int = 0) -> LinearClassifier:
    """The authors' recipe: a copy of `model`'s image tower (its projected, unnormalised output)
    and a linear head over the seen species, fine-tuned together on `dataset`'s images
    (`taxonomy`: their labels; records without a species left out) with cross-entropy, AdamW
    and a one-cycle schedule (lr 1e-4, 15 epochs, batch 150), on the model's device. `model` is
    left as it was.

    Usage:
        classifier = fine_tune_linear_classifier(model, processor, train, labels(train))
    """
    classes, rows, y = _classes(taxonomy)
    device = next(model.parameters()).device
    encoder = copy.deepcopy(model.image_encoder).to(device).train()
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)
    layer = _seeded_linear(model.embedding_dim("image"), len(classes), seed).to(device)
    parameters = [*encoder.parameters(), *layer.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=max(epochs * -(-len(rows) // batch_size), 1))
    records = dataset.select(rows).add_column("class_index", y.tolist())
    collate = ContrastiveCollator(processor, ["image"])
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                batch = [records[i] for i in order[start:start + batch_size]]
                pixels = collate(batch)["pixel_values"].to(device)
                target = torch.tensor([r["class_index"] for r in batch], device=device)
                loss = torch.nn.functional.cross_entropy(layer(encoder(pixels)), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return LinearClassifier(layer.eval(), classes, encoder.eval(), processor, batch_size)
