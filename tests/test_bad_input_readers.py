"""Input readers meet real-world files: byte order marks, other encodings, bad rows a caller must
report per record, oversized photos and over-length barcodes (issue 16, item 2)."""

import logging
import struct
import warnings
import zlib

import pytest
from PIL import Image

from clibd import CLIBDModel, CLIBDProcessor
from clibd.data import BadRow, BadRows, read_fasta, read_records, read_table, records_to_dataset
from clibd.data.collate import ContrastiveCollator
from clibd.processing import load_image
from clibd.processing.images import MAX_IMAGE_PIXELS, MAX_PIXELS_ENV, max_image_pixels
from clibd.retrieval import embed_records

HEADER = "processid\tsampleid\torder\tfamily\tgenus\tspecies\tdna_barcode\n"
ROW = "{}\tSAMPLE-{}\tDiptera\tCulicidae\tAedes\tAedes aegypti\tACGTACGT\n"
FASTA = ">S1|Diptera|Culicidae|Aedes|Aedes aegypti\nACGTAC\n>S2|Diptera|Culicidae|Aedes|Aedes vexans\nACGTTT\n"


# --- byte order marks ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_table_with_bom_keeps_its_id_column(tmp_path, suffix):
    table = tmp_path / f"export{suffix}"
    text = HEADER + ROW.format("P1", "P1") + ROW.format("P2", "P2")
    table.write_text("\ufeff" + (text.replace("\t", ",") if suffix == ".csv" else text), encoding="utf-8")
    records = read_table(table)
    # without BOM handling the first column is "\ufeffprocessid" and ids silently come from sampleid
    assert [r["id"] for r in records] == ["P1", "P2"]


def test_fasta_with_bom_keeps_its_first_record(tmp_path):
    fasta = tmp_path / "refs.fasta"
    fasta.write_text("\ufeff" + FASTA, encoding="utf-8")
    records = read_fasta(fasta, on_bad_row="error")
    assert [(r["id"], r["species"], r["dna"]) for r in records] == [
        ("S1", "Aedes aegypti", "ACGTAC"), ("S2", "Aedes vexans", "ACGTTT")]


# --- encodings ----------------------------------------------------------------------------------
def test_latin1_table_error_names_file_and_line(tmp_path):
    table = tmp_path / "refs.tsv"
    # the bad byte sits past the decoder's first buffer, so its offset there says nothing of the line
    good = "".join(ROW.format(f"P{i}", i) for i in range(600))
    latin = "P600\tS\tDiptera\tCulicidae\tAedes\tAedes bréhmi\tACGT\n"
    table.write_bytes((HEADER + good).encode() + latin.encode("latin-1"))
    column = latin.index("é") + 1
    with pytest.raises(ValueError, match=rf"refs\.tsv:602: not UTF-8 text \(byte 0xe9 at column {column}\); "
                                         r"save the file as UTF-8"):
        read_records(table)


def test_latin1_fasta_error_names_file_and_line(tmp_path):
    fasta = tmp_path / "refs.fasta"
    latin = ">S3|Coleoptera|Carabidae|Carabus|Carabus ménétriési\n"
    fasta.write_bytes("\ufeff".encode() + FASTA.encode() + (latin + "ACGT\n").encode("latin-1"))
    column = latin.index("é") + 1
    with pytest.raises(ValueError, match=rf"refs\.fasta:5: not UTF-8 text \(byte 0xe9 at column {column}\)"):
        read_records(fasta)


# --- bad rows keep their ids --------------------------------------------------------------------
def test_bad_rows_keep_record_ids(tmp_path, caplog):
    table = tmp_path / "queries.tsv"
    table.write_text(HEADER + ROW.format("A1", 1)
                     + "A2\tS2\tDiptera\tCulicidae\tAedes\t\tACGT1CGT\n"  # bad barcode
                     + "A3\tS3\tDiptera\n"  # too few fields: the id is still known
                     + "\tS4\tDiptera\t\t\t\tACGT\n")  # no id
    bad = BadRows()
    with caplog.at_level(logging.WARNING):
        records = read_records(table, bad_rows=bad)
    assert [r["id"] for r in records] == ["A1"]
    assert [(row.file, row.line, row.id) for row in bad.rows] == [(str(table), 3, "A2"), (str(table), 4, "A3"),
                                                                   (str(table), 5, "")]
    assert all(isinstance(row, BadRow) for row in bad.rows)
    assert "holds characters" in bad.rows[0].reason and bad.rows[1].reason == "expected 7 fields"
    assert "queries.tsv:3: barcode: holds characters" in caplog.text and "(record 'A2')" in caplog.text
    with pytest.raises(ValueError, match=r"queries\.tsv:3: barcode: .*\(record 'A2'\)"):
        read_records(table, bad_rows=BadRows("error"))  # its policy wins over on_bad_row's default


