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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlab.errors import UserError


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
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
        root = Path(out_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = root / f"{stamp}-{safe}"
        n = 1
        while path.exists():  # two runs started in the same second
            n += 1
            path = root / f"{stamp}-{safe}-{n}"
        (path / "checkpoints").mkdir(parents=True)
        (path / "demos").mkdir()
        return cls(path)

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
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.path / name)

    def set_status(self, status: str, **extra: Any) -> None:
        self.write_json("status.json", {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {"status": "unknown"}


def run_family(run_dir: str | Path) -> str:
    """The ``model.family`` of a run, from its config.yaml."""
    import yaml

    run = RunDir.open(run_dir)
    raw = yaml.safe_load(run.config_file.read_text()) or {}
    return str((raw.get("model") or {}).get("family", "lm"))
