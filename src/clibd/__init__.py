"""clibd: identify insects from a photo, a DNA barcode or both (CLIBD contrastive retrieval).

Usage:
    from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
"""

from .configuration_clibd import CLIBDConfig, CLIBDImageConfig, CLIBDTextConfig
from .loss import contrastive_loss
from .modeling_clibd import CLIBDModel, CLIBDOutput
from .processing import CLIBDProcessor
from .towers import CLIBDBarcodeBERTConfig, CLIBDKmerProfileConfig, register_dna_tower

__version__ = "0.1.0"

__all__ = [
    "CLIBDConfig",
    "CLIBDBarcodeBERTConfig",
    "CLIBDImageConfig",
    "CLIBDKmerProfileConfig",
    "CLIBDModel",
    "CLIBDOutput",
    "CLIBDProcessor",
    "CLIBDTextConfig",
    "contrastive_loss",
    "register_dna_tower",
]