def test_bad_rows_shared_across_files(tmp_path, caplog):
    fasta = tmp_path / "queries.fasta"
    fasta.write_text("ACGT\n" + FASTA + ">S3|Diptera\nACGXXX\n>S4|Diptera\n\n")
    bad = BadRows()
    bad.report("earlier.tsv", 9, "no barcode", "E1")
    with caplog.at_level(logging.WARNING):
        records = read_records(fasta, bad_rows=bad)
    assert [r["id"] for r in records] == ["S1", "S2"]
    assert [(row.line, row.id) for row in bad.rows] == [(9, "E1"), (1, ""), (6, "S3"), (8, "S4")]
    assert "skipped 3 bad rows" in caplog.text and "earlier.tsv" not in caplog.text  # only this file's


def test_without_bad_rows_the_policy_is_as_before(tmp_path):
    fasta = tmp_path / "queries.fasta"
    fasta.write_text(FASTA + ">S3|Diptera\n\n")
    assert len(read_records(fasta)) == 2
    with pytest.raises(ValueError, match=r"queries\.fasta:5: no barcode \(record 'S3'\)"):
        read_records(fasta, on_bad_row="error")


def test_stray_quote_in_a_tsv_never_swallows_rows_silently(tmp_path):
    table = tmp_path / "bold.tsv"
    table.write_text(HEADER.replace("\n", "\tnotes\n") + ROW.format("A1", 1).replace("\n", '\t"holotype\n')
                     + ROW.format("A2", 2).replace("\n", "\tx\n") + ROW.format("A3", 3).replace("\n", '\tsaid "hi"\n')
                     + ROW.format("A4", 4).replace("\n", '\t"ok"\n') + ROW.format("A5", 5).replace("\n", "\t\n"))
    bad = BadRows()
    records = read_records(table, bad_rows=bad)
    # before: A1 was kept with A2 and A3 inside its notes, which vanished without a word
    assert [r["id"] for r in records] == ["A4", "A5"]  # a quoted field on one line is still read
    assert [(row.line, row.id) for row in bad.rows] == [(2, "A1")]
    assert "lines 2-4 were read as one row" in bad.rows[0].reason and "double quote" in bad.rows[0].reason
    # a note quoted across lines as pandas writes it (no tab inside) is a field like any other; a
    # stray quote on the last row is named at its own line
    notes = tmp_path / "notes.tsv"
    notes.write_text(HEADER.replace("\n", "\tnotes\n") + ROW.format("B1", 1).replace("\n", '\t"first\nsecond"\n')
                     + ROW.format("B2", 2).replace("\n", '\t"stray\n') + ROW.format("B3", 3).replace("\n", "\tx\n"))
    bad = BadRows()
    assert [r["id"] for r in read_records(notes, bad_rows=bad)] == ["B1"]
    assert [(row.line, row.id) for row in bad.rows] == [(4, "B2")]  # B1 took lines 2-3
    # a row spanning lines that is bad for another reason is named at its first line too
    spans = tmp_path / "spans.tsv"
    spans.write_text(HEADER.replace("\n", "\tnotes\n") + ROW.format("C1", 1).replace("ACGT", "ACXT", 1)
                     .replace("\n", '\t"first\nsecond"\n') + ROW.format("C2", 2).replace("\n", "\tx\n"))
    bad = BadRows()
    assert [r["id"] for r in read_records(spans, bad_rows=bad)] == ["C2"]
    assert [(row.line, row.id) for row in bad.rows] == [(2, "C1")]


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_ids_with_tabs_or_line_breaks_are_bad_rows(tmp_path, suffix):
    table = tmp_path / f"queries{suffix}"
    sep = "," if suffix == ".csv" else "\t"
    table.write_text(f"id{sep}dna\n" + f'"Q1\tx"{sep}ACGT\n' + f"Q2{sep}ACGT\n"
                     + (f'"Q3\r\nx"{sep}ACGT\n' if suffix == ".csv" else ""))
    bad = BadRows()
    assert [r["id"] for r in read_records(table, bad_rows=bad)] == ["Q2"]
    assert [row.reason for row in bad.rows][:1] == ["id holds a tab or a line break"]
    assert len(bad.rows) == (2 if suffix == ".csv" else 1)


