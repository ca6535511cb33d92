"""SIGINT / SIGTERM: save a checkpoint, exit 0, say how to resume; the resumed run is bit-exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from scratchlab.config import load_config
from scratchlab.runs.metrics import read_metrics
from scratchlab.train import train
from scratchlab.runs.checkpoint import latest_checkpoint

from conftest import tiny_overrides


def start_training(overrides, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "scratchlab", "train", *overrides],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def wait_for_rows(out_dir, n, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list(out_dir.iterdir()) if out_dir.exists() else []
        if runs and len(read_metrics(runs[0] / "metrics.jsonl")) >= n:
            return runs[0]
        if proc.poll() is not None:
            pytest.fail(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    pytest.fail("training did not start in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_resume_matches_straight_run(sig, data_dir, tmp_path):
    overrides = tiny_overrides(data_dir, tmp_path / "runs", train__max_steps=100, train__save_every=1000,
                               eval__every=50, demo__every=1000)
    proc = start_training(overrides, tmp_path)
    run = wait_for_rows(tmp_path / "runs", 3, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"Resume with: scratchlab train --resume {run}" in out
    status = json.loads((run / "status.json").read_text())
    stopped_at = status["step"]
    assert status["status"] == "stopped" and 3 <= stopped_at < 100
    assert latest_checkpoint(run / "checkpoints").name == f"step_{stopped_at:06d}"
    if sig != signal.SIGINT:
        return
    quiet = Console(file=open(os.devnull, "w"))
    resumed = train(resume=run, console=quiet)
    straight = train(load_config("tiny-lm", tiny_overrides(data_dir, tmp_path / "straight", train__max_steps=100,
                                                          train__save_every=1000, eval__every=50,
                                                          demo__every=1000)), console=quiet)
    assert resumed.step == 100

    def train_losses(run_dir):
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]

    assert train_losses(run) == train_losses(straight.run_dir)
    assert resumed.val_loss == straight.val_loss
