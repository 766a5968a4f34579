"""Hub publishing with the upload mocked (no network in tests); the card itself: test_model_card.py."""

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.cli import main as cli


@pytest.fixture
def run_dir(tmp_path, text_tokenizer):
    run = tmp_path / "run"
    config = CLIBDConfig.tiny(modalities=["dna", "text"])
    CLIBDModel(config).save_pretrained(run / "best")
    CLIBDProcessor.from_model_config(config, text_tokenizer).save_pretrained(run / "best")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "modalities": ["dna", "text"], "dna": {"pooling": "mean"}, "text": {}},
        "data": {"source": "table", "path": "bold.tsv", "split": "paper", "split_seed": 42},
        "train": {"epochs": 2, "batch_size": 128, "max_lr": 2e-3, "weight_decay": 0.01, "mixed_precision": "auto",
                  "freeze": ["text"], "lora": False}}))
    (run / "metrics.md").write_text("| query -> key | order seen |\n|---|---:|\n| DNA -> DNA | 98.6 |")
    (run / "metrics.json").write_text(json.dumps({"dna": {}}))
    (run / "splits.md").write_text("| split | records |\n|---|---:|\n| train_seen | 14855 |")
    return run


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        ignored = kwargs.get("ignore_patterns") or []  # as the Hub client skips them
        names = sorted(p.name for p in Path(folder_path).iterdir() if not any(fnmatch(p.name, i) for i in ignored))
        FakeApi.calls.append(("upload_folder", repo_id, kwargs, names,
                              (Path(folder_path) / "README.md").read_text() if kwargs.get("repo_type") is None else ""))
        return f"https://huggingface.co/{repo_id}/commit/abc"


def test_push_run_uploads_model_processor_metrics_and_card(run_dir, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert cli(["push", str(run_dir), "me/clibd-demo", "--private"]) == 0
    (_, repo, create_kwargs), (_, repo2, _, files, readme) = FakeApi.calls
    assert repo == repo2 == "me/clibd-demo" and create_kwargs["private"] is True
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "config.yaml",
            "metrics.json", "metrics.md", "README.md"} <= set(files)
    assert "| DNA -> DNA | 98.6 |" in readme


def test_push_and_pull_index_as_dataset_repo(tmp_path, monkeypatch):
    import huggingface_hub

    index = tmp_path / "refs"
    index.mkdir()
    shipped = ("barcodes.tsv", "embeddings.safetensors", "index.json", "records.tsv", "taxa.tsv")
    for name in (*shipped, "faiss-ivf.index"):
        (index / name).write_text("{}" if name == "index.json" else "x")
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert cli(["index", "push", str(index), "me/refs"]) == 0
    assert FakeApi.calls[0][2]["repo_type"] == "dataset" and FakeApi.calls[1][2]["repo_type"] == "dataset"
    assert FakeApi.calls[1][3] == list(shipped)  # the faiss file is rebuilt where needed: not shipped

    def fake_snapshot(repo_id, repo_type, revision, token, local_dir, ignore_patterns):
        """The Hub's side: the repo holds what was pushed; download all that the patterns keep."""
        assert repo_type == "dataset" and repo_id == "me/refs"
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in FakeApi.calls[1][3]:
            if not any(fnmatch(name, pattern) for pattern in ignore_patterns):
                (Path(local_dir) / name).write_text((index / name).read_text())
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert cli(["index", "pull", "me/refs", "--out", str(tmp_path / "pulled")]) == 0
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == list(shipped)  # barcodes.tsv, taxa.tsv too
    assert cli(["index", "push", str(tmp_path), "me/refs"]) == 2  # not an index: clear error


def test_model_and_processor_push_to_hub_standard_path(run_dir, monkeypatch):
    """`push_to_hub` is transformers' own: repo created, files saved to a folder and uploaded."""
    from transformers.utils import PushToHubMixin, hub

    uploads = []

    class Repo:
        repo_id = "me/clibd-demo"

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return Repo()

    class Card:
        def save(self, path):
            Path(path).write_text("card")

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: Card())
    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files",
                        lambda self, folder, repo_id, **k: uploads.append((repo_id, sorted(p.name for p in Path(folder).iterdir()))))
    model = CLIBDModel.from_pretrained(run_dir / "best")
    processor = CLIBDProcessor.from_pretrained(run_dir / "best")
    model.push_to_hub("me/clibd-demo")
    processor.push_to_hub("me/clibd-demo")
    assert "model.safetensors" in uploads[0][1] and "config.json" in uploads[0][1]
    assert {"processor_config.json", "tokenizer_config.json"} <= set(uploads[1][1])
