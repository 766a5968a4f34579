"""The training loop: Accelerate (CPU, one GPU or many), AdamW + one-cycle, bf16 where available,
checkpoints every N steps and at epoch end, exact resume, best model by validation retrieval.

`train` reads top to bottom as its steps: build data, build model and processor, build the
objective, optimiser and schedule, resume, then train one epoch / validate until done, and the
final evaluation on the test split. The repeating steps live in `steps.py`.

Usage:
    result = train(ExperimentConfig.from_yaml("configs/demo.yaml"), resume=True)
    print(result.table)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer

from ..atomic import atomic_directory, atomic_write_text
from ..configuration_clibd import CLIBDConfig
from ..data import load_splits, split_statistics
from ..data.collate import ContrastiveCollator, has_modalities, unreadable_barcodes
from ..evaluation.retrieval import evaluate_retrieval, evaluation_pairs
from ..evaluation.tables import render_report
from ..modeling_clibd import CLIBDModel
from ..objectives import Objective, create_objective
from ..processing import CLIBDProcessor
from .checkpointing import TrainState, latest_checkpoint, load_checkpoint, save_pretrained_atomic
from .config import ExperimentConfig, TrainSection
from .steps import TrainData, TrainingRun, end_epoch, train_one_epoch
from .trainable import configure_trainable

LR_REFERENCE_BATCH = 500  # `max_lr` is the learning rate at this global batch; scaled linearly


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
    """What `train` hands back: the run folder, the best validation score, and the test metrics
    and table of the best model (None and "" when `max_steps` stopped the run, or off the main process)."""

    run_dir: Path
    best_score: float
    test_metrics: dict | None
    table: str


def train(config: ExperimentConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as `config` says; with `resume`, continue from the latest checkpoint in the run folder.

    Usage:
        result = train(ExperimentConfig.from_yaml("configs/smoke.yaml"))
    """
    cfg = config.train
    # cpu=True on a machine without CUDA: accelerate then runs several processes with gloo (MULTI_CPU).
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision), cpu=not torch.cuda.is_available())
    run_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)
    data = build_data(config, accelerator, run_dir)
    model, processor, objective = build_model(config)
    model.config.trained_species = trained_species(data.train_set, model.config.trained_species
                                                   if config.model.init_from else [])
    collator = ContrastiveCollator(processor, config.model.modalities, train=True, seed=cfg.seed,
                                   label_ranks=objective.label_ranks)
    optimizer, scheduler = build_optimizer_and_schedule(model, cfg, data)
    loader = build_loader(data.train_set, collator, config)
    # The scheduler stays ours (stepped once per global step); accelerate would step it once per process.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = resume_state(accelerator, scheduler, run_dir, resume)
    run = TrainingRun(config, accelerator, run_dir, data, model, processor, objective, collator, optimizer,
                      scheduler, loader, state, writer=_log_writer(run_dir) if accelerator.is_main_process else None)
    finished = True  # False once `max_steps` stops the run mid-epoch
    while finished and state.epoch < cfg.epochs:
        finished = train_one_epoch(run, progress)
        if finished:
            end_epoch(run)
    return final_evaluation(run, finished, progress)


def build_data(config: ExperimentConfig, accelerator: Accelerator, run_dir: Path) -> TrainData:
    """Load and split the records, keep those with every modality for training, and record the
    config and the split in the run folder."""
    cfg = config.train
    modalities = config.model.modalities
    splits = load_splits(config.data)
    if "dna" in modalities:
        splits = _without_unreadable_barcodes(splits, config, accelerator)
    train_set = datasets.concatenate_datasets([splits[n] for n in train_split_names(config, splits)])
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
        if "dna" in modalities:
            _report_truncation(accelerator, config, train_set)
    return TrainData(splits, train_set, global_batch, steps_per_epoch)