# --- oversized images ---------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_blank_png(path, width: int, height: int) -> None:
    """A valid 1-bit PNG of any size in a few kB (blank rows compress ~1000x), written without PIL."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
                     + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 14_000])  # PIL warns above its limit and raises above twice it
def test_huge_image_refused_before_decoding(tmp_path, monkeypatch, side):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    path = tmp_path / "huge.png"
    write_blank_png(path, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak either
        with pytest.raises(ValueError, match=rf"huge\.png: image is {side} x {side} = {side * side:,} px, above "
                                             rf"the limit of {MAX_IMAGE_PIXELS:,} px; .*{MAX_PIXELS_ENV}"):
            load_image(path)
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # PIL's own limit is restored


def test_image_limit_from_argument_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    Image.new("RGB", (200, 200), (10, 20, 30)).save(path)
    with pytest.raises(ValueError, match=r"photo\.png: image is 200 x 200 = 40,000 px, above the limit of 10,000"):
        load_image(path, max_pixels=100 * 100)
    assert load_image(path, max_pixels=50_000).getpixel((0, 0)) == (10, 20, 30)
    monkeypatch.setenv(MAX_PIXELS_ENV, "10000")
    assert max_image_pixels() == 10_000
    with pytest.raises(ValueError, match="above the limit of 10,000 px"):
        load_image(path)
    assert load_image(path, max_pixels=50_000).size == (200, 200)  # the argument beats the variable
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV} must be a positive whole number"):
        load_image(path)


def test_limit_above_pils_own_admits_the_image(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    Image.new("RGB", (200, 200), (10, 20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would raise DecompressionBombError
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with pytest.raises(ValueError, match="above the limit of 10,000 px"):
        load_image(path, max_pixels=10_000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "50000")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).getpixel((199, 199)) == (10, 20, 30)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_processor_applies_its_image_limit(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    path = tmp_path / "photo.png"
    Image.new("RGB", (200, 200)).save(path)
    with pytest.raises(ValueError, match=r"photo\.png: image is 200 x 200"):
        CLIBDProcessor(max_image_pixels=10_000).process_images([str(path)])
    assert CLIBDProcessor().process_images([str(path)]).shape == (1, 3, 224, 224)
    assert "max_image_pixels" not in CLIBDProcessor(max_image_pixels=10_000).to_dict()  # not a model setting


# --- over-length barcodes -----------------------------------------------------------------------
def _barcode_records(lengths: dict[str, int]) -> list[dict[str, str]]:
    return [{"id": name, "order": "Diptera", "family": "", "genus": "", "species": "", "dna": "ACGTA" * (n // 5),
             "image": ""} for name, n in lengths.items()]


def test_embedding_logs_truncated_record_ids(tiny_config, tiny_processor, caplog):
    records = _barcode_records({"LONG-1": 700, "short-1": 300, "LONG-2": 700, "LONG-3": 700})
    model = CLIBDModel(tiny_config)
    with caplog.at_level(logging.WARNING, logger="clibd"):
        embeddings = embed_records(model, tiny_processor, records_to_dataset(records), "dna", batch_size=2)
    assert embeddings.shape[0] == 4
    warned = [r for r in caplog.records if r.name.startswith("clibd") and "truncated" in r.getMessage()]
    assert [r.getMessage().split(" were ")[0] for r in warned] == ["1 of 2 barcodes", "2 of 2 barcodes"]
    assert "'LONG-1'" in warned[0].getMessage() and "short-1" not in caplog.text
    assert "'LONG-2'" in warned[1].getMessage() and "'LONG-3'" in warned[1].getMessage()


def test_training_batches_do_not_repeat_the_truncation_warning(tiny_processor, caplog):
    rows = _barcode_records({"LONG-1": 700, "short-1": 300})
    with caplog.at_level(logging.WARNING, logger="clibd"):
        batch = ContrastiveCollator(tiny_processor, ["dna"], train=True)(rows)
        assert "truncated" not in caplog.text  # training counts them once, before the first epoch
        ContrastiveCollator(tiny_processor, ["dna"], train=True, warn_truncated=True)(rows)
    assert batch["dna_input_ids"].shape == (2, 133)
    assert "'LONG-1'" in caplog.text
