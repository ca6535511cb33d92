"""Diagnose a run from its run dir alone (`scratchlab doctor RUN_DIR`).

Reads metrics.jsonl, findings.jsonl, config.yaml, status.json and demos/; never a live
process, never a checkpoint's weights, so it works on a finished, stopped or crashed
run alike. The run-level checks are recomputed from the metrics (the generic monitors and the
run's family's, `families.registry.build_monitor`) and
merged with the findings the trainer recorded (preflight, divergence): one per
(code, step), the recorded one kept since it can carry evidence the metrics lack.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from scratchlab.config import Config, build_config, read_source
from scratchlab.doctor.findings import (
    CATALOG,
    SEVERITY_ORDER,
    Finding,
    make_finding,
    read_findings,
    sort_findings,
)
from scratchlab.doctor.monitors import RunMonitor
from scratchlab.errors import UserError
from scratchlab.families.registry import build_monitor
from scratchlab.fileio import to_float, warn_record
from scratchlab.runs import RunDir, read_metrics
from scratchlab.runs.checkpoint import latest_checkpoint

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


@dataclass
class Diagnosis:
    run_dir: Path
    facts: dict[str, Any]  # status, error, last/max step, train and val losses, checkpoints, demos: run_facts
    findings: list[Finding]  # sorted: errors first, then by step

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def ok(self) -> bool:
        """No error findings (warnings and info do not fail a run)."""
        return self.count("error") == 0


def diagnose(run_dir: str | Path) -> Diagnosis:
    run = RunDir.open(run_dir)  # UserError when the path is not a run dir
    rows = [row for row in read_metrics(run.metrics_file) if isinstance(row, dict)]
    cfg, config_error = _read_config(run)
    monitor = build_monitor(cfg) if cfg is not None else RunMonitor()  # the generic monitors and the family's
    findings = merge_findings(read_findings(run.findings_file), _computed_findings(run, rows, monitor))
    status = run.status()
    if status.get("status") == "crashed":
        findings = sort_findings([*findings, make_finding(
            "run_crashed", f"the run crashed at step {status.get('step', '?')}: {status.get('error', 'unknown error')}",
            step=status.get("step"), error=status.get("error"),
        )])
    elif status.get("status") == "killed":
        findings = sort_findings([*findings, _killed_finding(run, status, rows)])
    facts = run_facts(run, rows, cfg)
    if config_error:
        facts["config_error"] = config_error
    return Diagnosis(run.path, facts, findings)


def _computed_findings(run: RunDir, rows: list[dict[str, Any]], monitor: RunMonitor) -> list[Finding]:
    # The monitors read what the trainer wrote; a hand-edited or damaged row they cannot take is one warning,
    # never a traceback that hides every other finding.
    try:
        return monitor.replay(rows)
    except Exception as exc:  # noqa: BLE001 - any malformed value in any row
        warn_record(f"{run.metrics_file}: the monitors could not read its rows ({type(exc).__name__}: "
                    f"{str(exc)[:120]}); findings from the metrics are left out")
        return []


def _killed_finding(run: RunDir, status: dict[str, Any], rows: list[dict[str, Any]]) -> Finding:
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    if isinstance(status.get("step"), int):
        steps.append(status["step"])
    last = max(steps, default=None)
    latest = latest_checkpoint(run.checkpoints)
    where = f"latest checkpoint {latest.name}" if latest else "no checkpoint to resume from"
    return make_finding(
        "run_killed",
        f"the run was killed at step {last if last is not None else '?'} (status.json says running but no process "
        f"holds its lock); {where}",
        step=last, checkpoint=latest.name if latest else None,
    )


def _read_config(run: RunDir) -> tuple[Config | None, str | None]:
    # An unreadable config (hand-edited, older version) must not stop the diagnosis: defaults apply.
    try:
        return build_config(read_source(run.config_file)), None
    except UserError as exc:
        return None, str(exc)


def merge_findings(recorded: list[Finding], computed: list[Finding]) -> list[Finding]:
    """Recorded findings, then the computed ones whose (code, step) was not recorded; sorted by severity.

    A recorded finding wins: it can carry evidence the metrics lack (the parameters to blame).
    Recorded findings only lose exact repeats (a preflight run again at a resume): two different
    recorded findings of one code without a step are both kept.
    """
    merged: list[Finding] = []
    for finding in recorded:
        if finding.severity in SEVERITY_ORDER and finding not in merged:  # an unknown severity cannot be ranked
            merged.append(finding)
    recorded_keys = {(f.code, f.step) for f in merged}
    merged += [f for f in computed if (f.code, f.step) not in recorded_keys]
    return sort_findings(merged)


# ---------------------------------------------------------------- run facts


_float = to_float  # "nan" -> nan, junk -> None: the one coercion of metric values

def _checkpoint_names(run: RunDir) -> list[str]:
    if not run.checkpoints.is_dir():
        return []
    # .tmp-* folders are saves that were killed midway, not checkpoints.
    return sorted(p.name for p in run.checkpoints.iterdir() if p.is_dir() and not p.name.startswith("."))


def run_facts(run: RunDir, rows: list[dict[str, Any]], cfg: Config | None) -> dict[str, Any]:
    status = run.status()
    train = [r for r in rows if "loss" in r]
    evals = [(r.get("step"), _float(r.get("val_loss")), _float(r.get("val_bpb"))) for r in rows if "val_loss" in r]
    finite_evals = [e for e in evals if e[1] is not None and math.isfinite(e[1])]
    best = min(finite_evals, key=lambda e: e[1], default=None)
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    if isinstance(status.get("step"), int):
        steps.append(status["step"])  # a crash can come after the last logged row
    # One demo per step, whatever it wrote (text for lm, .npy codes or frames + .png for the others).
    demos = sorted({p.name[: len("step_000000")] for p in run.demos.glob("step_*")}) if run.demos.is_dir() else []
    return {
        "status": status.get("status", "unknown"),
        "error": status.get("error"),
        "last_step": max(steps, default=None),
        "max_steps": cfg.train.max_steps if cfg is not None else None,
        "tokens": rows[-1].get("tokens") if rows else None,
        "metric_rows": len(rows),
        "last_train_loss": _float(train[-1].get("loss")) if train else None,
        "best_val_loss": best[1] if best else None,
        "best_val_step": best[0] if best else None,
        "last_val_loss": evals[-1][1] if evals else None,
        "last_val_bpb": evals[-1][2] if evals else None,
        "last_val_step": evals[-1][0] if evals else None,
        "checkpoints": _checkpoint_names(run),
        "demos": len(demos),
        "last_demo": demos[-1] if demos else None,
    }


# ---------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:
    """Non-finite floats as "nan" / "inf" strings, as in metrics.jsonl, so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def diagnosis_json(diagnosis: Diagnosis) -> dict[str, Any]:
    findings = []
    for f in diagnosis.findings:
        info = CATALOG.get(f.code)
        findings.append({**f.to_json(), "title": info.title if info else None, "fix": info.fix if info else None})
    return _jsonable({
        "run_dir": str(diagnosis.run_dir),
        "ok": diagnosis.ok,
        "facts": diagnosis.facts,
        "counts": {s: diagnosis.count(s) for s in SEVERITY_ORDER},
        "findings": findings,
    })


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(_jsonable(value), separators=(",", ":"))
    return str(value)


