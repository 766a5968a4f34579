import logging
from collections import Counter

import datasets
import pytest

from clibd.data import paper_split, read_bioscan, read_records, records_to_dataset, split_statistics
from clibd.data.bioscan import official_splits
from clibd.data.records import parse_fasta_header

HEADER = "processid\torder\tfamily\tgenus\tspecies\tdna_barcode\timage_file\n"


def test_read_shared_bold_table(data_dir):
    records = read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv")
    assert len(records) == 598
    first = records[0]
    assert set(first) == {"id", "order", "family", "genus", "species", "dna", "image"}
    assert first["id"] and first["species"] and first["dna"] and first["image"] == ""


def test_bad_rows_reported_with_file_and_line(tmp_path, caplog):
    table = tmp_path / "export.tsv"
    table.write_text(HEADER
                     + "A1\tDiptera\tCulicidae\tAedes\tAedes aegypti\tACGTACGT\t\n"
                     + "A2\tDiptera\tCulicidae\tAedes\t\tACGT1CGT\t\n"  # bad barcode
                     + "A3\tDiptera\tCulicidae\n"  # too few fields
                     + "\tDiptera\t\t\t\tACGT\t\n"  # no id
                     + "A5\tNA\tnot_classified\t\t\t\tphotos/a5.jpg\n")
    with caplog.at_level(logging.WARNING):
        records = read_records(table)
    assert [r["id"] for r in records] == ["A1", "A5"]
    assert records[1]["order"] == "" and records[1]["image"] == str(tmp_path / "photos" / "a5.jpg")
    assert "skipped 3 bad rows" in caplog.text
    assert "export.tsv:3:" in caplog.text and "'1'" in caplog.text
    assert "export.tsv:4: expected 7 fields" in caplog.text
    with pytest.raises(ValueError, match=r"export.tsv:3: barcode: holds characters"):
        read_records(table, on_bad_row="error")
    with pytest.raises(ValueError, match="on_bad_row"):
        read_records(table, on_bad_row="ignore")


def test_table_without_id_column(tmp_path):
    table = tmp_path / "x.csv"
    table.write_text("name,dna\nfoo,ACGT\n")
    with pytest.raises(ValueError, match="x.csv: no id column"):
        read_records(table)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (">AB1;tax=o:Diptera,f:Culicidae,g:Aedes,s:Aedes_aegypti;",
         {"id": "AB1", "order": "Diptera", "family": "Culicidae", "genus": "Aedes", "species": "Aedes aegypti"}),
        (">AB2 order=Coleoptera family=Carabidae species=Carabus nemoralis",
         {"id": "AB2", "order": "Coleoptera", "family": "Carabidae", "genus": "", "species": "Carabus nemoralis"}),
        (">AB3|Lepidoptera|Noctuidae|Apamea|Apamea crenata",
         {"id": "AB3", "order": "Lepidoptera", "family": "Noctuidae", "genus": "Apamea",
          "species": "Apamea crenata"}),
    ],
)
def test_fasta_header_forms(header, expected):
    assert parse_fasta_header(header) == expected


def test_read_fasta_multiline_and_bad_records(tmp_path, caplog):
    fasta = tmp_path / "refs.fasta"
    fasta.write_text(">S1|Diptera|Culicidae|Aedes|Aedes aegypti\nACGTAC\nGTACGT\n"
                     ">S2|Diptera|Culicidae|Aedes|Aedes vexans\nACGXXX\n"
                     ">S3|Diptera\n\n"
                     ">S4|Hymenoptera|Apidae|Apis|Apis mellifera\nacgt-acgt\n")
    with caplog.at_level(logging.WARNING):
        records = read_records(fasta)
    assert [(r["id"], r["dna"]) for r in records] == [("S1", "ACGTACGTACGT"), ("S4", "acgt-acgt")]
    assert "refs.fasta:4:" in caplog.text and "refs.fasta:6: no barcode" in caplog.text


