"""Reading run dirs: the full record of one run, a one-line summary of each, notes, and the run index.

The run dirs are the source of truth. `scan_runs` keeps a SQLite cache of summaries at
``<root>/.index.sqlite``, keyed by each run's relative path and a signature (size and mtime of
the files a summary is made from); a run whose signature changed is re-read, a run that is gone
is dropped. The cache is disposable: a corrupt or unwritable index falls back to reading the dirs.
Reading a run that is still being written works: a torn last metrics line is skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from scratchlab.doctor.findings import Finding, read_findings
from scratchlab.errors import UserError
from scratchlab.fileio import atomic_append, finite_float, read_json_object, read_text, warn_record
from scratchlab.runs.checkpoint import latest_checkpoint
from scratchlab.runs.metrics import read_metrics
from scratchlab.runs.store import RunDir, lock_holder

INDEX_FILE = ".index.sqlite"
INDEX_VERSION = "2"  # bump when RunSummary changes: the cache is rebuilt
SIGNATURE_FILES = ("config.yaml", "status.json", "metrics.jsonl", "findings.jsonl", "env.json", "data.json", "notes.md")
NOTE_HEADER = "## "


def _json_file(path: Path) -> dict[str, Any]:
    return read_json_object(path) or {}  # absent or malformed (warned): a summary must still come out


_finite = finite_float


# ---------------------------------------------------------------- one run, in full


@dataclass
class RunRecord:
    """Everything a tool needs from one run dir, read once."""

    path: Path
    config: dict[str, Any]  # config.yaml as a mapping ({} when unreadable)
    status: dict[str, Any]
    envs: list[dict[str, Any]]  # env.json, then env_resume_step_*.json in step order
    data: dict[str, Any]  # data.json
    rows: list[dict[str, Any]]  # metrics.jsonl
    findings: list[Finding]  # recorded in findings.jsonl (the doctor recomputes more)
    notes: str  # notes.md

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def env(self) -> dict[str, Any]:
        return self.envs[0] if self.envs else {}

    def values(self, key: str) -> list[tuple[int, int | None, float]]:
        """(step, tokens, value) of every row carrying ``key``; non-finite values kept as nan."""
        out = []
        for row in self.rows:
            if key in row and isinstance(row.get("step"), int):
                value = _finite(row[key])
                out.append((row["step"], row.get("tokens"), math.nan if value is None else value))
        return out

    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.rows if isinstance(r.get("step"), int)]
        if isinstance(self.status.get("step"), int):
            steps.append(self.status["step"])  # a crash or stop can come after the last logged row
        return max(steps, default=None)

    def max_steps(self) -> int | None:
        value = self.config.get("train", {}).get("max_steps") if isinstance(self.config.get("train"), dict) else None
        return value if isinstance(value, int) else None


def read_run(run_dir: str | Path) -> RunRecord:
    """The record of a run dir (UserError when it is not one)."""
    run = RunDir.open(run_dir)
    config = _read_yaml_mapping(run.config_file)
    envs = [_env(_json_file(run.path / "env.json"), run.path / "env.json")]
    envs += [_env(_json_file(p), p) for p in sorted(run.path.glob("env_resume_step_*.json"))]
    return RunRecord(
        path=run.path,
        config=config if isinstance(config, dict) else {},
        status=run.status(),
        envs=[e for e in envs if e],
        data=_data(_json_file(run.path / "data.json"), run.path / "data.json"),
        rows=[r for r in read_metrics(run.metrics_file) if isinstance(r, dict)],
        findings=read_findings(run.findings_file),
        notes=read_notes(run.path),
    )


def _keep(data: dict[str, Any], types: dict[str, type | tuple[type, ...]], path: Path) -> dict[str, Any]:
    """``data`` without the known keys whose value has the wrong type (a hand-edited or corrupt record)."""
    bad = [k for k, v in data.items() if k in types and not isinstance(v, types[k])]
    if bad:
        warn_record(f"{path}: {', '.join(bad)} of the wrong type; left out")
    return {k: v for k, v in data.items() if k not in bad}


def _env(env: dict[str, Any], path: Path) -> dict[str, Any]:
    env = _keep(env, {"git": dict, "argv": list, "pip_freeze": list}, path)
    if "git" in env:
        optional_str = (str, type(None))
        env["git"] = _keep(env["git"], {"commit": optional_str, "dirty": (bool, type(None)), "diff_sha256": optional_str},
                           path)
    for key in ("argv", "pip_freeze"):
        if key in env:
            env[key] = [str(x) for x in env[key]]
    return env


def _data(data: dict[str, Any], path: Path) -> dict[str, Any]:
    data = _keep(data, {"splits": dict}, path)
    if "splits" in data:
        data["splits"] = {k: v for k, v in data["splits"].items() if isinstance(v, dict)}
    return data


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    text = read_text(path)
    if text is None:
        return {}
    try:
        config = yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        warn_record(f"{path}: not valid YAML ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); "
                    "shown as empty")
        return {}
    if not isinstance(config, dict):
        warn_record(f"{path}: holds a YAML {type(config).__name__}, not a mapping; shown as empty")
        return {}
    return config


# ---------------------------------------------------------------- notes


def add_note(run_dir: str | Path, text: str) -> Path:
    """Append a timestamped note (hypothesis, result) to the run's notes.md; returns its path."""
    run = RunDir.open(run_dir)
    text = text.strip()
    if not text:
        raise UserError('the note is empty; give the text in quotes: scratchlab runs note RUN "hypothesis: ..."')
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    atomic_append(run.notes_file, f"{NOTE_HEADER}{stamp}\n\n{text}\n\n")  # one line on a read-only run dir
    return run.notes_file


