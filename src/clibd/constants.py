"""Names every layer shares: taxonomic ranks, modalities, the paper's default text model.

Usage:
    from clibd.constants import RANKS, MODALITIES
"""

from __future__ import annotations

# Taxonomic ranks, coarsest first (the order of the taxonomy text and of identify's answers).
RANKS = ("order", "family", "genus", "species")
# The towers of a CLIBD model, in the fixed order of losses, logits and stacked keys.
MODALITIES = ("image", "dna", "text")
# The paper's taxonomy-text BERT (and its tokenizer).
DEFAULT_TEXT_MODEL = "prajjwal1/bert-small"
