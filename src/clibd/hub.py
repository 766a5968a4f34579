"""The Hugging Face Hub: push a training run (model, processor, config, metrics, model card) and
push / pull a reference index as a dataset repo.

Usage:
    push_run("runs/demo", "me/clibd-bold-demo")
    push_index("refs/", "me/bold-coi-refs"); pull_index("me/bold-coi-refs", "refs/")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .model_card import render_model_card

RUN_FILES = ("config.yaml", "metrics.json", "metrics.md", "splits.md")
# what an index folder keeps that is not pushed or pulled: the persisted faiss file
# (`clibd.index_store`, rebuilt where it is needed) and hidden files
INDEX_IGNORED = ["faiss-ivf*", ".*"]


def stage_run(run_dir: str | os.PathLike, staging: Path) -> Path:
    """Copy what a run publishes into `staging`: the best (else final) model and processor, the
    run's config and metrics, and a generated model card as README.md."""
    run = Path(run_dir)
    model_dir = run / "best" if (run / "best").is_dir() else run / "final"
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{run}: no best/ or final/ model folder (has training finished?)")
    shutil.copytree(model_dir, staging, dirs_exist_ok=True)
    for name in RUN_FILES:
        if (run / name).exists():
            shutil.copy2(run / name, staging / name)
    (staging / "README.md").write_text(render_model_card(run))
    return staging


def push_run(run_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
             commit_message: str = "Upload CLIBD model with clibd") -> str:
    """Upload a run to the Hub model repo `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staging = stage_run(run_dir, Path(tmp))
        info = api.upload_folder(repo_id=repo_id, folder_path=str(staging), commit_message=commit_message)
    return str(info)


def push_index(index_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload a reference index folder to the Hub dataset repo `repo_id`."""
    from huggingface_hub import HfApi

    if not (Path(index_dir) / "index.json").exists():
        raise FileNotFoundError(f"{index_dir}: not a clibd index (no index.json)")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(index_dir),
                             commit_message="Upload clibd reference index", ignore_patterns=INDEX_IGNORED)
    return str(info)


def pull_index(repo_id: str, out: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """Download a reference index pushed with `push_index` into `out`: every file it pushed (a DNA
    index's barcodes.tsv, which its species check aligns with; a library's taxa.tsv; ...).

    Usage:
        pull_index("me/refs", "refs/")
    """
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision, token=token, local_dir=str(out),
                             ignore_patterns=INDEX_IGNORED)
    if not (Path(path) / "index.json").exists():
        raise FileNotFoundError(f"{repo_id}: the dataset repo holds no clibd index (no index.json)")
    return Path(path)
