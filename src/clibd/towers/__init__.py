"""DNA towers: registered kinds, each a module with its own config class, built by one factory.

A DNA tower kind is a config class (a transformers sub-config whose `model_type` selects it) and
an `nn.Module` taking `(config, projection_dim)`. The module's `forward(**dna_inputs)` returns the
L2-normalised embedding, `embedding_parts()` declares its parts (`clibd.towers.parts`) and
`encoder_modules()` says what `train.freeze` freezes. The config says what the processor must
make (`processor_settings`), how wide the embedding is (`embedding_dim`) and one line for the
model card (`describe`).

Kinds: `clibd_barcodebert` (the paper's BarcodeBERT, `barcodebert.py`) and `clibd_kmer_profile`
(k-mer counts and aligned barcodes, `kmer_profile.py`).

Usage:
    tower = create_dna_tower(config.dna_config, config.projection_dim)
    register_dna_tower(MyDNAConfig, MyDNATower)        # a new kind, selected by MyDNAConfig.model_type
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from .barcodebert import CLIBDBarcodeBERTConfig, CLIBDBarcodeBERTTower
from .kmer_profile import CLIBDKmerProfileConfig, CLIBDKmerProfileTower, CLIBDPositionalBranch
from .parts import EmbeddingPart

DNA_TOWERS: dict[str, type[nn.Module]] = {}
DEFAULT_DNA_TOWER = CLIBDBarcodeBERTConfig.model_type


def register_dna_tower(config_class: type[PreTrainedConfig], tower_class: type[nn.Module]) -> None:
    """Make a DNA tower kind selectable by `dna_config.model_type` (and loadable by AutoConfig)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    DNA_TOWERS[config_class.model_type] = tower_class


def create_dna_tower(config: PreTrainedConfig, projection_dim: int) -> nn.Module:
    """The DNA tower of the kind `config.model_type` names."""
    if config.model_type not in DNA_TOWERS:
        raise ValueError(f"unknown DNA tower {config.model_type!r}; registered: {sorted(DNA_TOWERS)}")
    return DNA_TOWERS[config.model_type](config, projection_dim)


# Saved before the towers were separate kinds (clibd <= commit 19b8be4): one `clibd_dna_model`
# config with an `encoder` switch and `profile_*` fields for the k-mer-profile tower.
LEGACY_MODEL_TYPE = "clibd_dna_model"
LEGACY_PROFILE_FIELDS = {"profile_kmer_size": "kmer_size", "profile_hidden_size": "hidden_size",
                         "profile_sketch_dim": "sketch_dim", "profile_sketch_weight": "sketch_weight",
                         "profile_aligned": "aligned"}


def upgrade_legacy_dna_config(values: dict) -> dict:
    """A `dna_config` dict as saved by older clibd -> the dict of today's kind; others unchanged."""
    if values.get("model_type") != LEGACY_MODEL_TYPE and "encoder" not in values:
        return values
    values = dict(values)
    encoder = values.pop("encoder", "bert")
    if encoder == "kmer_profile":
        kept = {new: values[old] for old, new in LEGACY_PROFILE_FIELDS.items() if old in values}
        return {"model_type": CLIBDKmerProfileConfig.model_type, **kept}
    if encoder != "bert":
        raise ValueError(f"dna_config.encoder must be 'bert' or 'kmer_profile', got {encoder!r}")
    fields = set(CLIBDBarcodeBERTConfig.__dataclass_fields__)
    kept = {k: v for k, v in values.items() if k in fields and k not in LEGACY_PROFILE_FIELDS}
    return {**kept, "model_type": CLIBDBarcodeBERTConfig.model_type}


register_dna_tower(CLIBDBarcodeBERTConfig, CLIBDBarcodeBERTTower)
register_dna_tower(CLIBDKmerProfileConfig, CLIBDKmerProfileTower)

__all__ = [
    "DNA_TOWERS",
    "CLIBDBarcodeBERTConfig",
    "CLIBDBarcodeBERTTower",
    "CLIBDKmerProfileConfig",
    "CLIBDKmerProfileTower",
    "CLIBDPositionalBranch",
    "EmbeddingPart",
    "create_dna_tower",
    "register_dna_tower",
    "upgrade_legacy_dna_config",
]
