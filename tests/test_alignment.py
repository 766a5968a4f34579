"""clibd.processing.alignment: barcodes placed on the COI-5P coordinates without pairwise alignment."""

import numpy as np
import pytest

from clibd.processing import COI_BARCODE_LENGTH, align_barcode, aligned_onehot, coi_base_profile
from clibd.processing.barcodes import base_codes


@pytest.fixture(scope="module")
def barcodes(data_dir):
    from clibd.data import read_records

    records = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv")
    return [r["dna"].replace("-", "") for r in records]


@pytest.fixture(scope="module")
def profile(barcodes):
    return coi_base_profile(barcodes)


def test_profile_is_a_base_distribution_per_position(profile):
    assert profile.shape == (COI_BARCODE_LENGTH, 4)
    assert np.allclose(profile.sum(axis=1), 1)
    assert profile[:3].argmax(axis=1).tolist() == [0, 0, 1]  # A A C: where full-length barcodes start


def test_full_length_barcodes_sit_at_their_own_positions(barcodes, profile):
    full = [b for b in barcodes if len(b) == COI_BARCODE_LENGTH and b.startswith("AAC")][:20]
    assert len(full) >= 5
    for barcode in full:
        assert (align_barcode(barcode, profile) == base_codes(barcode)).all()


def test_trimmed_and_extended_barcodes_land_on_the_same_coordinates(barcodes, profile):
    barcode = next(b for b in barcodes if len(b) == COI_BARCODE_LENGTH and b.startswith("AAC") and "N" not in b)
    reference = align_barcode(barcode, profile)
    trimmed = align_barcode(barcode[17:-40], profile)  # lost 17 bases in front, 40 behind
    assert (trimmed[:17] == -1).all() and (trimmed[-40:] == -1).all()
    assert (trimmed[17:-40] == reference[17:-40]).all()
    assert (align_barcode("TTGACCAGGT" + barcode, profile) == reference).all()  # primer residue in front
    # a codon lost in the middle: the pieces after it still land on their own positions
    deleted = align_barcode(barcode[:500] + barcode[503:], profile)
    assert (deleted[:220] == reference[:220]).all() and (deleted[503 + 10 :] == reference[503 + 10 :]).all()


def test_aligned_onehot_has_one_base_per_covered_position(barcodes, profile):
    onehot = aligned_onehot(barcodes[:50], profile)
    assert onehot.shape == (50, COI_BARCODE_LENGTH, 4)
    per_position = onehot.sum(dim=2)
    assert set(per_position.unique().tolist()) <= {0.0, 1.0}
    lengths = [len(base_codes(b)) for b in barcodes[:50]]
    assert (per_position.sum(dim=1).numpy() <= np.minimum(lengths, COI_BARCODE_LENGTH)).all()


def test_bad_barcodes_and_profiles_are_named(profile):
    with pytest.raises(ValueError, match="BIOUG9-A1.*not nucleotides"):
        aligned_onehot(["AACATTATAT", "AACAT#TAT"], profile, ids=["BIOUG8-A1", "BIOUG9-A1"])
    with pytest.raises(ValueError, match="no full-length COI-5P barcode"):
        coi_base_profile(["AACATTATATTTTATTTTTGG"])
