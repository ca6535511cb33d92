"""The README's main job, as a user runs it: `scratchlab train` on the default preset.

Slow (a few minutes): deselected by default, run by CI with `pytest -m slow`.
It checks the issue's target, val <= 2.0 bits/byte, from a cold corpus cache (corpus
preparation and tokenizer training included), then samples and resumes the run.
Wall time is printed, never asserted (machines are noisy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from scratchlab.doctor import read_findings
from scratchlab.runs.metrics import read_metrics

pytestmark = pytest.mark.slow


def scratchlab(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "scratchlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_default_train_reaches_target_then_samples_and_resumes(tmp_path):
    env = {**os.environ, "SCRATCHLAB_CACHE": str(tmp_path / "cache")}
    started = time.time()
    proc = scratchlab("train", cwd=tmp_path, env=env)
    wall = time.time() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    status = json.loads((run / "status.json").read_text())
    print(f"\ndefault run: val_bpb {status['val_bpb']:.4f}, val_loss {status['val_loss']:.4f}, "
          f"{status['tokens_per_s']:,.0f} tok/s, {wall:.0f} s wall (process), {status['wall_s']:.0f} s (run)")
    assert status["status"] == "finished"
    assert status["val_bpb"] <= 2.0
    assert "final val bits/byte" in proc.stdout and "## prompt='def ' temperature=0.5" in proc.stdout
    evals = [r["val_bpb"] for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r]
    assert evals == sorted(evals, reverse=True)  # validation improves at every eval
    # The doctor's healthy control at full scale: the default run raises no warning or error.
    assert [str(f) for f in read_findings(run / "findings.jsonl") if f.severity != "info"] == []
    doctor = scratchlab("doctor", str(run), cwd=tmp_path, env=env)
    assert doctor.returncode == 0, doctor.stdout[-2000:]

    sample = scratchlab("sample", str(run), "--prompt", "def ", "--temperature", "0.8", "--top-k", "50",
                        "--max-new-tokens", "200", cwd=tmp_path, env=env)
    assert sample.returncode == 0 and sample.stdout.startswith("def ") and len(sample.stdout) > 100

    more = status["step"] + 10
    resumed = scratchlab("train", "--resume", str(run), f"train.max_steps={more}", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == more and steps == sorted(set(steps))
