import itertools
import logging
import random

import pytest
import torch

from clibd.data import read_records
from clibd.processing import BarcodeTokenizer, normalise_barcode


def kmer_index(kmer: str) -> int:
    """Lexicographic rank of a k-mer over ACGT, computed independently of the tokenizer."""
    return sum("ACGT".index(base) * 4 ** (len(kmer) - 1 - i) for i, base in enumerate(kmer))


def test_compat_vocabulary_matches_spec():
    tok = BarcodeTokenizer("compat")
    seq = "AAAAA" + "AAAAC" + "TTTTT" + "GATCA"
    ids = tok([seq]).input_ids[0]
    assert ids.shape == (133,)
    assert ids[0] == 0  # <MASK> id 0 prepended, not <CLS>
    assert ids[1:5].tolist() == [3, 4, 3 + 1023, 3 + kmer_index("GATCA")]
    assert (ids[5:] == 2).all()  # N padding -> <UNK>
    assert tok.vocab_size == 1027


def test_barcodebert_vocabulary_and_mask():
    tok = BarcodeTokenizer("barcodebert")
    encoded = tok(["AAAAA" + "CGTAC" + "GG"])
    ids, mask = encoded.input_ids[0], encoded.attention_mask[0]
    assert ids.shape == (132,)
    assert ids[:2].tolist() == [2, 2 + kmer_index("CGTAC")]
    assert ids[2] == 1  # "GGNNN" has N -> [UNK]
    assert mask[:3].tolist() == [1, 1, 1] and mask[3:].sum() == 0
    assert tok.vocab_size == 4**5 + 2


def test_every_kmer_has_a_distinct_id():
    tok = BarcodeTokenizer("compat", kmer_size=3, max_length=12)
    kmers = ["".join(p) for p in itertools.product("ACGT", repeat=3)]
    assert sorted(tok.vocab[k] for k in kmers) == list(range(3, 3 + 64))


def test_lowercase_gaps_whitespace_normalised():
    tok = BarcodeTokenizer("compat")
    clean = tok(["ACGTACGTAC"]).input_ids
    assert torch.equal(tok(["acgtacgtac"]).input_ids, clean)
    assert torch.equal(tok(["AC-GT ACG\nTA--C"]).input_ids, clean)


@pytest.mark.parametrize("code", list("RYSWKMBDHVN"))
def test_iupac_codes_become_unknown(code):
    assert normalise_barcode(f"ACG{code}T") == "ACGNT"
    ids = BarcodeTokenizer("compat")([f"ACG{code}T" + "ACGTA"]).input_ids[0]
    assert ids[1] == 2 and ids[2] == 3 + kmer_index("ACGTA")


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        ("ACGT1234", "'1234'"),
        ("MKTAYIAKQRQISFVKSHFSRQ", "'FIQ'"),  # a protein: F, I, Q are not nucleotide codes
        ("ACGU", "'U'"),
        ("", "is empty"),
        ("--- \n", "is empty"),
        ("NNNNRY", "only N"),
    ],
)
def test_bad_barcodes_name_the_record(sequence, message):
    tok = BarcodeTokenizer("compat")
    with pytest.raises(ValueError, match="BOLD-42") as error:
        tok(["ACGTACGT", sequence], ids=["ok-1", "BOLD-42"])
    assert message in str(error.value)
    with pytest.raises(ValueError, match="barcode #1"):
        tok(["ACGTACGT", sequence])


def _outcome(sequence: str) -> str:
    try:
        return normalise_barcode(sequence, "r1")
    except ValueError as error:
        return f"error: {error}"


def test_a_barcode_already_normalised_reads_as_any_other():
    # an upper-case A/C/G/T/N barcode skips the regexes; a trailing space forces them: same outcome
    rng = random.Random(0)
    for _ in range(5000):
        letters = "ACGTN" if rng.random() < 0.5 else "ACGTNacgtnRYk-X"
        sequence = "".join(rng.choice(letters) for _ in range(rng.randint(0, 10)))
        assert _outcome(sequence) == _outcome(sequence + " "), sequence
    assert normalise_barcode("ACGTN") == "ACGTN" and _outcome("NNN").startswith("error: r1: holds only N")
    assert _outcome("").startswith("error: r1: is empty")


@pytest.mark.parametrize("flavour", ["compat", "barcodebert"])
@pytest.mark.parametrize("sequence", ["ACGT", "ACGTNACGTN", "ACNGTACGTNACNGT"])
def test_barcode_without_a_whole_word_is_an_error_naming_it(flavour, sequence):
    # every 5-base word unknown: the embedding would say nothing of the barcode, yet be answered
    tok = BarcodeTokenizer(flavour)
    with pytest.raises(ValueError, match="'BOLD-7': holds no whole 5-base word without N"):
        tok(["ACGTACGT", sequence], ids=["ok-1", "BOLD-7"])
    assert tok(["ACGTA" + sequence]).input_ids.shape[0] == 1  # one whole word is enough


def test_non_string_barcode_is_an_error():
    with pytest.raises(ValueError, match="must be a string"):
        BarcodeTokenizer()([None])


def test_over_length_is_truncated_and_reported(caplog):
    tok = BarcodeTokenizer("compat")
    long = "ACGTA" * 140  # 700 bp
    with caplog.at_level(logging.WARNING):
        encoded = tok(["ACGTA", long], ids=["short", "long-one"])
    assert encoded.truncated == ["barcode 'long-one'"]
    assert "long-one" in caplog.text and "1 of 2" in caplog.text
    assert encoded.input_ids.shape == (2, 133)
    assert (encoded.input_ids[1, 1:] == 3 + kmer_index("ACGTA")).all()


def test_all_shared_barcodes_tokenise(data_dir):
    records = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv")
    encoded = BarcodeTokenizer("compat")([r["dna"] for r in records], ids=[r["id"] for r in records])
    assert encoded.input_ids.shape == (len(records), 133)
    long_ids = {f"barcode {r['id']!r}" for r in records if len(r["dna"].replace("-", "")) > 660}
    assert set(encoded.truncated) == long_ids


def test_kmer_profiles_of_a_batch_are_each_barcodes_own(monkeypatch, data_dir):
    """Counted at once over the batch (and in chunks), no k-mer may span two barcodes."""
    import clibd.processing.barcodes as barcodes
    from clibd.processing import kmer_profiles

    long = [r["dna"] for r in read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv")[:6]]
    batch = [long[0], "ACG", long[1], "acgt-acgtNNacgtRYacgt", long[2], "AAAA", "TTTT", long[3]]
    alone = torch.cat([kmer_profiles([barcode], 4) for barcode in batch])
    assert torch.equal(kmer_profiles(batch, 4), alone)
    assert kmer_profiles(["AAAA", "TTTT"], 4)[0, 0] == 1 and kmer_profiles(["AAAA", "TTTT"], 4)[0].count_nonzero() == 1
    monkeypatch.setattr(barcodes, "PROFILE_CHUNK", 3)  # chunk edges between barcodes
    assert torch.equal(kmer_profiles(batch, 4), alone)
    with pytest.raises(ValueError, match="k must be at least 1"):
        kmer_profiles(batch, 0)
