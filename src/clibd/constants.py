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
# What a reference index embeds: the record field each modality reads has the same name (text keys:
# the records' taxa at every rank; only in a multi-modal library, `clibd.library`).
INDEX_MODALITIES = ("dna", "image", "text")
# What an identify query is embedded from (text: the record's taxonomy; image+dna: the normalised mean of the
# photo's and barcode's embeddings; image+dna-concat: the two concatenated) and how it is answered.
QUERY_MODALITIES = ("image", "dna", "text", "image+dna", "image+dna-concat")  # clibd.query_plan
KEY_KINDS = QUERY_MODALITIES  # what --keys searches (image+dna kinds: built from the image and DNA keys)
STRATEGIES = ("nearest", "is-du")
# `clibd identify --search`: exact torch, exact faiss, approximate faiss inverted file.
SEARCH_BACKENDS = ("torch", "faiss", "faiss-ivf")
