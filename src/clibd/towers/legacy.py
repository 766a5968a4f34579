"""DNA configs saved before the towers were registered kinds (clibd <= commit 19b8be4): one
`clibd_dna_model` config with an `encoder` switch (`bert` or `kmer_profile`) and `profile_*`
fields for the k-mer-profile tower. They are upgraded when a config is read, so old saved models
load unchanged (tests/fixtures/legacy_19b8be4).

Usage:
    upgrade_legacy_dna_config({"model_type": "clibd_dna_model", "encoder": "kmer_profile", "profile_kmer_size": 7})
    # {"model_type": "clibd_kmer_profile", "kmer_size": 7}
"""

from __future__ import annotations

from .barcodebert import CLIBDBarcodeBERTConfig
from .kmer_profile import CLIBDKmerProfileConfig

LEGACY_MODEL_TYPE = "clibd_dna_model"
LEGACY_PROFILE_FIELDS = {"profile_kmer_size": "kmer_size", "profile_hidden_size": "hidden_size",
                         "profile_sketch_dim": "sketch_dim", "profile_sketch_weight": "sketch_weight",
                         "profile_aligned": "aligned"}


def upgrade_legacy_dna_config(values: dict) -> dict:
    """A `dna_config` dict as saved by older clibd -> the dict of today's kind; others unchanged.
    The legacy k-mer-profile config kept unused BERT fields: they are dropped."""
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
