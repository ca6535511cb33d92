"""What a person sees while a run trains: a rich progress bar on a TTY, plain lines otherwise.

Every message also goes to the run's ``train.log``. Output can fail, training cannot: a closed or
broken stdout (``scratchlab train ... | head -1``) turns the console off for the rest of the run,
silently; train.log and the run record keep everything.
"""

from __future__ import annotations

import contextlib
import os
import sys
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
        self.console_broken = False  # stdout went away: nothing more is printed, the log goes on
        # rich's default answer to EPIPE is SystemExit(1), which would end the run unsaved: degrade instead.
        console.on_broken_pipe = self._broken_pipe  # type: ignore[method-assign]

    def _broken_pipe(self) -> None:
        self.console.quiet = True
        if self.console.file is sys.stdout:  # so the interpreter's exit flush cannot fail either
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
        if not self.console_broken:
            self._console_gone()

    def attach_log(self, path: Path) -> None:
        self._log = open(path, "a", encoding="utf-8")

    def info(self, message: str, style: str | None = None) -> None:
        self._print(message, style)
        self._write(message)

    def _print(self, message: str, style: str | None = None) -> None:
        if self.console_broken:
            return
        try:
            self.console.print(message, style=style, highlight=False, markup=False, soft_wrap=True)
        except (OSError, ValueError):  # EPIPE, or "I/O operation on closed file"
            self._console_gone()

    def _console_gone(self) -> None:
        self.console_broken = True
        self._write("(console output failed: stdout is closed or broken; the run goes on, logged here)")
        if self._progress is not None:
            progress, self._progress = self._progress, None
            try:
                progress.stop()
            except (OSError, ValueError):
                pass

    def _write(self, message: str) -> None:
        if self._log is not None:
            try:
                self._log.write(f"{time.strftime('%H:%M:%S')} {message}\n")
                self._log.flush()
            except (OSError, ValueError):
                pass  # a full disk fails the next checkpoint with a clear message; the log must not stop the run

    def start(self, total_steps: int, done_steps: int) -> None:
        if not self.use_bar or self.console_broken:
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
        try:
            self._progress.start()
        except (OSError, ValueError):
            self._console_gone()
            return
        self._task = self._progress.add_task("train", total=total_steps, completed=done_steps, stats="")

    def step(self, step: int, row: dict) -> None:
        """Called on every logged training step (row is the metrics row)."""
        stats = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  gnorm {row['grad_norm']:.2f}  {row['tokens_per_s']:,.0f} tok/s"
        if self._progress is not None:
            try:
                self._progress.update(self._task, completed=step, stats=stats)
            except (OSError, ValueError):
                self._console_gone()
            self._write(f"step {step}  {stats}")
        else:
            self.info(f"step {step}  {stats}")

    def advance(self, step: int) -> None:
        if self._progress is not None:
            try:
                self._progress.update(self._task, completed=step)
            except (OSError, ValueError):
                self._console_gone()

    def stop(self) -> None:
        if self._progress is not None:
            progress, self._progress = self._progress, None
            try:
                progress.stop()
            except (OSError, ValueError):
                self.console_broken = True

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            try:
                self._log.close()
            except OSError:
                pass
            self._log = None
