"""The training loop: Accelerate (CPU, one GPU or many), AdamW + one-cycle, bf16 where available,
checkpoints every N steps and at epoch end, exact resume, best model by validation retrieval.

Usage:
    result = train(ExperimentConfig.from_yaml("configs/demo.yaml"), resume=True)
    print(result.table)
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..atomic import atomic_directory, atomic_write_text
from ..data import (
    official_splits,
    paper_split,
    read_bioscan,
    read_records,
    records_to_dataset,
    split_statistics,
)
from ..data.collate import ContrastiveCollator, has_modalities
from ..evaluation.retrieval import evaluate_retrieval, evaluation_pairs, format_table, selection_score
from ..loss import supervised_contrastive_loss
from ..modeling_clibd import CLIBDModel
from ..processing import CLIBDProcessor
from .checkpointing import TrainState, latest_checkpoint, save_checkpoint, save_pretrained_atomic
from .config import DataSection, ExperimentConfig
from .grad_cache import grad_cache_step
from .towers import configure_trainable

logger = logging.getLogger(__name__)

# Official partitions renamed to the paper-split names used everywhere else in clibd.
OFFICIAL_NAMES = {
    "no_split": "pretrain",  # BIOSCAN-1M, CLIBD partitioning
    "train": "train_seen", "val": "val_seen", "test": "test_seen",  # BIOSCAN-5M
    "key_unseen": "test_unseen_keys",
}


def load_splits(data: DataSection) -> datasets.DatasetDict:
    """Records of the configured source, split as configured."""
    if data.source in ("bioscan1m", "bioscan5m"):
        dataset = read_bioscan(data.path, version=data.source[-2:], image_package=data.image_package,
                               partitioning="clibd" if data.source == "bioscan1m" and data.split == "official"
                               else None)
        if data.limit is not None:
            dataset = dataset.select(range(min(data.limit, len(dataset))))
    else:
        dataset = records_to_dataset(read_records(data.path, limit=data.limit))
    if data.split == "paper":
        return paper_split(dataset, seed=data.split_seed)
    splits = datasets.DatasetDict({OFFICIAL_NAMES.get(name, name): part
                                   for name, part in official_splits(dataset).items()})
    if "seen_keys" not in splits and "train_seen" in splits:
        # BIOSCAN-5M has no separate seen keys: its train partition is the reference for seen species.
        splits["seen_keys"] = splits["train_seen"]
    return splits


class EpochPermutationSampler(Sampler[int]):
    """A fresh permutation each epoch, from (seed, epoch) alone: a resumed run sees the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        yield from torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()


