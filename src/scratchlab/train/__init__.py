"""Training: optimizer and schedules, the loop (checkpoints live with the run records in runs/)."""

from scratchlab.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
