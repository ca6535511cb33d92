"""What `scratchlab data text` shows: a progress bar while it runs and the summary after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from scratchlab.data.prepare import ProgressHook


def say(announce, message: str) -> None:
    """Tell ``announce`` a line: a callable(str), or the trainer's reporter (its ``info``); None says nothing."""
    if announce is None:
        return
    info = getattr(announce, "info", None)
    (info if callable(info) else announce)(message)


@contextmanager
def text_progress(console) -> Iterator[ProgressHook]:
    """A rich progress bar (MB read, tokens written, MB/s, ETA) fed by `prepare_text`'s hook (terminals only:
    a log or a pipe gets the summary alone)."""
    if not console.is_terminal:
        yield lambda phase, done, total, tokens: None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn("{task.description:<16}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[tokens]:>14,} tokens"), TimeRemainingColumn(), console=console,
                   transient=False)
    tasks: dict[str, int] = {}

    def hook(phase: str, done: int, total: int, tokens: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=max(total, 1), tokens=0)
        bar.update(tasks[phase], completed=min(done, total), tokens=tokens)

    with bar:
        yield hook


def summary_lines(meta: dict) -> list[str]:
    """Documents, tokens, bytes/token, the train/val counts and skipped records by reason."""
    s = meta["splits"]
    docs = s["train"]["documents"] + s["val"]["documents"]
    tokens = s["train"]["tokens"] + s["val"]["tokens"]
    text_bytes = s["train"]["bytes"] + s["val"]["bytes"]
    per_token = text_bytes / max(tokens - docs, 1)  # EOS tokens carry no text
    lines = [
        f"documents {docs:,}, tokens {tokens:,} (vocab {meta['vocab_size']:,}), {text_bytes / 1e6:,.1f} MB of text, "
        f"{per_token:.2f} bytes/token",
        f"train {s['train']['documents']:,} docs / {s['train']['tokens']:,} tokens; "
        f"val {s['val']['documents']:,} docs / {s['val']['tokens']:,} tokens",
    ]
    skipped = meta.get("skipped") or {}
    if skipped:
        lines.append("skipped " + ", ".join(f"{n:,} {reason}" for reason, n in skipped.items()))
    sample = meta.get("tokenizer") or {}
    if "given" in sample:
        lines.append(f"tokenizer: {sample['given']}")
    elif sample:
        lines.append(f"tokenizer trained on {sample.get('documents', 0):,} documents, "
                     f"{sample.get('bytes', 0) / 1e6:,.1f} MB (--tokenizer-sample-mb {sample.get('max_mb')})")
    return lines


@contextmanager
def count_progress(console) -> Iterator:
    """A rich progress bar over items (clips), fed as ``hook(phase, done, total)`` (terminals only)."""
    if not console.is_terminal:
        yield lambda phase, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console)
    tasks: dict[str, int] = {}

    def hook(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=max(total, 1))
        bar.update(tasks[phase], completed=done)

    with bar:
        yield hook
