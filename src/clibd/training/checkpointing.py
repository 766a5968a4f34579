"""Checkpoints that survive interruption: written to a temporary folder, then renamed into place.

Accelerate saves the prepared objects (model, optimiser, dataloader position) and the RNG states;
clibd saves its own state (where training is, the learning-rate schedule) in `clibd_state.pt`,
read back with `torch.load(weights_only=True)`. It is not registered with accelerate, which would
unpickle it with `weights_only=False`: a checkpoint folder from elsewhere cannot run code on resume.

Usage:
    save_checkpoint(accelerator, run_dir, state, scheduler)     # run_dir/checkpoints/step-000120
    load_checkpoint(accelerator, latest_checkpoint(run_dir), state, scheduler)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ..atomic import atomic_directory, atomic_write_text

KEEP_CHECKPOINTS = 2
CLIBD_STATE = "clibd_state.pt"  # TrainState and the schedule: plain numbers only


@dataclass
class TrainState:
    """Where training is: restored with the model, optimiser, scheduler and RNG on resume."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float = float("-inf")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainState,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> Path:
    """Save model, optimiser, RNG, `state` and `scheduler` (all processes call this)."""
    folder = run_dir / "checkpoints"
    final = folder / f"step-{state.global_step:08d}"
    tmp = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({"train_state": state.state_dict(), "scheduler": scheduler.state_dict()}, tmp / CLIBD_STATE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(folder / "latest", final.name)
        for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, state: TrainState,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Restore a checkpoint written by `save_checkpoint` into the prepared objects, `state` and
    `scheduler`. clibd's own state is read with `weights_only=True`: a file holding anything but
    numbers, lists and dicts is refused instead of unpickled."""
    own = Path(checkpoint) / CLIBD_STATE
    if not own.exists():
        raise FileNotFoundError(f"{checkpoint}: no {CLIBD_STATE} (a checkpoint of an older clibd, whose state "
                                "accelerate pickled): start the run afresh, without --resume")
    accelerator.load_state(str(checkpoint))
    saved = torch.load(own, map_location="cpu", weights_only=True)
    state.load_state_dict(saved["train_state"])
    scheduler.load_state_dict(saved["scheduler"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `save_checkpoint` wrote last in `run_dir`, or None (none yet, or it is gone)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_pretrained_atomic(model, processor, target: Path, extra: dict | None = None) -> None:
    """`save_pretrained` of model and processor into `target`, replacing it only when complete."""
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if extra:
            (tmp / "training_info.json").write_text(json.dumps(extra, indent=2))
