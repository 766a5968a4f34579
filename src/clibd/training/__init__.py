"""Training: YAML config -> data -> model -> objective -> the Accelerate loop (`train`)."""

from .config import DataSection, ExperimentConfig, ModelSection, TrainSection
from .loop import TrainResult, train

__all__ = ["DataSection", "ExperimentConfig", "ModelSection", "TrainResult", "TrainSection", "train"]
