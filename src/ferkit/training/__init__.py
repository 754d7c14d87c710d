"""Training: configuration and the training loop."""

from ferkit.training.config import TrainConfig
from ferkit.training.trainer import RunResult, train

__all__ = ["RunResult", "TrainConfig", "train"]
