"""Specimen records: one schema (id, order, family, genus, species, dna, image) whatever the source."""

from .records import RECORD_FIELDS, read_records, shared_data_dir

__all__ = ["RECORD_FIELDS", "read_records", "shared_data_dir"]
