"""Training: optimizer and schedules, the step loop (loop.py), a run's start / resume (run.py); checkpoints
live with the run records in runs/."""

from scratchlab.train.loop import TrainResult
from scratchlab.train.run import train

__all__ = ["TrainResult", "train"]
