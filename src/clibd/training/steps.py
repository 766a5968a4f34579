"""The steps of one training run that repeat: train one epoch (step by step, logging and
checkpointing as it goes), validate, close the epoch. `loop.train` builds a `TrainingRun` and
calls them.

Usage:
    while run.state.epoch < run.config.train.epochs and train_one_epoch(run, progress):
        end_epoch(run)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from ..data.collate import ContrastiveCollator
from ..evaluation.retrieval import evaluate_retrieval, evaluation_pairs, selection_score
from ..objectives import Objective, output_embeds, split_labels
from ..processing import CLIBDProcessor
from .checkpointing import TrainState, save_checkpoint, save_pretrained_atomic
from .config import ExperimentConfig
from .grad_cache import grad_cache_step


@dataclass
class TrainData:
    """The records of a run: every split, the training set drawn from them, and the batch arithmetic."""

    splits: datasets.DatasetDict
    train_set: datasets.Dataset
    global_batch: int  # per-process batch x processes
    steps_per_epoch: int


@dataclass
class TrainingRun:
    """What the steps of one run share; the model, optimiser and loader are accelerate-prepared."""

    config: ExperimentConfig
    accelerator: Accelerator
    run_dir: Path
    data: TrainData
    model: torch.nn.Module
    processor: CLIBDProcessor
    objective: Objective
    collator: ContrastiveCollator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Any
    state: TrainState
    writer: Any = None  # tensorboard SummaryWriter on the main process, where installed
    steps_this_run: int = 0
    steps_since_log: int = 0
    tick: float = field(default_factory=time.perf_counter)


def train_step(run: TrainingRun, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimiser step on one batch (directly or by gradient caching); returns the loss."""
    cfg, accelerator = run.config.train, run.accelerator
    run.model.train()
    if cfg.grad_cache_chunk:
        loss = grad_cache_step(run.model, batch, run.objective, cfg.grad_cache_chunk, accelerator.backward,
                               accelerator.no_sync)
    else:
        inputs, labels = split_labels(batch)
        output = run.model(**inputs)
        loss = run.objective(output_embeds(output), labels, output.logit_scale)
        accelerator.backward(loss)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss


def log_step(run: TrainingRun, loss: torch.Tensor, bar: tqdm) -> None:
    """Append loss, lr, temperature and throughput to metrics.jsonl (and tensorboard)."""
    state, accelerator = run.state, run.accelerator
    elapsed, run.tick = time.perf_counter() - run.tick, time.perf_counter()
    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
    record = {"step": state.global_step, "epoch": state.epoch + state.step_in_epoch / run.data.steps_per_epoch,
              "loss": loss_value, "lr": run.scheduler.get_last_lr()[0],
              "temperature": 1 / accelerator.unwrap_model(run.model).logit_scale.exp().item(),
              "samples_per_s": run.data.global_batch * run.steps_since_log / max(elapsed, 1e-9)}
    run.steps_since_log = 0
    bar.set_postfix(loss=f"{loss_value:.3f}")
    if accelerator.is_main_process:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if run.writer is not None:
            for key, value in record.items():
                run.writer.add_scalar(f"train/{key}", value, state.global_step)


def train_one_epoch(run: TrainingRun, progress: bool) -> bool:
    """Train the rest of the current epoch; False when `max_steps` stopped the run before its end."""
    cfg, state, accelerator = run.config.train, run.state, run.accelerator
    run.collator.epoch = state.epoch
    run.loader.set_epoch(state.epoch)
    # After a resume mid-epoch, skip the batches already trained on (the order is the same).
    loader = accelerator.skip_first_batches(run.loader, state.step_in_epoch) if state.step_in_epoch else run.loader
    bar = tqdm(loader, total=run.data.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}",
               disable=not (progress and accelerator.is_local_main_process))
    run.tick = time.perf_counter()
    for batch in bar:
        loss = train_step(run, batch)
        state.step_in_epoch += 1
        state.global_step += 1
        run.steps_this_run += 1
        run.steps_since_log += 1
        if state.global_step % cfg.log_every == 0 or state.step_in_epoch == run.data.steps_per_epoch:
            log_step(run, loss, bar)
        if state.global_step % cfg.checkpoint_every == 0:
            save_checkpoint(accelerator, run.run_dir, state, run.scheduler)
        if cfg.max_steps is not None and run.steps_this_run >= cfg.max_steps:
            return False
    return True


def end_epoch(run: TrainingRun) -> None:
    """Count the epoch as done, validate from `eval_from_epoch` on, and checkpoint."""
    run.state.epoch += 1
    run.state.step_in_epoch = 0
    if run.config.train.validates_after(run.state.epoch):
        validate(run)
    save_checkpoint(run.accelerator, run.run_dir, run.state, run.scheduler)


def validate(run: TrainingRun) -> None:
    """Validation retrieval on the main process; keep the model if it is the best so far."""
    accelerator, state = run.accelerator, run.state
    score = [None]
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.model)
        metrics = evaluate_retrieval(unwrapped, run.processor, run.data.splits, "val",
                                     evaluation_pairs(unwrapped.config.modalities),
                                     batch_size=run.config.train.eval_batch_size)
        score = [selection_score(metrics)]
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "val_score": score[0],
                                "val": metrics}) + "\n")
        accelerator.print(f"epoch {state.epoch}: validation score {100 * score[0]:.2f}")
        if score[0] > state.best_score:
            save_pretrained_atomic(unwrapped, run.processor, run.run_dir / "best",
                                   extra={"epoch": state.epoch, "step": state.global_step, "val_score": score[0]})
    score = broadcast_object_list(score)
    if not math.isnan(score[0]) and score[0] > state.best_score:
        state.best_score = score[0]
    accelerator.wait_for_everyone()
