"""Files and folders that are either complete or absent: written beside the target, then renamed.

Usage:
    atomic_write_text(Path("metrics.json"), text)
    atomic_write(Path("refs/ivf.faiss"), lambda tmp: faiss.write_index(index, str(tmp)))
    with atomic_directory(Path("runs/demo/best")) as tmp:
        model.save_pretrained(tmp)          # `best` is replaced only if this block succeeds
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` beside `path` under a name of this writer's own, then rename it to `path`:
    writers of the same file at once each rename a complete file, and a failed write
    leaves `path` as it was and no temporary file behind.

    Usage:
        atomic_write(Path("refs/ivf.faiss"), lambda tmp: faiss.write_index(index, str(tmp)))
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # threads and hosts too
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `target` that replaces it when the block ends without error;
    a symbolic link is followed (the folder it names is replaced, the link kept)."""
    target = Path(target).resolve() if Path(target).is_symlink() else Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:  # interrupted or failed: `target` stays as it was, nothing half-written is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
