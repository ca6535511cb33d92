"""Findings: what the doctor says, with a stable code, a severity, one actionable line and evidence.

Codes are API: tools and users match on them. Every code is in `CATALOG` (with its cause
and fix) and documented in docs/findings.md; a code is never renamed silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from scratchlab.fileio import MAX_STEP, read_jsonl

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class CodeInfo:
    severity: Severity
    title: str
    cause: str
    fix: str


@dataclass
class Finding:
    code: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    step: int | None = None

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        if row["step"] is None:
            del row["step"]
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "Finding":
        return cls(
            code=row["code"],
            severity=row["severity"],
            message=row["message"],
            evidence=row.get("evidence", {}),
            step=row.get("step"),
        )

    def __str__(self) -> str:
        where = f" (step {self.step})" if self.step is not None else ""
        return f"[{self.severity}] {self.code}{where}: {self.message}"


CATALOG: dict[str, CodeInfo] = {}


def register(code: str, severity: Severity, title: str, cause: str, fix: str) -> None:
    info = CodeInfo(severity, title, cause, fix)
    if CATALOG.get(code, info) != info:  # the same entry again is harmless (`python -m ...catalog`)
        raise ValueError(f"finding code {code!r} registered twice with different meanings")
    CATALOG[code] = info


def make_finding(code: str, message: str, *, step: int | None = None, severity: Severity | None = None,
                 **evidence: Any) -> Finding:
    """A Finding for a catalogued code; the severity defaults to the catalog's."""
    info = CATALOG[code]  # KeyError = a code that is not documented: a bug
    return Finding(code=code, severity=severity or info.severity, message=message, evidence=evidence, step=step)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.step or 0, f.code))


def write_findings(path: Path, findings: list[Finding]) -> None:
    """Append findings to a findings.jsonl file (one JSON object a line)."""
    with open(path, "a", encoding="utf-8") as out:
        for f in findings:
            out.write(json.dumps(f.to_json(), default=float) + "\n")


def _check_finding(row: dict[str, Any]) -> str | None:
    if not isinstance(row.get("code"), str) or not isinstance(row.get("message"), str):
        return "a finding without a string code and message"
    if row.get("severity") not in SEVERITY_ORDER:
        return "a finding with an unknown severity"
    if not isinstance(row.get("evidence", {}), dict):
        return "a finding whose evidence is not an object"
    step = row.get("step")
    if step is not None and not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= MAX_STEP):
        return "a finding whose step is not a count"
    return None


def read_findings(path: Path) -> list[Finding]:
    """The findings of a findings.jsonl; a torn last line is skipped, any other bad line warned about and skipped."""
    return [Finding.from_json(row) for row in read_jsonl(path, _check_finding)]


def sig(x: float, digits: int = 4) -> float | str:
    """A float rounded to a few significant digits for the evidence (JSON has no NaN/Inf: those as text)."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else str(x)