def read_notes(run_dir: str | Path) -> str:
    return read_text(Path(run_dir) / "notes.md") or ""


# ---------------------------------------------------------------- one run, in one line


@dataclass
class RunSummary:
    path: str  # as found under the scanned root
    name: str
    status: str  # running | finished | stopped | crashed | killed (status running, lock free) | unknown
    step: int | None
    max_steps: int | None
    tokens: int | None
    last_loss: float | None
    best_val_loss: float | None
    best_val_step: int | None
    last_val_loss: float | None
    last_val_bpb: float | None
    tokens_per_s: float | None
    wall_s: float | None
    findings: int  # what `scratchlab doctor` reports: recorded + recomputed from the metrics
    errors: int
    warnings: int
    commit: str | None
    dirty: bool | None
    notes: int  # number of notes in notes.md
    error: str | None = None  # the crash message
    codes: list[str] = field(default_factory=list)  # finding codes, errors first
    checkpoint: str | None = None  # the latest step checkpoint (where a resume starts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def doctor_findings(record: RunRecord) -> list[Finding]:
    """What `scratchlab doctor` reports for the run: recorded findings plus those recomputed from its metrics."""
    from scratchlab.doctor.diagnose import diagnose

    try:
        return diagnose(record.path).findings
    except Exception:  # noqa: BLE001 - a run the doctor cannot read still gets its recorded findings
        return record.findings


def tokens_per_s(record: RunRecord) -> float | None:
    """The finished run's own figure (training time only) when there is one; else the median logged row."""
    speeds = [v for _, _, v in record.values("tokens_per_s") if math.isfinite(v)]
    return _finite(record.status.get("tokens_per_s")) or (statistics.median(speeds) if speeds else None)


