"""benchmarks/time_to_loss.py: recipe parsing, the target crossing, and a tiny race end to end."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides

from scratchlab.errors import UserError


def _benchmark():
    from conftest import load_benchmark

    return load_benchmark("time_to_loss")


def test_recipes_are_names_with_presets_and_overrides():
    bench = _benchmark()
    assert bench.parse_recipe("adamw=", "tiny-lm", ["train.seed=1"]) == ("adamw", "tiny-lm", ["train.seed=1"])
    assert bench.parse_recipe("m=my.yaml,optim.name=muon,demo.prompts=[a,b]", "tiny-lm", []) == (
        "m", "my.yaml", ["optim.name=muon", "demo.prompts=[a,b]"])
    with pytest.raises(UserError, match="NAME=ITEMS"):
        bench.parse_recipe("optim.name", "tiny-lm", [])


def test_crossing_is_interpolated_between_evals():
    bench = _benchmark()
    evals = [{"step": s, "tokens": 100 * s, "wall_s": 2.0 * s, "val_bpb": b} for s, b in [(0, 4.0), (10, 3.0), (20, 2.0)]]
    assert bench.crossing(evals, 2.5) == {"tokens": 1500.0, "step": 15.0, "wall_s": 30.0}
    assert bench.crossing(evals, 3.0) == {"tokens": 1000, "step": 10, "wall_s": 20.0}
    assert bench.crossing(evals, 1.0) is None


def test_a_tiny_race_writes_table_json_and_plot(data_dir, tmp_path, capsys):
    bench = _benchmark()
    common = [f"--set={o}" for o in tiny_overrides(data_dir, tmp_path / "runs", train__threads=1)]
    code = bench.main([*common, "--max-steps", "4", "--eval-every", "2", "--seeds", "2", "--out", str(tmp_path),
                       "--recipe", "adamw=", "--recipe", "muon=optim.name=muon,model.ffn=relu2"])
    assert code == 0
    saved = json.loads((tmp_path / "time_to_loss.json").read_text())
    runs = saved["runs"]
    assert [(r["recipe"], r["seed"]) for r in runs] == [("adamw", 1337), ("adamw", 1338), ("muon", 1337), ("muon", 1338)]
    assert all([e["step"] for e in r["evals"]] == [0, 2, 4] and len(r["step_s"]) == len(r["clipped"]) == 4
               for r in runs)
    # Same seed, same data order and (for equal shapes) same initial weights: equal step-0 evals.
    assert runs[0]["evals"][0]["val_bpb"] == pytest.approx(runs[2]["evals"][0]["val_bpb"], rel=0.05)
    baseline = saved["summary"][0]
    assert saved["target"] == max(r["evals"][-1]["val_bpb"] for r in runs[:2])  # the baseline's worst final
    assert baseline["reached"] == 2 and baseline["tokens_ratio"] == 1.0 and baseline["bpb_gain"] == 0
    assert 0 < saved["summary"][1]["opt_step_share"] < 1
    # clipped %: over the steps after the warmups (none here: the tiny preset's warmup outlasts the race)
    assert all(row["clipped_share"] is None for row in saved["summary"]) == (runs[0]["warmup_steps"] >= 4)
    assert (tmp_path / "time_to_loss.png").stat().st_size > 10_000
    partial = json.loads((tmp_path / "time_to_loss.partial.json").read_text())  # written at every eval round
    assert partial["partial"] and [e["step"] for e in partial["runs"][0]["evals"]] == [0, 2, 4]
    assert "time to val bits/byte" in capsys.readouterr().out
    assert bench.main(["--plot-only", "--no-plot", "--out", str(tmp_path)]) == 0


def test_recipes_with_different_budgets_are_compared_at_equal_tokens(data_dir, tmp_path):
    """A recipe may train fewer steps (its own schedule); the gain is read at the smallest budget, interpolated."""
    bench = _benchmark()
    common = [f"--set={o}" for o in tiny_overrides(data_dir, tmp_path / "runs", train__threads=1)]
    code = bench.main([*common, "--max-steps", "6", "--eval-every", "4", "--seeds", "1", "--out", str(tmp_path),
                       "--no-plot", "--recipe", "long=", "--recipe", "short=train.max_steps=3"])
    assert code == 0
    saved = json.loads((tmp_path / "time_to_loss.json").read_text())
    long, short = saved["runs"]
    assert [e["step"] for e in long["evals"]] == [0, 4, 6] and len(long["step_s"]) == 6
    assert [e["step"] for e in short["evals"]] == [0, 3] and len(short["step_s"]) == 3
    per_step = long["tokens_per_step"]
    row_long, row_short = saved["summary"]
    assert row_long["equal_tokens"] == row_short["equal_tokens"] == 3 * per_step
    b0, b4 = long["evals"][0]["val_bpb"], long["evals"][1]["val_bpb"]
    assert row_long["equal_bpb"] == pytest.approx(b0 + 0.75 * (b4 - b0))  # 3 of the 4 steps between its evals
    assert row_short["equal_bpb"] == pytest.approx(short["evals"][-1]["val_bpb"])
    assert row_short["bpb_gain"] == pytest.approx(row_long["equal_bpb"] - row_short["equal_bpb"])
    assert row_long["final_tokens"] == 6 * per_step and row_short["final_tokens"] == 3 * per_step


def test_bpb_at_interpolates_and_refuses_outside_the_curve():
    bench = _benchmark()
    evals = [{"tokens": t, "val_bpb": b} for t, b in [(0, 4.0), (100, 3.0), (200, 2.0)]]
    assert bench.bpb_at(evals, 150) == pytest.approx(2.5)
    assert bench.bpb_at(evals, 0) == 4.0 and bench.bpb_at(evals, 200) == 2.0
    assert bench.bpb_at(evals, 250) is None