def _write_bioscan5m(root):
    base = root / "bioscan5m"
    (base / "metadata" / "csv").mkdir(parents=True)
    rows = [
        ("P1", "pretrain", "00", "Diptera", "Cecidomyiidae", "", "", "ACGTACGTAA"),
        ("P2", "train", "0", "Diptera", "Culicidae", "Aedes", "Aedes vexans", "ACGTTTGTAA"),
        ("P3", "test_unseen", "", "Coleoptera", "Carabidae", "Carabus", "Carabus nemoralis", "TTGTACGTAA"),
    ]
    header = "processid,split,chunk,phylum,class,order,family,subfamily,genus,species,dna_bin,dna_barcode"
    lines = [header] + [f"{p},{s},{c},Arthropoda,Insecta,{o},{f},,{g},{sp},BOLD:X{i},{dna}"
                        for i, (p, s, c, o, f, g, sp, dna) in enumerate(rows)]
    (base / "metadata" / "csv" / "BIOSCAN_5M_Insect_Dataset_metadata.csv").write_text("\n".join(lines) + "\n")
    return rows


def test_bioscan5m_layout_through_bioscan_dataset(tmp_path):
    rows = _write_bioscan5m(tmp_path)
    dataset = read_bioscan(tmp_path, version="5m")
    assert dataset["id"] == [r[0] for r in rows]
    assert dataset["split"] == ["pretrain", "train", "test_unseen"]
    assert dataset["genus"] == ["", "Aedes", "Carabus"]
    image_dir = tmp_path / "bioscan5m" / "images" / "cropped_256"
    assert dataset["image"] == [str(image_dir / "pretrain" / "00" / "P1.jpg"),
                                str(image_dir / "train" / "0" / "P2.jpg"),
                                str(image_dir / "test_unseen" / "P3.jpg")]
    assert set(official_splits(dataset)) == {"pretrain", "train", "test_unseen"}


def test_bioscan_missing_download_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="BIOSCAN_5M_Insect_Dataset_metadata.csv not found"):
        read_bioscan(tmp_path, version="5m")


def _synthetic(sizes: dict[str, int]):
    records = []
    for s, n in sizes.items():
        for i in range(n):
            records.append({"id": f"{s}-{i}", "order": "O", "family": "F", "genus": s.split()[0], "species": s,
                            "dna": "ACGT", "image": ""})
    records += [{"id": f"nolabel-{i}", "order": "O", "family": "F", "genus": "", "species": "", "dna": "ACGT",
                 "image": ""} for i in range(7)]
    return records_to_dataset(records)


def _check_invariants(splits):
    species = {name: set(part["species"]) for name, part in splits.items()}
    seen = species["train_seen"]
    assert species["val_seen"] == species["test_seen"] == species["seen_keys"] == seen
    assert not species["val_unseen"] & species["test_unseen"]
    assert not (species["val_unseen"] | species["test_unseen"]) & seen
    for prefix in ("val", "test"):
        assert species[f"{prefix}_unseen"] == species[f"{prefix}_unseen_keys"]  # each has a query and a key
    assert species["pretrain"] <= {""}
    ids = [i for part in splits.values() for i in part["id"]]
    assert len(ids) == len(set(ids))


def test_paper_split_invariants_and_proportions(caplog):
    sizes = {f"Genus{i} sp{i}": n for i, n in enumerate([40] * 20 + [9] * 5 + [5] * 6 + [2] * 4 + [1] * 3)}
    with caplog.at_level(logging.INFO, logger="clibd.data.split"):
        splits = paper_split(_synthetic(sizes), seed=1)
    assert "3 species with a single record left out, as the paper does: Genus35 sp35 (Genus35 sp35-0)" in caplog.text
    _check_invariants(splits)
    seen = set(splits["train_seen"]["species"])
    assert len(seen) == 20  # 80 % of the 25 species with >= 9 records
    unseen = set(splits["val_unseen"]["species"]) | set(splits["test_unseen"]["species"])
    assert len(unseen) == 5 + 6 + 4  # the other 20 % plus every 2-8 species
    assert abs(len(set(splits["val_unseen"]["species"])) - len(set(splits["test_unseen"]["species"]))) <= 2
    excluded = {s for s, n in sizes.items() if n == 1}
    assert not excluded & {s for part in splits.values() for s in part["species"]}
    forty = [s for s in seen if sizes[s] == 40][0]
    counts = Counter(name for name, part in splits.items() for s in part["species"] if s == forty)
    assert counts == {"train_seen": 28, "val_seen": 4, "test_seen": 4, "seen_keys": 4}
    assert len(splits["pretrain"]) == 7


