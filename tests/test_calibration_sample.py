"""Calibration holds out the library's species that the model never trained on, where it knows them."""

from __future__ import annotations

import json
import logging

import datasets
import torch
import torch.nn.functional as F

from clibd import CLIBDConfig
from clibd.cli import _summary
from clibd.constants import RANKS
from clibd.identify import Identifier
from clibd.index import ReferenceIndex, build_index
from clibd.index_build import add_to_index, recalibrate_index
from clibd.novelty import (
    MIN_UNTRAINED_REFERENCES,
    MIN_UNTRAINED_SPECIES,
    Answers,
    CalibrationSample,
    calibrate,
    calibration_from_answers,
    calibration_sample,
)
from clibd.pair_calibration import calibrate_pair
from clibd.training.loop import trained_species


def _taxa(species: int, each: int) -> list[str]:
    return [f"Genus{s % 7} species{s}" for s in range(species) for _ in range(each)]


def test_sample_holds_out_only_new_species_where_the_library_has_enough():
    taxa = _taxa(30, 10) + ["Genus0 singleton"]  # a species with one reference is never held out
    trained = [f"Genus{s % 7} species{s}" for s in range(5)]
    sample = calibration_sample(taxa, 2000, 0, trained)
    assert sample.untrained_only and (sample.new_species_held, sample.new_references) == (25, 250)
    assert sorted(sample.rows) == list(range(50, 300))  # every record of the 25 new species, none of the 5
    assert sample.shared == set(sample.rows)

    too_few = [f"Genus{s % 7} species{s}" for s in range(30 - MIN_UNTRAINED_SPECIES + 1)]
    sample = calibration_sample(taxa, 2000, 0, too_few)
    assert not sample.untrained_only and sample.new_species_held == MIN_UNTRAINED_SPECIES - 1
    assert sorted(sample.rows) == list(range(300))  # all of them: too few new species to learn from alone
    thin = calibration_sample(_taxa(30, 2), 2000, 0, trained)  # 25 new species, 50 references
    assert thin.new_references < MIN_UNTRAINED_REFERENCES and not thin.untrained_only and len(thin.rows) == 60

    unknown = calibration_sample(taxa, 2000, 0)
    assert unknown.new_species_held is None and sorted(unknown.rows) == list(range(300))
    assert unknown.to_dict() == {"references": 300, "new_species_held": None, "new_references": None,
                                 "untrained_only": False}


def _records(taxa: list[str]) -> list[dict]:
    return [{"species": name, "genus": name.split()[0], "family": f"Family{int(name.split()[0][5:]) % 3}",
             "order": "Diptera"} for name in taxa]


