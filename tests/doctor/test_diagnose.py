"""`scratchlab doctor RUN_DIR` on run dirs built by hand: a healthy run, a clip-saturated
run, a crashed run (NaN rows, a torn last line, no checkpoints), recorded preflight
findings merged with the recomputed ones, `--json`, and a path that is not a run dir.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scratchlab.cli import main
from scratchlab.config import build_config, to_yaml
from scratchlab.doctor import CATALOG, make_finding, write_findings
from scratchlab.doctor.diagnose import diagnose
from scratchlab.errors import EXIT_USER_ERROR


def train_rows(max_steps: int, *, grad_norm: float = 0.5, threshold: float = 1.0, log_every: int = 10,
               eval_every: int = 250, lr: float = 3e-4) -> list[dict]:
    """Rows as the trainer writes them, for a smooth decaying loss with a constant grad norm."""
    rows = []
    for step in range(log_every, max_steps + 1, log_every):
        loss = 2.5 + 5.5 * (1 + step / 50) ** -0.6 + 0.02 * math.sin(step)  # noise, deterministic
        clipped = grad_norm > threshold
        rows.append({"step": step, "tokens": step * 4096, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "clip_threshold": threshold, "clipped": clipped, "clip_ratio": float(clipped),
                     "tokens_per_s": 1e4, "time_s": step / 10})
        if step % eval_every == 0:
            rows.append({"step": step, "tokens": step * 4096, "val_loss": loss + 0.1, "val_bpb": (loss + 0.1) / 2.4})
    return rows


def make_run(root: Path, rows: list[dict], *, status: dict | None = None, torn: str = "",
             checkpoints: tuple[str, ...] = (), demos: tuple[str, ...] = ()) -> Path:
    """A run dir as the trainer leaves it (default config: 100-step LR warmup, clip at 1.0)."""
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(build_config({})))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    if status is not None:
        (run / "status.json").write_text(json.dumps(status))
    for name in checkpoints:
        (run / "checkpoints" / name).mkdir(parents=True)
    for name in demos:
        (run / "demos").mkdir(exist_ok=True)
        (run / "demos" / name).write_text("# demo\n")
    return run


def doctor(capsys, run: Path, *flags: str) -> tuple[int, str]:
    code = main(["doctor", str(run), *flags])
    return code, capsys.readouterr().out


def crashed_run(root: Path) -> Path:
    """Diverged at step 57: three NaN steps, the trainer stopped at 59 mid-write of a row."""
    rows = train_rows(56, log_every=1)
    for step in (57, 58, 59):
        rows.append({"step": step, "tokens": step * 4096, "loss": "nan", "lr": 3e-4, "grad_norm": "nan",
                     "clip_threshold": 1.0, "clipped": False, "clip_ratio": 0.0, "tokens_per_s": 1e4,
                     "nonfinite": True})
    status = {"status": "crashed", "step": 59,
              "error": "TrainingDiverged: training diverged: loss or gradients non-finite for 3 steps in a row"}
    return make_run(root, rows, status=status, torn='{"step": 60, "tokens": 245760, "loss": 4.1')


# ---------------------------------------------------------------- runs


def test_healthy_finished_run(tmp_path, capsys):
    run = make_run(tmp_path, train_rows(1000), status={"status": "finished", "step": 1000},
                   checkpoints=("best", "step_001000"), demos=("step_000500.txt", "step_001000.txt"))
    code, out = doctor(capsys, run)
    assert code == 0
    assert "finished at step 1000 / 1000" in out
    assert "checkpoints best, step_001000" in out
    assert "demos       2 (last step_001000)" in out
    assert "no findings" in out and "WARNING" not in out
    facts = diagnose(run).facts
    assert facts["best_val_step"] == 1000 and facts["last_val_step"] == 1000
    assert facts["best_val_loss"] == pytest.approx(train_rows(1000)[-2]["loss"] + 0.1)
    assert facts["metric_rows"] == 104 and facts["error"] is None


def test_clip_saturated_run_is_a_warning(tmp_path, capsys):
    # Field note: clip at 5 with pre-clip norms ~400, on every step.
    run = make_run(tmp_path, train_rows(1000, grad_norm=400.0, threshold=5.0, lr=3e-3),
                   status={"status": "finished", "step": 1000})
    code, out = doctor(capsys, run)
    assert code == 0  # warnings do not fail the run
    assert "WARNING clip_saturated step 200" in out  # default warmup 100 + the 100-step clip window
    assert "median_grad_norm=400, clip_threshold=5, suggested_threshold=400, lr=0.003" in out
    assert f"fix: {CATALOG['clip_saturated'].fix}" in out
    assert "warning: 1" in out
    [finding] = diagnose(run).findings
    assert finding.code == "clip_saturated" and finding.step == 200


def test_crashed_run_with_nan_rows_and_a_torn_line(tmp_path, capsys):
    run = crashed_run(tmp_path)
    code, out = doctor(capsys, run)
    assert code == 1
    assert "crashed at step 59 / 1000" in out
    assert "TrainingDiverged: training diverged" in out
    assert "ERROR   nonfinite step 57" in out
    assert "evidence: loss=nan, grad_norm=nan" in out
    assert "checkpoints none" in out and "demos       none" in out
    facts = diagnose(run).facts
    assert facts["metric_rows"] == 59  # the torn row is skipped
    assert facts["last_step"] == 59 and math.isnan(facts["last_train_loss"])
    assert facts["best_val_loss"] is None


def test_recorded_preflight_findings_are_merged(tmp_path, capsys):
    run = crashed_run(tmp_path)
    params = [{"name": "blocks.0.attn.scale", "grad_norm": "inf", "finite": False}]
    leak = make_finding("causal_leak", "output 3 depends on input 5", output_pos=3, input_pos=5)
    write_findings(run / "findings.jsonl", [
        make_finding("init_loss_high", "initial loss 12.1 vs ln(V) 8.3", loss=12.1, ln_vocab=8.3),
        leak,
        leak,  # preflight ran again at a resume: an exact repeat is shown once
        make_finding("dead_params", "lm_head.bias gets no gradient"),
        make_finding("dead_params", "blocks.1.gate gets no gradient"),  # same code, no step: both kept
        # The trainer's own record of the divergence, at the step the metrics also show: kept once,
        # with its evidence (the parameters to blame), not the recomputed one.
        make_finding("nonfinite", "loss non-finite; top parameters by gradient: blocks.0.attn.scale",
                     step=57, parameters=params),
    ])
    findings = diagnose(run).findings
    assert [(f.code, f.step) for f in findings] == [  # errors first, then by step, then by code
        ("causal_leak", None), ("nonfinite", 57), ("run_crashed", 59), ("dead_params", None), ("dead_params", None),
        ("init_loss_high", None)]
    assert findings[1].evidence["parameters"] == params
    code, out = doctor(capsys, run)
    assert code == 1
    assert "ERROR   causal_leak\n  output 3 depends on input 5" in out
    assert "evidence: output_pos=3, input_pos=5" in out
    assert f"fix: {CATALOG['init_loss_high'].fix}" in out
    assert "error: 3, warning: 3" in out


def test_json_output(tmp_path, capsys):
    run = crashed_run(tmp_path)
    code, out = doctor(capsys, run, "--json")
    assert code == 1

    def no_constants(name):
        raise AssertionError(f"not strict JSON: {name}")

    report = json.loads(out, parse_constant=no_constants)  # NaN is written as "nan", as in metrics.jsonl
    assert set(report) == {"run_dir", "ok", "facts", "counts", "findings"}
    assert report["run_dir"] == str(run) and report["ok"] is False
    assert report["counts"] == {"error": 2, "warning": 0, "info": 0}  # nonfinite + run_crashed
    assert report["facts"]["status"] == "crashed" and report["facts"]["last_train_loss"] == "nan"
    finding, crashed = report["findings"]
    assert crashed["code"] == "run_crashed" and "TrainingDiverged" in crashed["evidence"]["error"]
    assert finding["code"] == "nonfinite" and finding["severity"] == "error" and finding["step"] == 57
    assert finding["evidence"] == {"loss": "nan", "grad_norm": "nan"}
    assert finding["fix"] == CATALOG["nonfinite"].fix and finding["title"] == CATALOG["nonfinite"].title


def test_run_without_metrics_or_status(tmp_path, capsys):
    run = make_run(tmp_path, [])
    (run / "metrics.jsonl").unlink()
    code, out = doctor(capsys, run)
    assert code == 0
    assert "unknown at step - / 1000" in out and "metrics     0 rows" in out


def test_unreadable_config_falls_back_to_monitor_defaults(tmp_path, capsys):
    run = make_run(tmp_path, train_rows(1000, grad_norm=400.0, threshold=5.0))
    (run / "config.yaml").write_text("train:\n  max_stepz: 10\n")  # a typo: the config does not validate
    code, out = doctor(capsys, run)
    assert code == 0
    assert "config      unreadable, monitor defaults used: unknown config key 'train.max_stepz'" in out
    assert "WARNING clip_saturated step 200" in out


def test_not_a_run_dir_is_a_user_error(tmp_path, capsys):
    code = main(["doctor", str(tmp_path / "nope")])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == EXIT_USER_ERROR
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a run directory" in lines[0]
    assert captured.out == ""


def test_the_runs_family_monitors_are_replayed(tmp_path):
    # A cascade run whose output stopped moving: the family's own monitor speaks in `scratchlab doctor`.
    rows = train_rows(500)
    for row in rows:
        if "val_loss" in row:
            row.update(val_output_std_ratio=0.01 if row["step"] >= 500 else 0.9, val_output_std=0.01)
    run = make_run(tmp_path, rows, status={"status": "finished", "step": 500})
    cascade = build_config({"model": {"family": "cascade"}})
    (run / "config.yaml").write_text(to_yaml(cascade))
    assert [(f.code, f.step) for f in diagnose(run).findings] == [("output_constant", 500)]
    (run / "config.yaml").write_text(to_yaml(build_config({})))  # the same rows as an lm run: not its monitor
    assert diagnose(run).findings == []
