"""Run directories: where a run's config, environment, metrics, checkpoints and demos live."""

from scratchlab.runs.metrics import MetricsLogger, read_metrics
from scratchlab.runs.store import RunDir

__all__ = ["MetricsLogger", "read_metrics", "RunDir"]