def test_paper_split_deterministic_and_seeded():
    dataset = _synthetic({f"G{i} s{i}": 12 for i in range(30)})
    a, b, c = paper_split(dataset, seed=3), paper_split(dataset, seed=3), paper_split(dataset, seed=4)
    assert all(a[n]["id"] == b[n]["id"] for n in a)
    assert any(a[n]["id"] != c[n]["id"] for n in a)
    shuffled = dataset.shuffle(seed=0)
    d = paper_split(shuffled, seed=3)
    assert all(sorted(a[n]["id"]) == sorted(d[n]["id"]) for n in a)


def test_paper_split_on_shared_bold_records(data_dir):
    dataset = records_to_dataset(read_records(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"))
    splits = paper_split(dataset, seed=42)
    _check_invariants(splits)
    table = split_statistics(splits)
    assert table.startswith("| split | records | species |") and "| train_seen |" in table
    assert sum(len(p) for p in splits.values()) + sum(
        1 for n in Counter(dataset["species"]).values() if n == 1) == len(dataset)


def _write_bioscan1m(root):
    """A BIOSCAN-1M metadata TSV in the release's layout: P1's genus is missing (not_classified)
    although its species is a binomial."""
    from bioscan_dataset.bioscan1m import COLUMN_DTYPES

    columns = list(COLUMN_DTYPES)
    rows = [("P1", "Culicidae", "not_classified", "Aedes vexans"), ("P2", "Culicidae", "Aedes", "Aedes vexans"),
            ("P3", "Cecidomyiidae", "not_classified", "not_classified")]
    lines = ["\t".join(columns)]
    for pid, family, genus, species in rows:
        row = {c: "not_classified" for c in columns}
        row.update(sampleid=pid, processid=pid, uri="u", name="n", phylum="Arthropoda", order="Diptera",
                   family=family, subfamily="Sub", tribe="Tri", genus=genus, species=species, nucraw="ACGTACGT",
                   image_file=f"{pid}.jpg", large_diptera_family="train", chunk_number="1", **{"class": "Insecta"})
        lines.append("\t".join(row[c] for c in columns))
    (root / "bioscan1m").mkdir()
    (root / "bioscan1m" / "BIOSCAN_Insect_Dataset_metadata.tsv").write_text("\n".join(lines) + "\n")


def test_bioscan1m_release_labels_keep_the_missing_genus(tmp_path):
    _write_bioscan1m(tmp_path)
    # bioscan-dataset fills P1's genus from its binomial; the release (and the authors' code) has none
    assert read_bioscan(tmp_path, version="1m")["genus"] == ["Aedes", "Aedes", ""]
    release = read_bioscan(tmp_path, version="1m", release_labels=True)
    assert release["genus"] == ["", "Aedes", ""] and release["species"] == ["Aedes vexans", "Aedes vexans", ""]


def test_query_rows_read_like_dataset_rows_and_a_nan_barcode_is_refused(dna_model):
    """Queries are embedded from `record_rows` (no Dataset): the same fields as a Dataset row, and a
    barcode that is not text (a NaN from a spreadsheet) is an error naming the record, not "nan"."""
    import math

    from clibd import CLIBDModel, CLIBDProcessor
    from clibd.checked_embedding import embed_checked
    from clibd.data import record_rows

    records = [{"id": "q1", "dna": "AACATTATATTTTATTTTTGG", "species": None}, {"id": "q2", "extra": "x"}]
    assert record_rows(records) == [dict(records_to_dataset(records)[i]) for i in range(2)]
    model, processor = CLIBDModel.from_pretrained(dna_model), CLIBDProcessor.from_pretrained(dna_model)
    with pytest.raises(ValueError, match="q7.*must be a string"):
        embed_checked(model, processor, [{"id": "q7", "dna": math.nan}], "dna")


def test_a_configs_shared_data_path_is_read_where_clibd_shared_data_says(data_dir, tmp_path, monkeypatch):
    # run from a folder with no ../shared/data beside it; the variable names a copy holding 2,000 records
    from clibd.data import DataSection, load_splits, resolve_data_path

    copy = tmp_path / "copy" / "insect_bold_coi" / "insect_bold_coi.tsv"
    copy.parent.mkdir(parents=True)
    lines = (data_dir / "insect_bold_coi" / "insect_bold_coi.tsv").read_text().splitlines(keepends=True)
    copy.write_text("".join(lines[:2001]))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("CLIBD_SHARED_DATA", str(tmp_path / "copy"))
    configured = "../shared/data/insect_bold_coi/insect_bold_coi.tsv"
    assert resolve_data_path(configured) == copy
    assert resolve_data_path("mine/refs.tsv").as_posix() == "mine/refs.tsv"  # a path of one's own, as given
    splits = load_splits(DataSection(source="table", path=configured))
    single = sum(n == 1 for n in Counter(r["species"] for r in read_records(copy)).values())
    assert sum(len(part) for part in splits.values()) + single == 2000  # the copy, not the checkout's data
    monkeypatch.setenv("CLIBD_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"read under \$CLIBD_SHARED_DATA="):
        load_splits(DataSection(source="table", path=configured))


def test_barcodes_the_dna_tower_cannot_read_are_left_out_before_training(capsys):
    from accelerate import Accelerator

    from clibd.data.collate import unreadable_barcodes
    from clibd.training.config import ExperimentConfig
    from clibd.training.loop import _without_unreadable_barcodes

    rows = {"fine": "ACGTACGTAC", "six": "ACGTAC", "gappy": "ACGTNACGTNACGTN", "none": ""}
    dataset = records_to_dataset([{"id": i, "order": "O", "family": "F", "genus": "G", "species": "G s", "dna": dna,
                                   "image": ""} for i, dna in rows.items()])
    assert unreadable_barcodes(dataset, {"dna_profile_kmer_size": 7}) == ["six", "gappy"]  # no 7 bases without N
    assert unreadable_barcodes(dataset, {"kmer_size": 5, "max_sequence_length": 660}) == ["gappy"]  # ACGTA is a word
    late = records_to_dataset([{"id": "late", "order": "O", "family": "F", "genus": "G", "species": "G s",
                                "dna": "NNNNNACGTA", "image": ""}])  # its only word lies past the first 5 bases
    assert unreadable_barcodes(late, {"kmer_size": 5, "max_sequence_length": 5}) == ["late"]
    assert unreadable_barcodes(late, {"kmer_size": 5, "max_sequence_length": 660}) == []
    all_n = records_to_dataset([{"id": "all-n", "order": "O", "family": "F", "genus": "G", "species": "G s",
                                 "dna": "NNNNNNNNNN", "image": ""}])  # BIOSCAN releases are not screened when read
    assert unreadable_barcodes(all_n, {"dna_profile_kmer_size": 7}) == ["all-n"]
    config = ExperimentConfig.from_yaml("configs/bold_dna.yaml")  # the 7-mer profile tower
    kept = _without_unreadable_barcodes(datasets.DatasetDict({"train_seen": dataset, "test_seen": dataset}), config,
                                        Accelerator(cpu=True))
    assert kept["train_seen"]["id"] == kept["test_seen"]["id"] == ["fine", "none"]
    assert "2 records left out: their barcode has no k-mer the DNA tower can read" in capsys.readouterr().out
