"""Training: configuration and the training loop."""

from ferkit.training.config import RESUME_SETTINGS, TrainConfig
from ferkit.training.trainer import RunResult, TrainingError, create_run, hold_run, train

__all__ = ["RESUME_SETTINGS", "RunResult", "TrainConfig", "TrainingError", "create_run", "hold_run", "train"]