def summarize(record: RunRecord, findings: list[Finding] | None = None) -> RunSummary:
    findings = doctor_findings(record) if findings is None else findings
    status = record.status
    evals = [(s, v) for s, _, v in record.values("val_loss") if math.isfinite(v)]
    best = min(evals, key=lambda e: e[1], default=None)
    last_val = record.values("val_loss")[-1:] or [None]
    last_bpb = record.values("val_bpb")[-1:] or [None]
    losses = record.values("loss")
    times = [v for _, _, v in record.values("time_s") if math.isfinite(v)]
    git = record.env.get("git") or {}
    tokens = [r.get("tokens") for r in record.rows if isinstance(r.get("tokens"), int)]
    return RunSummary(
        path=str(record.path),
        name=record.name,
        status=str(status.get("status", "unknown")),
        step=record.last_step(),
        max_steps=record.max_steps(),
        tokens=max(tokens, default=None),
        last_loss=_finite(losses[-1][2]) if losses else None,
        best_val_loss=best[1] if best else None,
        best_val_step=best[0] if best else None,
        last_val_loss=_finite(last_val[0][2]) if last_val[0] else None,
        last_val_bpb=_finite(last_bpb[0][2]) if last_bpb[0] else None,
        tokens_per_s=tokens_per_s(record),
        wall_s=_finite(status.get("wall_s")) or (max(times) if times else None),
        findings=len(findings),
        errors=sum(f.severity == "error" for f in findings),
        warnings=sum(f.severity == "warning" for f in findings),
        commit=git.get("commit"),
        dirty=git.get("dirty"),
        notes=sum(line.startswith(NOTE_HEADER) for line in record.notes.splitlines()),
        error=_killed_note(record) if status.get("status") == "killed" else _text(status.get("error")),
        codes=list(dict.fromkeys(f.code for f in findings)),
        checkpoint=(latest.name if (latest := latest_checkpoint(record.path / "checkpoints")) else None),
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _killed_note(record: RunRecord) -> str:
    latest = latest_checkpoint(record.path / "checkpoints")
    where = f"latest checkpoint {latest.name}" if latest else "no checkpoint"
    return (f"killed at step {record.last_step()} (status.json says running but no process holds the run's lock); "
            f"{where}")


def summarize_run(run_dir: str | Path) -> RunSummary:
    return summarize(read_run(run_dir))


# ---------------------------------------------------------------- the index


def find_run_dirs(root: Path, max_depth: int = 3) -> list[Path]:
    """Run dirs (folders with a config.yaml) under ``root``, a sweep's sub-folders included."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if "config.yaml" in filenames and here != root:
            found.append(here)
            dirnames.clear()  # a run's checkpoints/ and demos/ hold no runs
            continue
        depth = len(here.relative_to(root).parts)
        dirnames[:] = [] if depth >= max_depth else sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def _signature(run_dir: Path) -> str:
    parts = []
    for name in SIGNATURE_FILES:
        try:
            st = (run_dir / name).stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:-")
    return "|".join(parts)


class _Index:
    """The SQLite cache: relative run path -> (signature, summary JSON)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, timeout=10)
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS runs (path TEXT PRIMARY KEY, signature TEXT NOT NULL, "
                        "summary TEXT NOT NULL)")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if row is None or row[0] != INDEX_VERSION:
            with self.db:
                self.db.execute("DELETE FROM runs")
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (INDEX_VERSION,))
        self.cached = {p: (sig, summary) for p, sig, summary in self.db.execute("SELECT path, signature, summary FROM runs")}

    def sync(self, fresh: dict[str, tuple[str, str]]) -> None:
        with self.db:
            gone = set(self.cached) - set(fresh)
            self.db.executemany("DELETE FROM runs WHERE path = ?", [(p,) for p in gone])
            changed = [(p, sig, s) for p, (sig, s) in fresh.items() if self.cached.get(p) != (sig, s)]
            self.db.executemany("INSERT OR REPLACE INTO runs VALUES (?, ?, ?)", changed)

    def close(self) -> None:
        self.db.close()


def _open_index(path: Path) -> _Index | None:
    if path.exists() and not path.is_file():
        warn_record(f"{path} is not a file; listing without the index cache (delete it to get the cache back)")
        return None
    for attempt in range(2):
        try:
            return _Index(path)
        except sqlite3.DatabaseError:
            try:
                if attempt == 0 and path.is_file():
                    path.unlink()  # corrupt: it is only a cache, rebuild it from the run dirs
                    continue
            except OSError:
                pass
            break
        except (sqlite3.Error, OSError):
            break
    return None  # read-only root or similar: work without a cache


def _from_json(text: str) -> RunSummary | None:
    try:
        data = json.loads(text)
        return RunSummary(**{f.name: data[f.name] for f in fields(RunSummary) if f.name in data})
    except (json.JSONDecodeError, TypeError):
        return None


def _unreadable(run_dir: Path) -> RunSummary:
    return RunSummary(path=str(run_dir), name=run_dir.name, status="unreadable", step=None, max_steps=None,
                      tokens=None, last_loss=None, best_val_loss=None, best_val_step=None, last_val_loss=None,
                      last_val_bpb=None, tokens_per_s=None, wall_s=None, findings=0, errors=0, warnings=0,
                      commit=None, dirty=None, notes=0)


