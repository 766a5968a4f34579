from collections import namedtuple

import pytest

from clibd.processing import taxonomy_ranks, taxonomy_text


def test_dict_with_missing_ranks():
    assert taxonomy_text({"order": "Diptera", "family": "Cecidomyiidae"}) == (
        "Diptera Cecidomyiidae not_classified not_classified")
    assert taxonomy_text({"order": "Diptera", "genus": "", "species": None}) == (
        "Diptera not_classified not_classified not_classified")


def test_record_and_semicolon_string():
    Record = namedtuple("Record", "id order family genus species dna")
    record = Record("X1", "Coleoptera", "Coccinellidae", "Adalia", "Adalia decempunctata", "ACGT")
    assert taxonomy_text(record) == "Coleoptera Coccinellidae Adalia Adalia decempunctata"
    assert taxonomy_text({"id": "X1", "order": "Coleoptera", "dna": "ACGT"}).startswith("Coleoptera not_classified")
    assert taxonomy_ranks("Lepidoptera;Noctuidae;;") == {
        "order": "Lepidoptera", "family": "Noctuidae", "genus": "", "species": ""}


def test_formatted_string_taken_verbatim():
    assert taxonomy_text("  Diptera   Culicidae ") == "Diptera Culicidae"


def test_unknown_rank_rejected():
    with pytest.raises(ValueError, match=r"rec-7: unknown taxonomic rank\(s\) \['subfamily'\]"):
        taxonomy_text({"order": "Diptera", "subfamily": "Culicinae"}, record="rec-7")


@pytest.mark.parametrize("bad", [{}, {"order": ""}, "", ";;;", "a;b;c;d;e", 42])
def test_empty_or_malformed_taxonomy_rejected(bad):
    with pytest.raises(ValueError):
        taxonomy_text(bad)
