"""Files and folders are either complete or as they were: never half-written, no temporaries left."""

from __future__ import annotations

import pytest

from clibd.atomic import atomic_directory, atomic_write, atomic_write_text


def test_an_interrupted_write_leaves_the_file_as_it_was_and_no_temporary(tmp_path):
    target = tmp_path / "index.json"
    atomic_write_text(target, "complete")

    def fails_half_way(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_half_way)
    assert target.read_text() == "complete" and [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_an_interrupted_folder_leaves_the_old_one_and_no_temporary(tmp_path):
    target = tmp_path / "best"
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt
    assert (target / "model.safetensors").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