def scan_runs(root: str | Path = "runs", *, use_index: bool = True) -> list[RunSummary]:
    """A summary of every run dir under ``root``, oldest first (run dir names start with their start time)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"runs root {root} does not exist; give the folder your runs are in with --root DIR")
    index = _open_index(root / INDEX_FILE) if use_index else None
    summaries, fresh = [], {}
    try:
        for run_dir in find_run_dirs(root):
            rel = run_dir.relative_to(root).as_posix()
            sig = _signature(run_dir)
            cached = index.cached.get(rel) if index else None
            summary = _from_json(cached[1]) if cached and cached[0] == sig else None
            if summary is not None and summary.status == "running" and lock_holder(run_dir) is None:
                summary = None  # it was live when cached and has been killed since: read it again
            if summary is None:
                try:
                    summary = summarize(read_run(run_dir))
                except UserError:
                    continue  # config.yaml vanished between the walk and the read
                except Exception as exc:  # noqa: BLE001 - one unreadable run must not hide the others
                    warn_record(f"{run_dir}: could not be summarized ({type(exc).__name__}: {str(exc)[:120]}); "
                                "listed as unreadable")
                    summary = _unreadable(run_dir)
            summary.path = str(run_dir)  # the root may be given another way next time
            summaries.append(summary)
            fresh[rel] = (sig, json.dumps(summary.to_json()))
        if index is not None:
            try:
                index.sync(fresh)
            except sqlite3.Error:
                pass  # locked by another scan or read-only: the answer is right without the cache
    finally:
        if index is not None:
            index.close()
    return summaries


# ---------------------------------------------------------------- terminal


def render_runs(summaries: list[RunSummary], console: Any) -> None:
    """The `scratchlab runs` table (rich); on a narrow terminal the least needed columns go first."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    styles = {"finished": "green", "running": "cyan", "stopped": "yellow", "crashed": "bold red", "killed": "bold red"}
    cells: dict[str, list[Any]] = {c: [] for c in ("run", "status", "steps", "best val@step", "last val", "tokens",
                                                    "wall", "doctor", "commit", "notes")}
    for s in summaries:
        counts = " ".join(f"{n}{c}" for n, c in ((s.errors, "E"), (s.warnings, "W"), (s.findings - s.errors - s.warnings, "I")) if n)
        found = " ".join(x for x in (counts, ", ".join(s.codes[:2])) if x) or "-"
        row = [Text(s.name), Text(s.status, style=styles.get(s.status, "")),
               f"{s.step if s.step is not None else '-'}/{s.max_steps or '?'}",
               f"{num(s.best_val_loss)}@{s.best_val_step}" if s.best_val_loss is not None else "-", num(s.last_val_loss),
               f"{s.tokens:,}" if s.tokens is not None else "-", f"{s.wall_s:.0f}s" if s.wall_s is not None else "-",
               Text(found), (s.commit or "-")[:7] + ("+dirty" if s.dirty else ""), str(s.notes or "")]
        for column, cell in zip(cells, row):
            cells[column].append(cell)
    width = {c: max([len(c), *(len(str(v)) for v in vals)]) + 3 for c, vals in cells.items()}
    for drop in ("notes", "commit", "tokens", "wall", "last val"):
        if sum(width.values()) <= console.width:
            break
        del cells[drop], width[drop]
    if sum(width.values()) > console.width:  # still too wide: finding counts without their codes
        cells["doctor"] = [Text(" ".join(w for w in str(t).split() if re.fullmatch(r"\d+[EWI]", w)) or "-")
                           for t in cells["doctor"]]
    table = Table(title=f"{len(summaries)} runs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in cells:  # the run name is what people type next: never truncated
        table.add_column(column, no_wrap=column in ("run", "status", "steps", "best val@step", "doctor"),
                         justify="left" if column in ("run", "status", "doctor", "commit") else "right")
    for i in range(len(summaries)):
        table.add_row(*(cells[c][i] for c in cells))
    console.print(table)