@dataclass
class TrainResult:
    run_dir: Path
    best_score: float
    test_metrics: dict | None
    table: str


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _log_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(config: ExperimentConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as `config` says; with `resume`, continue from the latest checkpoint in the run folder."""
    cfg = config.train
    # cpu=True on a machine without CUDA: accelerate then runs several processes with gloo (MULTI_CPU).
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision), cpu=not torch.cuda.is_available())
    run_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)
    model_config = config.model_config()
    modalities = model_config.modalities

    splits = load_splits(config.data)
    train_set = datasets.concatenate_datasets([splits[n] for n in cfg_train_splits(config, splits)])
    train_set = has_modalities(train_set, modalities)
    global_batch = cfg.batch_size * accelerator.num_processes
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training records cannot fill one global batch of {global_batch}")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        table = split_statistics(splits)
        atomic_write_text(run_dir / "splits.md", table + "\n")
        save_splits(splits, run_dir / "splits")
        accelerator.print(table)
        if "dna" in modalities and model_config.dna_config.encoder == "bert":  # profiles read the whole barcode
            long = sum(len(s) > model_config.dna_config.max_sequence_length for s in train_set["dna"])
            accelerator.print(f"{long} of {len(train_set)} training barcodes are longer than "
                              f"{model_config.dna_config.max_sequence_length} bp and are truncated")

    model = (CLIBDModel.from_pretrained(config.model.init_from) if config.model.init_from
             else CLIBDModel.from_pretrained_towers(model_config))
    configure_trainable(model, frozen=cfg.freeze, lora_rank=cfg.lora_rank if cfg.lora else None)
    if cfg.objective == "supcon":
        model.logit_scale.requires_grad_(False)  # no pairwise logits: the temperature is fixed
    tokenizer_source = config.text_tokenizer_source()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source) if tokenizer_source else None
    processor = CLIBDProcessor.from_model_config(model.config, tokenizer)
    label_ranks = tuple(cfg.supcon_weights) if cfg.objective == "supcon" else ()
    collator = ContrastiveCollator(processor, modalities, train=True, seed=cfg.seed, label_ranks=label_ranks)

    lr = cfg.max_lr * global_batch / 500
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.pct_start,
        anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4, cycle_momentum=False)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, collate_fn=collator, drop_last=True,
                              sampler=EpochPermutationSampler(len(train_set), cfg.seed),
                              num_workers=config.data.num_workers, persistent_workers=False,
                              # its own generator: starting an epoch must not draw from the global RNG
                              # (dropout), or a resumed run would see other dropout masks
                              generator=torch.Generator().manual_seed(cfg.seed))
    # The scheduler stays ours (stepped once per global step); accelerate would step it once per process.
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if resume and (checkpoint := latest_checkpoint(run_dir)) is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} (epoch {state.epoch}, step {state.global_step})")

    writer = _log_writer(run_dir) if accelerator.is_main_process else None
    log_path = run_dir / "metrics.jsonl"
    steps_this_run = 0
    steps_since_log = 0
    stopped = False
    while state.epoch < cfg.epochs and not stopped:
        collator.epoch = state.epoch
        train_loader.set_epoch(state.epoch)
        loader = (accelerator.skip_first_batches(train_loader, state.step_in_epoch) if state.step_in_epoch
                  else train_loader)
        bar = tqdm(loader, total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}",
                   disable=not (progress and accelerator.is_local_main_process))
        tick = time.perf_counter()
        for batch in bar:
            model.train()
            if cfg.grad_cache_chunk:
                loss = grad_cache_step(model, batch, cfg.grad_cache_chunk, accelerator.backward, accelerator.no_sync)
            elif cfg.objective == "supcon":
                labels = {rank: batch.pop(f"labels_{rank}") for rank in cfg.supcon_weights}
                branches = accelerator.unwrap_model(model).split_dna_embeds(model(**batch).dna_embeds)
                loss = sum(weight * supervised_contrastive_loss(branch, labels[rank], cfg.supcon_temperature)
                           for branch in branches for rank, weight in cfg.supcon_weights.items())
                accelerator.backward(loss)
            else:
                loss = model(**batch, return_loss=True).loss
                accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step_in_epoch += 1
            state.global_step += 1
            steps_this_run += 1
            steps_since_log += 1
            if state.global_step % cfg.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
                record = {"step": state.global_step, "epoch": state.epoch + state.step_in_epoch / steps_per_epoch,
                          "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                          "temperature": 1 / accelerator.unwrap_model(model).logit_scale.exp().item(),
                          "samples_per_s": global_batch * steps_since_log / max(elapsed, 1e-9)}
                steps_since_log = 0
                bar.set_postfix(loss=f"{loss_value:.3f}")
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for key, value in record.items():
                            writer.add_scalar(f"train/{key}", value, state.global_step)
            if state.global_step % cfg.checkpoint_every == 0:
                save_checkpoint(accelerator, run_dir, state)
            if cfg.max_steps is not None and steps_this_run >= cfg.max_steps:
                stopped = True
                break
        if stopped:
            break
        state.epoch += 1
        state.step_in_epoch = 0
        if state.epoch >= cfg.eval_from_epoch:
            _validate(accelerator, model, processor, splits, config, state, run_dir)
        save_checkpoint(accelerator, run_dir, state)

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process and not stopped:
        save_pretrained_atomic(unwrapped, processor, run_dir / "final")
    if stopped or not accelerator.is_main_process:
        return TrainResult(run_dir, state.best_score, None, "")
    best_dir = run_dir / "best" if (run_dir / "best").exists() else run_dir / "final"
    best = CLIBDModel.from_pretrained(best_dir).to(accelerator.device)
    test_metrics = evaluate_retrieval(best, processor, splits, "test", evaluation_pairs(modalities),
                                      batch_size=cfg.eval_batch_size, progress=progress)
    atomic_write_text(run_dir / "metrics.json", json.dumps(test_metrics, indent=2))
    table = format_table(test_metrics)
    atomic_write_text(run_dir / "metrics.md", f"Test split, micro top-1 accuracy (%), model {best_dir.name}\n\n{table}\n")
    return TrainResult(run_dir, state.best_score, test_metrics, table)


def save_splits(splits: datasets.DatasetDict, target: Path) -> None:
    """The split as a DatasetDict on disk (`datasets.load_from_disk`), swapped into place when written.
    Empty splits are left out: datasets cannot load a saved table without rows."""
    with atomic_directory(target) as tmp:
        datasets.DatasetDict({name: part for name, part in splits.items() if len(part)}).save_to_disk(str(tmp))


def cfg_train_splits(config: ExperimentConfig, splits: datasets.DatasetDict) -> list[str]:
    names = [name for name in config.data.train_splits if name in splits]
    if not names:
        raise ValueError(f"none of data.train_splits {config.data.train_splits} exist; splits are {list(splits)}")
    return names


def _validate(accelerator, model, processor, splits, config, state, run_dir) -> None:
    """Validation retrieval on the main process; keep the model if it is the best so far."""
    score = [None]
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        metrics = evaluate_retrieval(unwrapped, processor, splits, "val", evaluation_pairs(unwrapped.config.modalities),
                                     batch_size=config.train.eval_batch_size)
        score = [selection_score(metrics)]
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "val_score": score[0],
                                "val": metrics}) + "\n")
        accelerator.print(f"epoch {state.epoch}: validation score {100 * score[0]:.2f}")
        if score[0] > state.best_score:
            save_pretrained_atomic(unwrapped, processor, run_dir / "best",
                                   extra={"epoch": state.epoch, "step": state.global_step, "val_score": score[0]})
    score = broadcast_object_list(score)
    if not math.isnan(score[0]) and score[0] > state.best_score:
        state.best_score = score[0]
    accelerator.wait_for_everyone()
