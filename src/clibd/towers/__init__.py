"""DNA towers: registered kinds, each a module with its own config class, built by one factory.

A DNA tower kind is a config class (a transformers sub-config whose `model_type` selects it) and
an `nn.Module` taking `(config, projection_dim)`. The module's `forward(**dna_inputs)` takes the
processor's `dna_*` tensors and returns the L2-normalised embedding, `embedding_parts()` declares
its parts (`clibd.towers.parts`), `encoder_modules()` says what `train.freeze` freezes, and, where
they apply, `load_pretrained(source)` starts it from the config's `pretrained_model_name_or_path`
and `init_tower_weights()` (on any of its submodules) initialises parameters that transformers'
default initialisation does not know. The config says what the processor must make
(`processor_settings`: today k-mer token ids, k-mer profiles or aligned barcodes), how wide the
embedding is (`embedding_dim`) and one line for the model card (`describe`).

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
from .legacy import upgrade_legacy_dna_config
from .parts import EmbeddingPart

DNA_TOWERS: dict[str, type[nn.Module]] = {}  # model_type -> tower module class
DNA_CONFIGS: dict[str, type[PreTrainedConfig]] = {}  # model_type -> its config class
DEFAULT_DNA_TOWER = CLIBDBarcodeBERTConfig.model_type


def register_dna_tower(config_class: type[PreTrainedConfig], tower_class: type[nn.Module]) -> None:
    """Make a DNA tower kind selectable by `dna_config.model_type` (and loadable by AutoConfig).
    A name already registered to another tower or config class is an error.

    Usage:
        register_dna_tower(MyDNAConfig, MyDNATower)     # MyDNAConfig.model_type = "my_dna_tower"
        CLIBDConfig(modalities=["dna"], dna_config={"model_type": "my_dna_tower"})
    """
    name = config_class.model_type
    if DNA_TOWERS.get(name, tower_class) is not tower_class:
        raise ValueError(f"DNA tower {name!r} is already registered to {DNA_TOWERS[name].__name__}")
    AutoConfig.register(name, config_class, exist_ok=True)
    if AutoConfig.for_model(name).__class__ is not config_class:
        raise ValueError(f"model_type {name!r} already names the config class "
                         f"{type(AutoConfig.for_model(name)).__name__}")
    DNA_TOWERS[name], DNA_CONFIGS[name] = tower_class, config_class


def create_dna_tower(config: PreTrainedConfig, projection_dim: int) -> nn.Module:
    """The DNA tower of the kind `config.model_type` names.

    Usage:
        tower = create_dna_tower(CLIBDKmerProfileConfig(kmer_size=5), projection_dim=256)
    """
    if config.model_type not in DNA_TOWERS:
        raise ValueError(f"unknown DNA tower {config.model_type!r}; registered: {sorted(DNA_TOWERS)}")
    return DNA_TOWERS[config.model_type](config, projection_dim)


register_dna_tower(CLIBDBarcodeBERTConfig, CLIBDBarcodeBERTTower)
register_dna_tower(CLIBDKmerProfileConfig, CLIBDKmerProfileTower)

__all__ = [
    "DNA_CONFIGS",
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
