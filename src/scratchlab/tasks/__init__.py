"""Model families' training tasks by ``model.family``; see tasks/base.py."""

from __future__ import annotations

from scratchlab.tasks.base import Batch, LossOutput, Task

__all__ = ["Batch", "LossOutput", "Task", "task_class"]


def task_class(family: str) -> type[Task]:
    """The Task class for ``model.family`` (imported lazily: a family's deps load only when used)."""
    if family == "lm":
        from scratchlab.tasks.lm import LMTask

        return LMTask
    if family == "codec_lm":
        from scratchlab.tasks.codec import CodecTask

        return CodecTask
    if family == "cascade":
        from scratchlab.tasks.cascade import CascadeTask

        return CascadeTask
    raise ValueError(f"unknown model.family {family!r}; known: lm, codec_lm, cascade")
