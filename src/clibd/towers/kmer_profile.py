"""The k-mer-profile DNA tower (clibd's, for species that no reference holds; not the paper's).

A barcode is read two ways. As overlapping `kmer_size`-mer counts (L2-normalised): an MLP, plus
an optional fixed random projection of the counts (the *sketch*, a saved buffer never trained,
whose cosines approximate raw k-mer-profile cosines). And, with `aligned`, placed on the 658
positions of the COI-5P region (`clibd.processing.aligned_onehot`): an MLP over the one-hot and a
positional model (a learned weight per position and a 4 x 4 base map per codon position). Each
branch is a unit vector; the embedding concatenates them so that its cosine is the weighted mean
of theirs. The parts are declared (`embedding_parts`): each learned branch is trained with its own
loss, and the k-mer parts alone score novelty (the aligned ones place a new species better but
score a partly covered barcode of a known species low). Figures: bench/README.md.

Usage:
    config = CLIBDConfig(modalities=["dna"], dna_config={"model_type": "clibd_kmer_profile",
                         "kmer_size": 7, "sketch_dim": 1024, "aligned": True})
    embeds = CLIBDModel(config).get_dna_features(**processor(barcodes=barcodes))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init

from ..processing.alignment import COI_BARCODE_LENGTH
from .parts import EmbeddingPart, combine_parts

ALIGNED_WIDTH = 4 * COI_BARCODE_LENGTH  # one-hot of the 658 COI-5P positions


class CLIBDKmerProfileConfig(PreTrainedConfig):
    """The k-mer-profile DNA tower: overlapping `kmer_size`-mer counts -> Linear(4^k, `hidden_size`)
    -> GELU -> Linear(`hidden_size`, projection_dim); with `sketch_dim` > 0 a fixed random
    projection of the counts to that many dimensions joins the embedding with weight
    `sketch_weight`; with `aligned` an MLP and a positional model over the barcode placed on
    COI-5P join it with weight 1 each. Wider than projection_dim when it has a sketch or aligned
    branches: only for DNA-only models.

    Usage:
        CLIBDConfig(modalities=["dna"], dna_config={"model_type": "clibd_kmer_profile", "kmer_size": 7})
    """

    model_type = "clibd_kmer_profile"
    base_config_key = "dna_config"

    kmer_size: int = 6
    hidden_size: int = 1024
    sketch_dim: int = 0
    sketch_weight: float = 1.0
    aligned: bool = False

    def __post_init__(self, **kwargs):
        if self.kmer_size < 1 or self.hidden_size < 1:
            raise ValueError("dna_config.kmer_size and hidden_size must be >= 1")
        if self.sketch_dim < 0 or self.sketch_weight < 0:
            raise ValueError("dna_config.sketch_dim and sketch_weight must be >= 0")
        super().__post_init__(**kwargs)

    def embedding_dim(self, projection_dim: int) -> int:
        return projection_dim + self.sketch_dim + (projection_dim + ALIGNED_WIDTH if self.aligned else 0)

    def processor_settings(self) -> dict:
        """What `CLIBDProcessor` needs: whole barcodes as k-mer profiles (no length limit), aligned or not."""
        return {"dna_profile_kmer_size": self.kmer_size, "dna_aligned": self.aligned}

    def describe(self) -> str:
        """One line for the model card."""
        return (f"MLP over overlapping {self.kmer_size}-mer counts (hidden {self.hidden_size})"
                + (f" + a fixed {self.sketch_dim}-d random projection of the counts" if self.sketch_dim else "")
                + (" + an MLP and a positional model over the barcode aligned to the COI-5P region (one loss "
                   "per branch; the k-mer parts alone judge novelty in `clibd identify`)" if self.aligned else ""))


class CLIBDPositionalBranch(nn.Module):
    """Cosine of an aligned barcode's one-hot with a learned weight per position and a 4 x 4 base
    map per codon position: few parameters, so it learns what separates genera in general rather
    than memorising the genera it was trained on."""

    def __init__(self):
        super().__init__()
        self.log_weight = nn.Parameter(torch.empty(COI_BARCODE_LENGTH))
        self.base_map = nn.Parameter(torch.empty(3, 4, 4))  # for the 1st, 2nd, 3rd base of a codon
        self.init_tower_weights()

    def init_tower_weights(self) -> None:
        """Start as the plain cosine of the one-hot: every weight 1, every base map the identity
        (called by CLIBDModel's initialisation, which does not know these parameters)."""
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
    """Reads `dna_profile` [B, 4^k] (and, with aligned branches, `dna_aligned` [B, 4 x 658]) from
    the processor; returns the unit embedding whose parts `embedding_parts` lists."""

    config_class = CLIBDKmerProfileConfig

    def __init__(self, config: CLIBDKmerProfileConfig, projection_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4**config.kmer_size, config.hidden_size), nn.GELU())
        self.projection = nn.Linear(config.hidden_size, projection_dim)
        self.sketch_weight = config.sketch_weight
        sketch = None
        if config.sketch_dim:
            generator = torch.Generator().manual_seed(0)
            sketch = torch.randn(4**config.kmer_size, config.sketch_dim, generator=generator)
        self.register_buffer("sketch", sketch)
        self.aligned_mlp = self.positional = None
        if config.aligned:
            self.aligned_mlp = nn.Sequential(nn.Linear(ALIGNED_WIDTH, config.hidden_size), nn.GELU(),
                                             nn.Linear(config.hidden_size, projection_dim))
            self.positional = CLIBDPositionalBranch()

    def embedding_parts(self) -> list[EmbeddingPart]:
        """In order: the k-mer MLP, the sketch (untrained), the aligned MLP and the positional model
        (these two place but do not score novelty)."""
        width = self.projection.out_features
        parts = [EmbeddingPart("kmer_mlp", width)]
        if self.sketch is not None:
            parts.append(EmbeddingPart("kmer_sketch", self.sketch.shape[1], self.sketch_weight, trained=False))
        if self.positional is not None:
            parts += [EmbeddingPart("aligned_mlp", width, scores_novelty=False),
                      EmbeddingPart("positional", ALIGNED_WIDTH, scores_novelty=False)]
        return parts

    def forward(self, dna_profile: torch.Tensor | None = None, dna_aligned: torch.Tensor | None = None,
                **other_inputs: torch.Tensor | None) -> torch.Tensor:
        if dna_profile is None:
            raise ValueError("this model's DNA tower reads k-mer profiles: pass dna_profile (the processor "
                             "of this model makes it)")
        units = [F.normalize(self.projection(self.mlp(dna_profile)), dim=-1)]
        if self.sketch is not None:
            units.append(F.normalize(self._sketch(dna_profile), dim=-1))
        if self.positional is not None:
            if dna_aligned is None:
                raise ValueError("this model's DNA tower also reads aligned barcodes: pass dna_aligned (the "
                                 "processor of this model makes it)")
            units += [F.normalize(self.aligned_mlp(F.normalize(dna_aligned, dim=-1)), dim=-1),
                      self.positional(dna_aligned)]
        return combine_parts(units, self.embedding_parts())

    def _sketch(self, dna_profile: torch.Tensor) -> torch.Tensor:
        """The fixed projection of the counts; no gradient reaches it (a buffer)."""
        return dna_profile @ self.sketch.to(dna_profile.dtype)

    def encoder_modules(self) -> list[nn.Module]:
        """Frozen by `train.freeze: [dna]`: every branch but the k-mer projection."""
        return [m for m in (self.mlp, self.aligned_mlp, self.positional) if m is not None]
