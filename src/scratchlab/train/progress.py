"""What a person sees while a run trains: a rich progress bar on a TTY, plain lines otherwise.

Every message also goes to the run's ``train.log``.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    def __init__(self, console: Console, mode: str = "auto") -> None:
        self.console = console
        self.use_bar = mode == "bar" or (mode == "auto" and console.is_terminal)
        self._log = None
        self._progress: Progress | None = None
        self._task = None

    def attach_log(self, path: Path) -> None:
        self._log = open(path, "a", encoding="utf-8")

    def info(self, message: str, style: str | None = None) -> None:
        self.console.print(message, style=style, highlight=False, markup=False, soft_wrap=True)
        self._write(message)

    def _write(self, message: str) -> None:
        if self._log is not None:
            self._log.write(f"{time.strftime('%H:%M:%S')} {message}\n")
            self._log.flush()

    def start(self, total_steps: int, done_steps: int) -> None:
        if not self.use_bar:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=done_steps, stats="")

    def step(self, step: int, row: dict) -> None:
        """Called on every logged training step (row is the metrics row)."""
        stats = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  gnorm {row['grad_norm']:.2f}  {row['tokens_per_s']:,.0f} tok/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
            self._write(f"step {step}  {stats}")
        else:
            self.info(f"step {step}  {stats}")

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