def _without_unreadable_barcodes(splits: datasets.DatasetDict, config: ExperimentConfig,
                                 accelerator: Accelerator) -> datasets.DatasetDict:
    """The splits without records whose barcode the DNA tower cannot read (`unreadable_barcodes`),
    named once here: one in a batch would stop training or evaluation mid-run."""
    settings = config.model_config().dna_config.processor_settings()
    dropped = {name: set(unreadable_barcodes(part, settings)) for name, part in splits.items()}
    ids = sorted({i for found in dropped.values() for i in found})
    if not ids:
        return splits
    accelerator.print(f"{len(ids)} records left out: their barcode has no k-mer the DNA tower can read (too short "
                      f"or too ambiguous): {', '.join(ids[:10])}" + (" ..." if len(ids) > 10 else ""))
    return datasets.DatasetDict({name: part.filter(lambda row, drop=dropped[name]: row["id"] not in drop)
                                 if dropped[name] else part for name, part in splits.items()})


def _report_truncation(accelerator: Accelerator, config: ExperimentConfig, train_set: datasets.Dataset) -> None:
    """How many training barcodes a token-reading DNA tower truncates (k-mer profiles read them whole)."""
    limit = config.model_config().dna_config.processor_settings().get("max_sequence_length")
    if limit is None:
        return
    long = [record_id for record_id, dna in zip(train_set["id"], train_set["dna"], strict=True) if len(dna) > limit]
    if long:  # named once here, not every epoch (the training collator does not warn)
        shown = ", ".join(long[:10]) + (" ..." if len(long) > 10 else "")
        accelerator.print(f"{len(long)} of {len(train_set)} training barcodes are longer than {limit} bp and are "
                          f"truncated: {shown}")


def build_model(config: ExperimentConfig, model_config: CLIBDConfig | None = None,
                ) -> tuple[CLIBDModel, CLIBDProcessor, Objective]:
    """The model to train (pretrained towers, or `model.init_from`), the processor that feeds it
    and the objective; trainable parameters set as the config says, the temperature frozen where
    the objective does not use it or `train.fixed_temperature` fixes it. `model_config` replaces
    `config.model_config()` (benchmarks).

    Usage:
        model, processor, objective = build_model(ExperimentConfig.from_yaml("configs/demo.yaml"))
    """
    cfg = config.train
    model = (CLIBDModel.from_pretrained(config.model.init_from) if config.model.init_from
             else CLIBDModel.from_pretrained_towers(model_config or config.model_config()))
    if not config.model.init_from and hasattr(model.dna_encoder, "load_pretrained") \
            and not model.config.dna_config.pretrained_model_name_or_path:  # the paper starts from BarcodeBERT
        logging.getLogger(__name__).warning(
            "DNA tower starts from random weights: set model.dna.pretrained_model_name_or_path (e.g. "
            "barcodebert-canada-1.5m-5mer, the paper's BarcodeBERT) to start it from a pretrained BarcodeBERT")
    configure_trainable(model, frozen=cfg.freeze, lora_rank=cfg.lora_rank if cfg.lora else None)
    objective = create_objective(cfg, model)
    if cfg.fixed_temperature is not None:
        # As the official `fix_temperature`: the loss scales by 1 / temperature, which never trains.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / cfg.fixed_temperature))
    if not objective.trains_temperature or cfg.fixed_temperature is not None:
        model.logit_scale.requires_grad_(False)
    tokenizer_source = config.text_tokenizer_source()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source) if tokenizer_source else None
    return model, CLIBDProcessor.from_model_config(model.config, tokenizer), objective


