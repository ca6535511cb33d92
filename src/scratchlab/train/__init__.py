"""Training: optimizer and schedules, checkpoints, the loop."""

from scratchlab.train.evaluate import evaluate
from scratchlab.train.loop import TrainResult, load_run_model, train

__all__ = ["TrainResult", "evaluate", "load_run_model", "train"]
