"""Training batches drawn one step ahead, on a background thread, from the data position.

The trainer's data generator is the data position: its state is always that of the NEXT batch
the trainer will consume (what a checkpoint saves, so a resume is bit-exact). The prefetcher
never touches it while drawing: it copies that state into its own generator, draws the next
batch on a worker thread while the current step runs, and hands back the batch together with
the state after it. A batch prefetched from a position that is no longer current (a resume,
the eager retry of a failed compile, anything that set the position) is dropped and redrawn.

On CUDA the worker also pins the batch, so that the copy to the device can be ``non_blocking``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Batch = dict[str, torch.Tensor]


class BatchPrefetcher:
    """``next()`` returns the batch at ``position`` and advances ``position`` past it; the batch after is
    then drawn in the background."""

    def __init__(self, make: Callable[[torch.Generator], Batch], position: torch.Generator, pin: bool = False) -> None:
        self.make, self.position, self.pin = make, position, pin
        self._draw = torch.Generator()  # used by one job at a time: jobs run one after another
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[torch.Tensor, Future] | None = None  # (state it starts from, its future)

    def _job(self, start: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        self._draw.set_state(start)
        batch = self.make(self._draw)
        if self.pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, self._draw.get_state()

    def next(self) -> Batch:
        start = self.position.get_state()
        pending, self._pending = self._pending, None
        if pending is not None and torch.equal(pending[0], start):
            batch, end = pending[1].result()
        else:
            if pending is not None:
                pending[1].exception()  # let a stale job finish before its generator is reused (its error is moot)
            batch, end = self._job(start)
        self.position.set_state(end)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scratchlab-batches")
        self._pending = (end, self._pool.submit(self._job, end))
        return batch

    def close(self) -> None:
        """Stop the worker (a pending batch is dropped; the position is unchanged)."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