def build_optimizer_and_schedule(
    model: CLIBDModel, cfg: TrainSection, data: TrainData,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and a one-cycle schedule over every step of the run."""
    lr = cfg.max_lr * data.global_batch / LR_REFERENCE_BATCH
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=cfg.epochs * data.steps_per_epoch, pct_start=cfg.pct_start,
        anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4, cycle_momentum=False)
    return optimizer, scheduler


def build_loader(train_set: datasets.Dataset, collator: ContrastiveCollator, config: ExperimentConfig) -> DataLoader:
    """Batches in a per-epoch permutation that depends on (seed, epoch) alone, last partial batch dropped."""
    cfg = config.train
    return DataLoader(train_set, batch_size=cfg.batch_size, collate_fn=collator, drop_last=True,
                      sampler=EpochPermutationSampler(len(train_set), cfg.seed),
                      num_workers=config.data.num_workers, persistent_workers=False,
                      # its own generator: starting an epoch must not draw from the global RNG
                      # (dropout), or a resumed run would see other dropout masks
                      generator=torch.Generator().manual_seed(cfg.seed))


def resume_state(accelerator: Accelerator, scheduler: torch.optim.lr_scheduler.LRScheduler, run_dir: Path,
                 resume: bool) -> TrainState:
    """A fresh training state; with `resume`, the latest checkpoint's (and the schedule's) restored."""
    state = TrainState()
    if resume and (checkpoint := latest_checkpoint(run_dir)) is not None:
        load_checkpoint(accelerator, checkpoint, state, scheduler)
        accelerator.print(f"resumed from {checkpoint} (epoch {state.epoch}, step {state.global_step})")
    return state


def final_evaluation(run: TrainingRun, finished: bool, progress: bool) -> TrainResult:
    """Save the final model, then evaluate the best one (else the final one) on the test split and
    write metrics.json and metrics.md. Nothing is evaluated when `max_steps` stopped the run."""
    accelerator, run_dir = run.accelerator, run.run_dir
    if accelerator.is_main_process and finished:
        save_pretrained_atomic(accelerator.unwrap_model(run.model), run.processor, run_dir / "final")
    if not finished or not accelerator.is_main_process:
        return TrainResult(run_dir, run.state.best_score, None, "")
    best_dir = run_dir / "best" if (run_dir / "best").exists() else run_dir / "final"
    best = CLIBDModel.from_pretrained(best_dir).to(accelerator.device)
    test_metrics = evaluate_retrieval(best, run.processor, run.data.splits, "test",
                                      evaluation_pairs(run.config.model.modalities),
                                      batch_size=run.config.train.eval_batch_size, progress=progress)
    atomic_write_text(run_dir / "metrics.json", json.dumps(test_metrics, indent=2))
    # the paper's layout (Tables 1 and 5, every pair at top-1/3/5), as evaluate_retrieval.py writes it
    table = render_report(test_metrics, run.config.model.modalities, title=f"Test retrieval accuracy, model {best_dir.name}")
    atomic_write_text(run_dir / "metrics.md", table + "\n")
    return TrainResult(run_dir, run.state.best_score, test_metrics, table)


def save_splits(splits: datasets.DatasetDict, target: Path) -> None:
    """The split as a DatasetDict on disk (`datasets.load_from_disk`), swapped into place when written.
    Empty splits are left out: datasets cannot load a saved table without rows."""
    with atomic_directory(target) as tmp:
        datasets.DatasetDict({name: part for name, part in splits.items() if len(part)}).save_to_disk(str(tmp))


def trained_species(train_set: datasets.Dataset, started_from: Collection[str] | None = ()) -> list[str] | None:
    """The species the model will have been trained on, sorted (saved in its config: index
    calibration holds the others out, `clibd.novelty.calibration_sample`): those of the training
    records and `started_from`, the ones of the model training starts from (`model.init_from`).
    None (not known) where that model does not say, or the records name no species. The towers'
    own pretraining (BarcodeBERT's masked k-mers, ImageNet) learns no species: not counted.

    Usage:
        model.config.trained_species = trained_species(train_set, start_model.config.trained_species)
    """
    names = {name for name in train_set["species"] if name} if "species" in train_set.column_names else set()
    if started_from is None or not names:
        return None
    return sorted(names | set(started_from))


def train_split_names(config: ExperimentConfig, splits: datasets.DatasetDict) -> list[str]:
    """The configured training splits that exist in this data (an error if none do)."""
    names = [name for name in config.data.train_splits if name in splits]
    if not names:
        raise ValueError(f"none of data.train_splits {config.data.train_splits} exist; splits are {list(splits)}")
    return names


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
