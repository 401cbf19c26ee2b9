"""Training: the config, the trainer, the main job, and the `train` and `tokenize` subcommands."""

from .config import TrainConfig
from .run import TrainResult, train
from .trainer import OptimConfig, Trainer

__all__ = ["OptimConfig", "TrainConfig", "TrainResult", "Trainer", "train"]
