"""The one metrics logger: every metric of a run goes through here into ``metrics.jsonl``.

One JSON object per line, flushed as written, so a crashed run stays readable and
other tools (doctor, compare, report, sinks) read exactly what people read.
Train rows carry: step, tokens, loss, lr, grad_norm (before clipping), clip_threshold,
clipped, clip_ratio (clipped fraction of the last 100 steps), tokens_per_s.
Eval rows carry: step, tokens, val_loss, val_bpb. These names are a public contract.

The logger also fans each row, the config and the doctor's findings out to experiment-tracker
sinks (runs/sinks.py: TensorBoard, W&B, MLflow). A sink that raises is warned about once and
dropped: metrics.jsonl is always written first and a tracker never stops training.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scratchlab.errors import shorten
from scratchlab.fileio import RecordWriteError, atomic_write, is_count, read_jsonl, why

if TYPE_CHECKING:
    from scratchlab.doctor.findings import Finding
    from scratchlab.runs.sinks import Sink


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; write them as strings so the row stays valid and visible.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class MetricsLogger:
    """Appends rows to ``path`` (metrics.jsonl) and mirrors rows, config and findings to ``sinks``."""

    def __init__(self, path: Path, sinks: Iterable["Sink"] = (), warn: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self.sinks: list[Sink] = list(sinks)
        self._warn = warn or _warn

    def log(self, row: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            self._file.flush()
        except OSError as exc:  # a full disk: one line naming the file, the run records the crash
            raise RecordWriteError(f"could not append to {self.path}: {why(exc)}") from exc
        self._fan_out("log_row", row)

    def log_config(self, config: dict[str, Any]) -> None:
        self._fan_out("log_config", config)

    def log_finding(self, finding: "Finding") -> None:
        self._fan_out("log_finding", finding)

    def close(self, status: str = "finished") -> None:
        self._fan_out("close", status)
        self.sinks = []
        self._file.close()

    def _fan_out(self, method: str, arg: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(arg)
            except Exception as exc:  # noqa: BLE001 - library missing, network, disk: never stop training
                self.sinks.remove(sink)
                self._warn(f"warning: the {sink.name} sink failed in {method} ({type(exc).__name__}: {exc}); "
                           "it is off for the rest of this run, metrics.jsonl is complete")
                if method != "close":
                    try:
                        sink.close("crashed")
                    except Exception:  # noqa: BLE001 - it is already broken; just free what it holds
                        pass


def _check_row(row: dict[str, Any]) -> str | None:
    for key in ("step", "tokens"):
        if key in row and not is_count(row[key]):
            return f"a row whose {key} is {shorten(row[key], 40)}, not a count"
    return None


def read_metrics(path: Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """All complete rows (objects whose step and tokens are counts).

    A torn last line (crash mid-write) is skipped silently; any other bad line is skipped with one
    warning naming the file and line, or, with ``strict`` (a resume), refused as a UserError.
    """
    return read_jsonl(path, _check_row, strict=strict)


def truncate_after(path: Path, step: int, rows: list[dict[str, Any]] | None = None) -> int:
    """Drop rows logged after ``step`` (work lost since the checkpoint a resume starts from); atomic rewrite."""
    rows = read_metrics(path) if rows is None else rows
    kept = [r for r in rows if r.get("step", 0) <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(rows) - len(kept)
