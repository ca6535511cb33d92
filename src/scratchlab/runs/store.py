"""A run directory and what is written into it at start.

    runs/<YYYYmmdd-HHMMSS>-<name>/
      config.yaml      resolved config
      env.json         python, torch, platform, device, pip freeze, git commit + dirty flag
      status.json      running | finished | stopped | crashed, with the last step
      metrics.jsonl    see runs/metrics.py
      tokenizer.json   copy of the data's tokenizer, so the run samples on its own
      checkpoints/     see runs/checkpoint.py
      demos/           step_NNNNNN.txt
      train.log
      .lock            held (flock) by the process that trains the run: pid, host, start time

Every file of the record is written atomically (scratchlab.fileio.atomic_write). The lock
keeps a second writer out (`train --resume RUN` while RUN trains) and tells a live run from
one that was killed: status.json says running but nobody holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlab.errors import UserError, shorten
from scratchlab.fileio import atomic_write, read_json_object, why

MAX_NAME = 100  # characters of a run name (train.name); the dir name adds a timestamp
LOCK_FILE = ".lock"


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_info(cwd: Path | None = None) -> dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd)
    dirty = bool(status and status.strip())
    # A hash of the uncommitted changes, so `scratchlab compare` can tell two dirty runs of one commit apart.
    diff_sha256 = None
    if dirty:
        try:  # bytes, not text: a diff can hold any encoding
            diff = subprocess.run(["git", "diff", "HEAD", "--no-ext-diff", "--binary"], cwd=cwd, capture_output=True,
                                  timeout=20, check=True)
            diff_sha256 = hashlib.sha256(diff.stdout).hexdigest()
        except (OSError, subprocess.SubprocessError):
            pass
    return {"commit": commit.strip(), "dirty": dirty, "diff_sha256": diff_sha256}


def environment(device: str) -> dict[str, Any]:
    import torch

    freeze = _run([sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check"])
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": sys.argv,
        "git": git_info(Path.cwd()),
        "pip_freeze": freeze.splitlines() if freeze else None,
    }


@dataclass
class RunDir:
    path: Path

    @classmethod
    def create(cls, out_dir: str | Path, name: str) -> "RunDir":
        """A new, empty run dir ``out_dir/<stamp>-<name>``; never collides, even with other processes."""
        if len(name) > MAX_NAME:
            raise UserError(f"run name {shorten(name, 60)} is {len(name)} characters; keep train.name to "
                            f"{MAX_NAME} or fewer")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
        root = Path(out_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the runs folder {root}: {why(exc)}; set train.out_dir") from exc
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1, 10_000):
            # mkdir is atomic: whoever creates the dir owns it; the others take the next suffix
            path = root / (f"{stamp}-{safe}" if n == 1 else f"{stamp}-{safe}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise UserError(f"cannot create run dir {path}: {why(exc)}") from exc
            (path / "checkpoints").mkdir()
            (path / "demos").mkdir()
            return cls(path)
        raise UserError(f"could not find a free run dir name under {root} for {safe}")

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        p = Path(path)
        if not (p / "config.yaml").is_file():
            raise UserError(f"{p} is not a run directory (no config.yaml); give a path under runs/")
        return cls(p)

    config_file = property(lambda self: self.path / "config.yaml")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    findings_file = property(lambda self: self.path / "findings.jsonl")  # preflight + monitor findings
    checkpoints = property(lambda self: self.path / "checkpoints")
    demos = property(lambda self: self.path / "demos")
    log_file = property(lambda self: self.path / "train.log")
    tokenizer_file = property(lambda self: self.path / "tokenizer.json")
    notes_file = property(lambda self: self.path / "notes.md")  # `scratchlab runs note`: hypotheses, results

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=2, default=str))

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text)

    def set_status(self, status: str, **extra: Any) -> None:
        self.write_json("status.json", {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})

    def try_set_status(self, status: str, **extra: Any) -> bool:
        """set_status when the disk lets it (a crash must not hide the crash that caused it)."""
        try:
            self.set_status(status, **extra)
            return True
        except (UserError, OSError):
            return False

    def recorded_status(self) -> dict[str, Any]:
        """status.json as written (validated: a mapping with a string status), {"status": "unknown"} else."""
        data = read_json_object(self.path / "status.json")
        if data is None:
            return {"status": "unknown"}
        if not isinstance(data.get("status"), str):
            data = {**data, "status": "unknown"}
        if "step" in data and not (isinstance(data["step"], int) and not isinstance(data["step"], bool)):
            data = {k: v for k, v in data.items() if k != "step"}
        return data

    def status(self) -> dict[str, Any]:
        """The recorded status, with ``running`` turned into ``killed`` when no process holds the run's lock."""
        data = self.recorded_status()
        if data.get("status") == "running" and lock_holder(self.path) is None:
            data = {**data, "status": "killed", "recorded_status": "running"}
        return data


# ---------------------------------------------------------------- the run lock


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds the run's lock ({pid, host, since}), or None when nobody does (the run is not training).

    A probe takes a shared lock for an instant; the trainer's exclusive lock makes it fail.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: never trained by a version with locks, or not here
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                info = read_json_object(path, warn=False) or {}
                return {"pid": info.get("pid", "?"), "host": info.get("host", "?"), "since": info.get("since", "?")}
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


class RunLock:
    """An exclusive flock on RUN/.lock, held for the whole time a process writes the run."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot lock run {self.path.parent}: {self.path}: {why(exc)}; "
                            "the run dir must be writable to train in it") from exc
        for attempt in range(20):  # a reader's probe holds a shared lock for an instant: retry briefly
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or attempt == 19:
                    holder = lock_holder(self.path.parent) if exc.errno != errno.ENOLCK else None
                    os.close(fd)
                    if holder is None and exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise UserError(f"cannot lock run {self.path.parent}: {why(exc)}") from exc
                    who = describe_holder(holder) if holder else "another process"
                    raise UserError(f"run {self.path.parent} is being trained by {who}; wait for it to finish "
                                    "or stop it (Ctrl-C / kill PID) before resuming") from None
                time.sleep(0.05)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # a full disk: the lock itself holds, only its label is missing
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_family(run_dir: str | Path) -> str:
    """The ``model.family`` of a run, from its config.yaml."""
    import yaml

    run = RunDir.open(run_dir)
    try:
        raw = yaml.safe_load(run.config_file.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"{run.config_file} is unreadable ({shorten(str(exc), 120)}); fix or restore it") from exc
    model = raw.get("model") if isinstance(raw, dict) else None
    return str(model.get("family", "lm")) if isinstance(model, dict) else "lm"
