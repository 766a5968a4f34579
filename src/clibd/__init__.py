"""clibd: identify insects from a photo, a DNA barcode or both (CLIBD contrastive retrieval).

The names below are imported on first use (`clibd.lazy`), so the command line starts fast.

Usage:
    from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
"""

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "CLIBDConfig": ".configuration_clibd",
    "CLIBDImageConfig": ".configuration_clibd",
    "CLIBDTextConfig": ".configuration_clibd",
    "contrastive_loss": ".loss",
    "CLIBDModel": ".modeling_clibd",
    "CLIBDOutput": ".modeling_clibd",
    "CLIBDProcessor": ".processing",
    "CLIBDBarcodeBERTConfig": ".towers",
    "CLIBDKmerProfileConfig": ".towers",
    "register_dna_tower": ".towers",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:  # for type checkers and linters; at run time see _EXPORTS
    from .configuration_clibd import CLIBDConfig as CLIBDConfig
    from .configuration_clibd import CLIBDImageConfig as CLIBDImageConfig
    from .configuration_clibd import CLIBDTextConfig as CLIBDTextConfig
    from .loss import contrastive_loss as contrastive_loss
    from .modeling_clibd import CLIBDModel as CLIBDModel
    from .modeling_clibd import CLIBDOutput as CLIBDOutput
    from .processing import CLIBDProcessor as CLIBDProcessor
    from .towers import CLIBDBarcodeBERTConfig as CLIBDBarcodeBERTConfig
    from .towers import CLIBDKmerProfileConfig as CLIBDKmerProfileConfig
    from .towers import register_dna_tower as register_dna_tower
