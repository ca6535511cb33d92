"""Sweeps: grid parsing, a real grid of tiny runs with a failing point, failures recorded, dry runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import quiet, tiny_overrides
from scratchlab.cli import main
from scratchlab.config import load_config
from scratchlab.errors import UserError
from scratchlab.sweep import dry_run, make_points, parse_grid, run_sweep


def test_parse_grid_splits_on_top_level_commas_only():
    grid = parse_grid(["optim.lr=1e-4,3e-4,1e-3", "demo.temperatures=[0,1],[0.5]", "train.name='a,b',c"])
    assert grid == {"optim.lr": ["1e-4", "3e-4", "1e-3"], "demo.temperatures": ["[0,1]", "[0.5]"],
                    "train.name": ["'a,b'", "c"]}


@pytest.mark.parametrize("item", ["optim.lr", "=1,2", "optim.lr=1,,2", "optim..lr=1"])
def test_parse_grid_rejects_bad_items(item):
    with pytest.raises(UserError):
        parse_grid([item])


def test_parse_grid_rejects_a_key_given_twice():
    with pytest.raises(UserError, match="twice"):
        parse_grid(["optim.lr=1", "optim.lr=2"])


def test_points_are_the_cartesian_product_named_by_sweep(tmp_path):
    grid = parse_grid(["optim.lr=1e-4,3e-4,1e-3", "model.n_layers=4,8"])
    root, points = make_points("tiny-lm", grid, "sweep-x", ["train.seq_len=64"], out_dir=tmp_path)
    assert root == tmp_path / "sweep-x"
    assert len(points) == 6
    assert [p.values for p in points[:2]] == [{"optim.lr": "1e-4", "model.n_layers": "4"},
                                              {"optim.lr": "1e-4", "model.n_layers": "8"}]
    cfg = load_config(points[5].source, points[5].overrides)
    assert (cfg.optim.lr, cfg.model.n_layers, cfg.train.seq_len) == (1e-3, 8, 64)
    assert cfg.train.name == "sweep-x-05" and cfg.train.out_dir == str(root)


def test_real_grid_with_a_failing_run_goes_on(data_dir, tmp_path, capsys):
    # A 3x1 grid of tiny real runs; the first point has a bad value and fails before training.
    base = tiny_overrides(data_dir, tmp_path / "runs", train__max_steps=4, train__save_every=4)
    grid = parse_grid(["optim.lr=abc,1e-3,3e-3", "model.n_layers=2"])
    sweep = run_sweep("tiny-lm", grid, overrides=base, console=quiet())

    assert [p.status for p in sweep.points] == ["failed", "finished", "finished"]
    assert "optim.lr" in sweep.points[0].error and sweep.points[0].run_dir is None
    assert not sweep.ok
    assert sweep.root.parent == tmp_path / "runs"
    manifest = json.loads((sweep.root / "sweep.json").read_text())
    assert manifest["sweep_id"] == sweep.sweep_id
    assert [p["status"] for p in manifest["points"]] == ["failed", "finished", "finished"]
    for point, lr in zip(sweep.points[1:], ("1e-3", "3e-3")):
        run_dir = Path(point.run_dir)
        assert run_dir.parent == sweep.root
        tag = json.loads((run_dir / "sweep.json").read_text())
        assert tag["sweep_id"] == sweep.sweep_id and tag["values"] == {"optim.lr": lr, "model.n_layers": "2"}
        cfg = load_config(str(run_dir / "config.yaml"))
        assert cfg.optim.lr == float(lr) and cfg.train.name == f"{sweep.sweep_id}-{point.index:02d}"
        assert point.val_loss == pytest.approx(json.loads((run_dir / "status.json").read_text())["val_loss"])
        assert point.steps == 4
    # the compare table across the finished runs (scratchlab.runs.compare), when that module is present
    try:
        import scratchlab.runs.compare  # noqa: F401
    except ImportError:
        assert sweep.comparison is None
    else:
        assert sweep.comparison and "optim.lr" in sweep.comparison


def _fake_train(outcomes):
    """A train() stand-in: each call pops an outcome (an exception to raise, or a status and val loss)."""
    calls = []

    def train(cfg, console=None):
        calls.append(cfg)
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        status, val = outcome
        return SimpleNamespace(run_dir=Path(cfg.train.out_dir) / cfg.train.name, status=status, val_loss=val,
                               val_bpb=val, step=cfg.train.max_steps)

    return train, calls


def test_crashes_and_divergence_are_recorded_and_the_sweep_goes_on(tmp_path):
    from scratchlab.train.loop import TrainingDiverged

    train, calls = _fake_train([RuntimeError("boom"), TrainingDiverged("nan for 3 steps"), ("finished", float("nan")),
                                ("finished", 2.5)])
    grid = parse_grid(["optim.lr=1e-4,2e-4,3e-4,4e-4"])
    sweep = run_sweep("tiny-lm", grid, out_dir=tmp_path, console=quiet(), train_fn=train)
    assert len(calls) == 4
    assert [p.status for p in sweep.points] == ["failed", "diverged", "diverged", "finished"]
    assert "RuntimeError: boom" in sweep.points[0].error
    assert sweep.points[3].val_loss == 2.5


def test_ctrl_c_stops_the_sweep_and_keeps_the_record(tmp_path):
    train, calls = _fake_train([("finished", 3.0), ("stopped", 3.1), ("finished", 3.2)])
    sweep = run_sweep("tiny-lm", parse_grid(["optim.lr=1e-4,2e-4,3e-4"]), out_dir=tmp_path, console=quiet(),
                      train_fn=train)
    assert len(calls) == 2
    assert [p.status for p in sweep.points] == ["finished", "stopped", "pending"]
    manifest = json.loads((sweep.root / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["finished", "stopped", "pending"]


def test_budget_tokens_sets_max_steps(tmp_path):
    train, calls = _fake_train([("finished", 3.0), ("finished", 3.0)])
    grid = parse_grid(["train.batch_size=4,8"])
    run_sweep("tiny-lm", grid, budget_tokens=100_000, overrides=["train.seq_len=64"], out_dir=tmp_path,
              console=quiet(), train_fn=train)
    assert [c.train.max_steps for c in calls] == [100_000 // (4 * 64), 100_000 // (8 * 64)]
    train, calls = _fake_train([])
    sweep = run_sweep("tiny-lm", {}, budget_tokens=10, out_dir=tmp_path, console=quiet(), train_fn=train)
    assert sweep.points[0].status == "failed" and "below one step" in sweep.points[0].error and not calls


def test_dry_run_prints_commands_and_writes_nothing(tmp_path):
    grid = parse_grid(["optim.lr=1e-4,abc", "model.n_layers=4,8"])
    text = dry_run("tiny-lm", grid, budget_tokens=1_000_000, out_dir=tmp_path / "runs")
    commands = [line for line in text.splitlines() if line.startswith("scratchlab train")]
    assert len(commands) == 4
    assert "optim.lr=1e-4 model.n_layers=8 train.max_steps=244" in commands[1]
    assert "invalid" in text and "optim.lr" in text
    torch_text = dry_run("tiny-lm", grid, launcher="torchrun", nproc=4, out_dir=tmp_path / "runs")
    assert torch_text.count("torchrun --standalone --nproc_per_node=4 -m scratchlab train tiny-lm") == 4
    slurm = dry_run("tiny-lm", grid, launcher="slurm", nproc=8, out_dir=tmp_path / "runs")
    assert slurm.startswith("#!/bin/bash") and "#SBATCH --array=0-3" in slurm and "--gpus-per-node=8" in slurm
    assert not (tmp_path / "runs").exists()


def test_a_folder_of_configs_is_swept(tmp_path):
    folder = tmp_path / "cfgs"
    folder.mkdir()
    for name, layers in (("a.yaml", 2), ("b.yaml", 3)):
        (folder / name).write_text(f"model:\n  n_layers: {layers}\n")
    _, points = make_points(folder, parse_grid(["optim.lr=1e-4,2e-4"]), "s", out_dir=tmp_path)
    assert [(Path(p.source).name, p.values["optim.lr"]) for p in points] == [
        ("a.yaml", "1e-4"), ("a.yaml", "2e-4"), ("b.yaml", "1e-4"), ("b.yaml", "2e-4")]
    with pytest.raises(UserError, match="no .yaml"):
        make_points(tmp_path / "cfgs" / "..", {}, "s")


def test_cli_sweep(tmp_path, capsys):
    assert main(["sweep", "tiny-lm", "--grid", "optim.lr=1e-4,3e-4", "--dry-run", "--set", f"train.out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.count("scratchlab train tiny-lm") == 2
    assert main(["sweep", "tiny-lm", "--grid", "optim.lr"]) == 2