def _fact_lines(facts: dict[str, Any]) -> list[tuple[str, str]]:
    of = f" / {facts['max_steps']}" if facts.get("max_steps") else ""
    lines = [("status", f"{facts['status']} at step {_fmt(facts['last_step'])}{of}")]
    if facts.get("error"):
        lines.append(("error", facts["error"]))
    if facts.get("config_error"):
        lines.append(("config", f"unreadable, monitor defaults used: {facts['config_error']}"))
    lines.append(("metrics", f"{facts['metric_rows']} rows, last train loss {_fmt(facts['last_train_loss'])}"))
    if facts.get("last_val_step") is not None:
        lines.append(("val", f"last {_fmt(facts['last_val_loss'])} (bpb {_fmt(facts['last_val_bpb'])}, "
                             f"step {facts['last_val_step']}), best {_fmt(facts['best_val_loss'])} "
                             f"(step {_fmt(facts['best_val_step'])})"))
    lines.append(("checkpoints", ", ".join(facts["checkpoints"]) or "none"))
    lines.append(("demos", f"{facts['demos']} (last {facts['last_demo']})" if facts["demos"] else "none"))
    return lines


def _render_finding(f: Finding, console: Console) -> None:
    where = f" step {f.step}" if f.step is not None else ""
    head = Text.assemble((f"{f.severity.upper():<8}", SEVERITY_STYLE[f.severity]), (f.code, "bold"), where)
    console.print(head, soft_wrap=True)
    console.print(Text(f"  {f.message}"), soft_wrap=True)
    if f.evidence:
        evidence = ", ".join(f"{k}={_fmt(v, '.6g')}" for k, v in f.evidence.items())
        console.print(Text(f"  evidence: {evidence}", style="dim"), soft_wrap=True)
    info = CATALOG.get(f.code)
    console.print(Text(f"  fix: {info.fix if info else '(code not in this version of the catalog)'}"), soft_wrap=True)


def render_diagnosis(diagnosis: Diagnosis, console: Console) -> None:
    console.print(Text(f"doctor: {diagnosis.run_dir}", style="bold"), soft_wrap=True)
    for label, value in _fact_lines(diagnosis.facts):
        console.print(Text(f"  {label:<12}{value}"), soft_wrap=True)
    console.print()
    if not diagnosis.findings:
        console.print(Text("no findings: nothing wrong in the recorded findings or the metrics", style="green"))
        return
    for finding in diagnosis.findings:
        _render_finding(finding, console)
    counts = ", ".join(f"{s}: {diagnosis.count(s)}" for s in SEVERITY_ORDER if diagnosis.count(s))
    console.print(Text(f"\n{counts}", style="bold red" if not diagnosis.ok else "bold"), soft_wrap=True)
