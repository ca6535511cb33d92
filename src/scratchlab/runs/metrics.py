"""The one metrics logger: every metric of a run goes through here into ``metrics.jsonl``.

One JSON object per line, flushed as written, so a crashed run stays readable and
other tools (doctor, compare, report, sinks) read exactly what people read.
Train rows carry: step, tokens, loss, lr, grad_norm (before clipping), clip_threshold,
clipped, clip_ratio (clipped fraction of the last 100 steps), tokens_per_s.
Eval rows carry: step, tokens, val_loss, val_bpb. These names are a public contract.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; write them as strings so the row stays valid and visible.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete rows; a torn last line (crash mid-write) is skipped, not fatal."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_after(path: Path, step: int) -> int:
    """Drop rows logged after ``step`` (work lost since the checkpoint a resume starts from)."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)
    return len(rows) - len(kept)
