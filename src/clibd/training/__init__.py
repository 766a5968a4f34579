"""Training: YAML config -> data -> model -> the Accelerate loop."""

from .config import DataSection, ExperimentConfig, ModelSection, TrainSection
from .loop import TrainResult, load_splits, train

__all__ = ["DataSection", "ExperimentConfig", "ModelSection", "TrainResult", "TrainSection", "load_splits", "train"]
