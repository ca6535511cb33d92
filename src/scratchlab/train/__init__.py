"""Training: optimizer and schedules, checkpoints, the loop."""

from scratchlab.train.loop import TrainResult, evaluate, load_run_model, train

__all__ = ["TrainResult", "evaluate", "load_run_model", "train"]