def test_calibration_learns_from_the_held_out_new_species_only():
    taxa = _taxa(40, 8)
    records = _records(taxa)
    embeddings = F.normalize(torch.randn(len(records), 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    trained = sorted(set(taxa[:80]))  # the first 10 species
    calibration = calibrate(embeddings, records, trained_species=trained)
    # each of the 30 new species' 240 records answered twice: its species held out, and only itself
    assert sum(calibration.counts["order"]) == 2 * 240
    assert calibration.sample == {"references": 240, "new_species_held": 30, "new_references": 240,
                                  "untrained_only": True}
    assert sum(calibrate(embeddings, records).counts["order"]) == 2 * len(records)
    assert calibration.sample_warning() is None
    few = calibrate(embeddings, records, trained_species=sorted(set(taxa[:-8 * 5])))  # 5 new species
    assert "5 species the model did not train on that calibration can hold out, 40 queries" in few.sample_warning()
    assert few.sample_warning() in few.warnings()


def test_index_keeps_the_models_training_species_and_what_it_held_out(dna_model, records, tmp_path, caplog):
    library = records["many_each"]
    species = sorted({r["species"] for r in library})
    config = json.loads((dna_model / "config.json").read_text())
    assert CLIBDConfig(**{k: v for k, v in config.items() if k != "model_type"}).trained_species is None
    for name, trained in (("some", species[:20]), ("most", species[:90])):
        model = tmp_path / f"model_{name}"
        model.mkdir()
        for path in dna_model.iterdir():
            (model / path.name).write_bytes(path.read_bytes())
        (model / "config.json").write_text(json.dumps({**config, "trained_species": trained}))
        with caplog.at_level(logging.WARNING, logger="clibd"):
            build_index(model, library, "dna", tmp_path / f"refs_{name}", progress=False, species_check=False)
        meta = json.loads((tmp_path / f"refs_{name}" / "index.json").read_text())
        assert meta["trained_species"] == trained
        held = [r for r in library if r["species"] not in set(trained)]
        new_with_two = {r["species"] for r in held if sum(o["species"] == r["species"] for o in held) >= 2}
        assert meta["calibration_sample"]["new_species_held"] == len(new_with_two)
        references = sum(r["species"] in new_with_two for r in held)
        assert meta["calibration_sample"]["new_references"] == references
        assert meta["calibration_sample"]["untrained_only"] == (len(new_with_two) >= MIN_UNTRAINED_SPECIES
                                                               and references >= MIN_UNTRAINED_REFERENCES)
    assert meta["calibration_sample"]["untrained_only"] is False  # 10 new species: warned, calibrated on all
    assert "species the model did not train on" in caplog.text
    untrained = json.loads((tmp_path / "refs_some" / "index.json").read_text())["calibration_sample"]
    assert untrained["untrained_only"] and untrained["references"] < len(library)
    summary = _summary("refs_some", ReferenceIndex.load(tmp_path / "refs_some"))  # index build's last line says so
    assert f"calibrated on {untrained['references']} references of the {untrained['new_species_held']} species" in summary
    assert "did not train on" not in _summary("refs_most", ReferenceIndex.load(tmp_path / "refs_most"))
    for name, said in (("some", True), ("most", False)):  # identify's TSV says how its thresholds were set
        line = Identifier.load(tmp_path / f"refs_{name}", model_dir=tmp_path / f"model_{name}").provenance_line()
        assert ("set on the species the model did not train on" in line) == said


def test_training_records_the_species_it_trains_on_and_those_it_started_from():
    train_set = datasets.Dataset.from_dict({"species": ["Aus bus", "", "Aus cus", "Aus bus"]})
    assert trained_species(train_set) == ["Aus bus", "Aus cus"]
    assert trained_species(train_set, ["Dus eus"]) == ["Aus bus", "Aus cus", "Dus eus"]  # init_from's, kept
    assert trained_species(train_set, None) is None  # a start model that does not say: neither can this one
    assert trained_species(datasets.Dataset.from_dict({"genus": ["Aus"]})) is None


def test_add_and_recalibrate_keep_the_training_species(dna_model, records, tmp_path):
    library = records["many_each"]
    species = sorted({r["species"] for r in library})
    config = json.loads((dna_model / "config.json").read_text())
    model = tmp_path / "model"
    model.mkdir()
    for path in dna_model.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    (model / "config.json").write_text(json.dumps({**config, "trained_species": species[:20]}))
    build_index(model, library[:-40], "dna", tmp_path / "refs", progress=False, species_check=False)
    for step in (lambda: add_to_index(tmp_path / "refs", library[-40:], progress=False),
                 lambda: recalibrate_index(tmp_path / "refs", precision=0.95)):
        step()
        meta = json.loads((tmp_path / "refs" / "index.json").read_text())
        assert meta["trained_species"] == species[:20] and meta["calibration_sample"]["untrained_only"]
    assert meta["calibration_sample"]["references"] == sum(r["species"] not in set(species[:20]) for r in library
                                                           if sum(o["species"] == r["species"] for o in library) >= 2)


def test_cross_modal_pairs_hold_out_the_new_species_too():
    taxa = _taxa(40, 8)
    records = _records(taxa)
    generator = torch.Generator().manual_seed(1)
    photos, barcodes = (F.normalize(torch.randn(len(records), 16, generator=generator), dim=-1) for _ in range(2))
    owners = list(range(len(records)))
    trained = sorted(set(taxa[:80]))  # the first 10 species
    calibration = calibrate_pair(photos, records, owners, barcodes, records, owners, trained_species=trained)
    assert calibration.sample == {"references": 240, "new_species_held": 30, "new_references": 240,
                                  "untrained_only": True}
    assert sum(calibration.counts["order"]) == 2 * 240  # each new species' photo: species held out, and only itself
    everyone = calibrate_pair(photos, records, owners, barcodes, records, owners)
    assert everyone.sample == {"references": len(records), "new_species_held": None, "new_references": None,
                              "untrained_only": False}


def test_the_species_check_can_sample_new_species_only(data_dir, monkeypatch):
    """`calibrate_species_check(trained_species=...)` (a bench option: index builds pass none)
    draws its specimens from the species the model did not train on."""
    from clibd import species_check
    from clibd.data import read_records

    records = [r for r in read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv") if r["species"]]
    counts = {name: sum(r["species"] == name for r in records) for name in {r["species"] for r in records}}
    records = [r for r in records if counts[r["species"]] >= 2]
    trained = sorted(counts)[:20]
    drawn = []
    monkeypatch.setattr(species_check, "calibration_sample",
                        lambda *args: drawn.append(calibration_sample(*args)) or drawn[-1])
    embeddings = F.normalize(torch.randn(len(records), 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    check = species_check.calibrate_species_check(embeddings, embeddings, records, max_queries=30,
                                                  trained_species=trained)
    assert check.specimens == 30 and drawn[-1].untrained_only
    assert not {records[i]["species"] for i in drawn[-1].rows} & set(trained)
    species_check.calibrate_species_check(embeddings, embeddings, records, max_queries=30)
    assert drawn[-1].new_species_held is None  # the default: any species


def test_a_calibration_is_made_with_its_sample():
    """What was held out is given when a calibration is made, not set on it afterwards."""
    found = Answers(held_right=[(0.9, 0.1), (0.8, 0.0)], held_wrong=[(0.5, 0.0)], own_right=[(0.95, 0.2)])
    sample = CalibrationSample([3, 1, 4], {3, 4}, new_species_held=21, new_references=230, untrained_only=True)
    made = calibration_from_answers(dict.fromkeys(RANKS, found), "species", sample=sample)
    assert made.sample == sample.to_dict() and made.sample_warning() is None
    assert calibration_from_answers(dict.fromkeys(RANKS, found), "species").sample == {}


def test_pair_calibration_is_told_its_queries_are_taxon_names():
    """Text queries (one per taxon name) are held out alone from `MIN_UNTRAINED_SPECIES` new species
    on; specimens need `MIN_UNTRAINED_REFERENCES` of them, also photos that own no library record
    (owner -1, as text keys do)."""
    taxa = _taxa(30, 3)  # 25 species new to the model, 75 references: enough names, too few specimens
    records = _records(taxa)
    generator = torch.Generator().manual_seed(2)
    photos, barcodes = (F.normalize(torch.randn(len(records), 16, generator=generator), dim=-1) for _ in range(2))
    trained = sorted(set(taxa[:15]))  # the first 5 species
    outside = [-1] * len(records)  # photos of specimens the library does not hold records of
    args = (photos, records, outside, barcodes, records, list(range(len(records))))
    said = calibrate_pair(*args, trained_species=trained, text_queries=False)
    assert said.sample == {"references": 90, "new_species_held": 25, "new_references": 75, "untrained_only": False}
    assert "25 species the model did not train on" in said.sample_warning()
    names = calibrate_pair(*args, trained_species=trained, text_queries=True)
    assert names.sample == {"references": 75, "new_species_held": 25, "new_references": 75, "untrained_only": True}
    assert calibrate_pair(*args, trained_species=trained).sample == said.sample  # specimens unless said
