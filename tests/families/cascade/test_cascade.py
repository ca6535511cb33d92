"""The continuous-signal cascade family: data pairs, causality, the loss, the monitors' three failure
modes of the field notes (exploding learnable scalars, constant output, copying), training and sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import quiet
from scratchlab.config import load_config
from scratchlab.families.cascade.data import get_pairs, load_feature_folder, make_pairs, synthetic_data, window_of
from scratchlab.data.windows import clip_window_starts
from scratchlab.errors import UserError
from scratchlab.families.registry import build_model, build_monitor
from scratchlab.families.cascade.model import CascadeModel
from scratchlab.runs.metrics import read_metrics
from scratchlab.families.cascade.task import CascadeTask, signal_losses
from scratchlab.train import train
from scratchlab.train.optim import GroupedAdamW, build_optimizer

CPU = torch.device("cpu")


def tiny(out_dir: Path | None = None, **extra) -> list[str]:
    """A cascade that trains a step in ~20 ms on one core."""
    values = {
        "model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "train.seq_len": 32, "train.batch_size": 8,
        "train.max_steps": 60, "train.log_every": 5, "train.save_every": 30, "eval.every": 20, "eval.batches": 2,
        "eval.batch_size": 8, "demo.every": 60, "optim.warmup_steps": 5, "log.progress": "lines",
        "train.out_dir": str(out_dir or "runs"),
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def task_and_model(*overrides: str, seed: int = 0) -> tuple[CascadeTask, nn.Module]:
    cfg = load_config("cascade-tiny", tiny(None) + list(overrides))
    task = CascadeTask(cfg)
    task.configure(cfg)
    torch.manual_seed(seed)
    return task, build_model(task.cfg.model)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One short real run of the cascade (fixed scaling) on the synthetic signal."""
    out = tmp_path_factory.mktemp("cascade")
    torch.set_num_threads(1)
    overrides = tiny(out, **{"train.max_steps": 200, "optim.lr": 1e-2, "eval.every": 100, "demo.every": 200,
                             "train.save_every": 100})
    result = train(load_config("cascade-tiny", overrides), console=quiet())
    return result


# ---------------------------------------------------------------- data


def test_pairs_are_shifted_in_one_place():
    window = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    for horizon in (1, 3):
        p = make_pairs(window, horizon)
        T = 10 - horizon
        assert p["inputs"].shape == p["targets"].shape == p["context"].shape == (2, T, 3)
        assert torch.equal(p["targets"], window[:, horizon:])  # target t = frame t + horizon
        assert torch.equal(p["context"][:, horizon:], p["targets"][:, :-horizon])  # past targets only
        assert not p["context"][:, :horizon].any()  # nothing known yet
        assert torch.equal(window_of(p, horizon), window)


def test_clip_windows_stay_inside_clips_and_modes_behave():
    lens = [5, 40, 3, 20]  # the 5- and 3-frame clips hold no 8-frame window
    g = torch.Generator().manual_seed(0)
    clip, start = clip_window_starts(lens, 8, 2000, "random", generator=g)
    assert set(clip.tolist()) == {1, 3}
    assert all(0 <= s <= lens[c] - 8 for c, s in zip(clip, start))
    assert set(start[clip == 1].tolist()) == set(range(33))  # every start is drawn
    # Uniform over all valid (clip, start) positions: 33 in clip 1, 13 in clip 3.
    assert abs((clip == 1).mean() - 33 / 46) < 0.05
    a = clip_window_starts(lens, 8, 4, "fixed", batch_index=1, count=8)
    b = clip_window_starts(lens, 8, 4, "fixed", batch_index=1, count=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(UserError, match="no clip holds a window of 50"):
        clip_window_starts(lens, 50, 1, "fixed")


def test_synthetic_signal_is_deterministic():
    a, b = synthetic_data(), synthetic_data()
    assert a.n_features == 8 and len(a.train) == 96 and len(a.val) == 12
    assert np.array_equal(a.train[3], b.train[3]) and np.array_equal(a.val[0], b.val[0])
    assert not np.array_equal(a.train[0], a.val[0])
    batch = get_pairs(a.val, 16, 1, 4, "fixed", count=8)
    assert batch["inputs"].dtype == torch.float32 and batch["inputs"].shape == (4, 16, 8)


def test_feature_folder_lists_every_bad_file(tmp_path):
    good = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", good)
    np.save(tmp_path / "b.npy", good * 2)
    np.save(tmp_path / "ints.npy", np.zeros((50, 4), dtype=np.int64))
    np.save(tmp_path / "nan.npy", np.full((50, 4), np.nan, dtype=np.float32))
    np.save(tmp_path / "flat.npy", np.zeros(50, dtype=np.float32))
    np.save(tmp_path / "wide.npy", np.zeros((50, 6), dtype=np.float32))
    names = ["a.npy", "b.npy", "ints.npy", "nan.npy", "flat.npy", "wide.npy", "missing.npy"]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps({"frames": n}) + "\n" for n in names))
    with pytest.raises(UserError) as err:
        load_feature_folder(tmp_path)
    message = str(err.value)
    for name in ("ints.npy (dtype int64", "nan.npy (contains NaN", "flat.npy (shape (50,)", "wide.npy (6 features",
                 "missing.npy (missing"):
        assert name in message
    assert "5 bad file(s)" in message and "a.npy (" not in message

    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps({"frames": n, "frame_rate": 50}) + "\n"
                                                     for n in ["a.npy", "b.npy"]))
    data = load_feature_folder(tmp_path, val_fraction=0.5)
    again = load_feature_folder(tmp_path, val_fraction=0.5)
    assert data.n_features == 4 and data.frame_rate == 50.0
    assert len(data.train) + len(data.val) == 2 and data.val  # a val clip even from a tiny folder
    assert data.val_names == again.val_names  # the split is by file name: deterministic


def test_config_errors_name_the_field():
    with pytest.raises(UserError, match="residual_weights has 2 values for model.cascade.n_stages=3"):
        load_config("cascade-tiny", ["model.cascade.n_stages=3"])
    with pytest.raises(UserError, match="data.path=synthetic"):
        CascadeTask(load_config("cascade-tiny", ["data.path=stdlib"]))
    task, _ = task_and_model()
    with pytest.raises(UserError, match="n_features \\(5\\) does not match"):
        task.configure(load_config("cascade-tiny", ["model.cascade.n_features=5"]))


# ---------------------------------------------------------------- model and loss


@pytest.mark.parametrize("overrides", [[], ["model.cascade.rms_scaling=learnable"],
                                       ["model.cascade.target=next_segment", "model.cascade.n_stages=3",
                                        "model.cascade.residual_weights=[1.0,0.5,0.1]"]])
def test_model_is_causal(overrides):
    task, model = task_and_model(*overrides)
    batch = task.train_batch(2, torch.Generator().manual_seed(0))
    base = model(batch["inputs"], batch["context"])
    for j in (1, 16, 31):
        x, c = batch["inputs"].clone(), batch["context"].clone()
        x[:, j] += 1.0
        c[:, j] -= 1.0
        out = model(x, c)
        assert torch.equal(out[:, :j], base[:, :j])  # exactly: nothing before j may move
        assert not torch.equal(out[:, j], base[:, j])  # and frame j is used


class LeakyCascade(CascadeModel):
    """Feeds the CURRENT target frame: context[t] := context[t + h] = target[t] (a mis-shifted teacher forcing)."""

    def forward(self, inputs, context):
        return super().forward(inputs, context.roll(-self.horizon, dims=1))


def test_preflight_catches_a_model_fed_the_current_target():
    task, healthy = task_and_model()
    batch = task.train_batch(4, torch.Generator().manual_seed(0))
    assert task.preflight(healthy, batch) == []
    torch.manual_seed(0)
    leaky = LeakyCascade(task.cfg.model)
    findings = task.preflight(leaky, batch)
    leak = [f for f in findings if f.code == "causal_leak"]
    assert leak and leak[0].severity == "error"
    assert leak[0].evidence["output_pos"] == leak[0].evidence["input_pos"] - 1  # target t = frame t + 1


def test_preflight_flags_the_learnable_scalars():
    # At the preset's size (the ratio grows with the outputs a scalar's gradient sums over: ~700x here,
    # ~100x for the tiny test model).
    task, model = task_and_model("model.cascade.rms_scaling=learnable", "model.n_layers=2", "model.d_model=64",
                                 "model.n_heads=4", "train.seq_len=64")
    findings = task.preflight(model, task.train_batch(4, torch.Generator().manual_seed(0)))
    assert [f.code for f in findings] == ["grad_outlier"]
    assert ".rms_scale." in findings[0].evidence["top"][0]["name"]


def test_losses_reward_the_change_not_the_copy():
    task, _ = task_and_model()
    batch = task.train_batch(4, torch.Generator().manual_seed(0))
    recon, novelty = signal_losses(batch["targets"], batch)
    assert recon.item() == 0 and novelty.item() == pytest.approx(0, abs=1e-6)
    recon, novelty = signal_losses(batch["inputs"], batch)  # the copy: its predicted change is 0
    assert novelty.item() == pytest.approx(1.0)
    assert recon.item() == pytest.approx(((batch["inputs"] - batch["targets"]) ** 2).mean().item())
    l1, _ = signal_losses(batch["inputs"], batch, "l1")
    assert l1.item() == pytest.approx((batch["inputs"] - batch["targets"]).abs().mean().item())
    # Half-way towards the target: same direction of change (novelty 0), a quarter of the MSE.
    half = batch["inputs"] + 0.5 * (batch["targets"] - batch["inputs"])
    r_half, n_half = signal_losses(half, batch)
    assert n_half.item() == pytest.approx(0, abs=1e-5)
    assert r_half.item() == pytest.approx(0.25 * recon.item(), rel=1e-4)


def test_learnable_scalars_get_their_own_group():
    task, model = task_and_model("model.cascade.rms_scaling=learnable", "model.cascade.scale_lr_mult=0.1")
    opt = build_optimizer(model, task.cfg.optim)
    assert isinstance(opt, GroupedAdamW) and len(opt.param_groups) == 3
    scalars = opt.param_groups[2]
    assert scalars["lr_mult"] == 0.1 and scalars["max_norm"] == 0.1 and len(scalars["params"]) == 4
    before = model.stages[0].rms_scale.log_gain.detach().clone()
    task.loss(model, task.train_batch(4, torch.Generator().manual_seed(0))).objective.backward()
    for g in opt.param_groups:
        g["lr"] = 0.01
    opt.step()
    # Adam's first step moves a parameter by ~lr: here lr x 0.1; the group's lr is restored after.
    assert abs(model.stages[0].rms_scale.log_gain.item() - before.item()) == pytest.approx(1e-3, rel=1e-3)
    assert scalars["lr"] == 0.01
    _, fixed = task_and_model()
    assert type(build_optimizer(fixed, task.cfg.optim)) is torch.optim.AdamW


# ---------------------------------------------------------------- monitors


class ConstantModel(nn.Module):
    """The same frame at every time step, whatever the input."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.frame = nn.Parameter(torch.linspace(-1, 1, n_features))

    def forward(self, inputs, context):
        return self.frame.expand_as(inputs)


class CopyModel(nn.Module):
    """The last input frame (plus a parameter that does nothing), the copy-last-frame solution."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, inputs, context):
        return inputs + 0 * self.gate


def eval_row(task: CascadeTask, model: nn.Module, step: int = 1000) -> dict:
    return {"step": step, "tokens": 0, **task.evaluate(model, CPU, "fp32")}


def signal_codes(rows: list[dict], cfg) -> list[str]:
    return [f.code for f in build_monitor(cfg).replay(rows)
            if f.code in ("output_rms_off", "output_constant", "output_copies_input", "grad_explosion")]


def test_constant_output_is_flagged_with_attribution():
    task, _ = task_and_model()
    row = eval_row(task, ConstantModel(8))
    assert row["val_output_std_ratio"] == 0
    findings = build_monitor(task.cfg).replay([row])
    constant = [f for f in findings if f.code == "output_constant"]
    assert len(constant) == 1
    assert constant[0].evidence["parameters"][0]["name"] == "frame"  # the top-5 gradient attribution


def test_copying_is_flagged_only_after_warmup():
    task, _ = task_and_model()
    row = eval_row(task, CopyModel())
    assert row["val_novelty"] == pytest.approx(1.0) and row["val_input_corr"] == pytest.approx(1.0)
    assert row["val_loss"] == pytest.approx(row["val_copy_baseline"])
    assert signal_codes([row], task.cfg) == ["output_copies_input"]
    assert signal_codes([{**row, "step": 2}], task.cfg) == []  # at init the stage-1 residual copies by design


def test_healthy_run_is_silent_and_beats_copying(tiny_run):
    rows = read_metrics(tiny_run.run_dir / "metrics.jsonl")
    evals = [r for r in rows if "val_loss" in r]
    last = evals[-1]
    assert last["val_loss"] < 0.8 * last["val_copy_baseline"]  # a 200-step run already predicts the change
    assert 0.8 < last["val_rms_ratio"] < 1.2 and last["val_novelty"] < 0.6
    assert len(last["grad_top"]) == 5 and last["val_grad_norm"] > 0
    cfg = load_config(tiny_run.run_dir / "config.yaml")
    assert signal_codes(rows, cfg) == []
    findings = [json.loads(line)["code"] for line in (tiny_run.run_dir / "findings.jsonl").read_text().splitlines()]
    assert not set(findings) & {"output_rms_off", "output_constant", "output_copies_input", "grad_explosion",
                                "causal_leak", "grad_outlier"}
    step0 = (tiny_run.run_dir / "data_step0.txt").read_text()
    assert "targets[:, t] == inputs[:, t + 1]: True" in step0


def test_grad_explosion_needs_the_cascade_or_a_threshold():
    rows = [{"step": s, "loss": 1.0, "lr": 1e-3, "grad_norm": 500.0 if s == 7 else 1.0} for s in range(1, 10)]
    rows.insert(3, {"step": 3, "val_loss": 1.0, "val_grad_norm": 2.0,
                    "grad_top": [{"name": "stages.1.rms_scale.log_gain", "grad_norm": 1.5}]})
    cascade = load_config("cascade-tiny")
    found = [f for f in build_monitor(cascade).replay(rows) if f.code == "grad_explosion"]
    assert [f.step for f in found] == [7]
    assert found[0].evidence["parameters"][0]["name"] == "stages.1.rms_scale.log_gain"
    assert found[0].evidence["parameters_step"] == 3
    lm = load_config("tiny-lm")  # off by default for the other families (their clip monitor covers it)
    assert not [f for f in build_monitor(lm).replay(rows) if f.code == "grad_explosion"]
    lm = load_config("tiny-lm", ["doctor.signal.grad_norm_max=100"])
    assert [f.step for f in build_monitor(lm).replay(rows) if f.code == "grad_explosion"] == [7]


def test_learnable_scaling_at_high_lr_is_flagged_before_nan(tmp_path):
    # The field notes' failure, safeguards off: scalars at the full LR, no clipping anywhere.
    cfg = load_config("cascade-tiny", tiny(tmp_path, **{
        "model.cascade.rms_scaling": "learnable", "model.cascade.scale_lr_mult": 1, "model.cascade.scale_max_norm": 0,
        "optim.lr": 0.3, "train.clip.max_norm": 0, "train.log_every": 1, "train.save_every": 2, "eval.every": 2}))
    try:
        train(cfg, console=quiet())
    except UserError as exc:
        assert "training diverged" in str(exc)
    run = next(tmp_path.iterdir())
    findings = [json.loads(line) for line in (run / "findings.jsonl").read_text().splitlines()]
    rows = read_metrics(run / "metrics.jsonl")
    nan_steps = [r["step"] for r in rows if r.get("nonfinite")]
    assert nan_steps, "the failure did not reproduce"
    flagged = [f["step"] for f in findings if f["code"] in ("output_rms_off", "grad_explosion")]
    assert flagged and min(flagged) < min(nan_steps)
    first = next(f for f in findings if f["code"] in ("output_rms_off", "grad_explosion"))
    assert first["evidence"]["parameters"]  # attribution from the latest eval row
    for ckpt in (run / "checkpoints").iterdir():
        weights = load_file(ckpt / "model.safetensors")
        assert all(bool(t.isfinite().all()) for t in weights.values()), f"{ckpt.name} holds NaN"


# ---------------------------------------------------------------- demos and sampling


def test_demo_and_sample_write_frames_and_png(tiny_run, tmp_path):
    from scratchlab.families.cascade.sampler import sample_frames
    from scratchlab.runs.load import load_run

    demos = tiny_run.run_dir / "demos"
    assert (demos / "step_000200.npy").is_file() and (demos / "step_000200.png").is_file()
    assert np.load(demos / "step_000200.npy").shape == (32, 8)
    paths = sample_frames(load_run(tiny_run.run_dir), frames=12, out=tmp_path)
    assert [p.suffix for p in paths] == [".npy", ".png"]
    frames = np.load(paths[0])
    assert frames.shape == (12, 8) and np.isfinite(frames).all()
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_never_raises():
    task, model = task_and_model()

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, inputs, context):
            raise RuntimeError("boom")

    text = task.demo(Broken(), 1, Path("/nonexistent"), CPU, "fp32")
    assert "failed" in text and "boom" in text
    assert math.isfinite(task.evaluate(model, CPU, "fp32")["val_loss"])


@pytest.mark.slow
def test_preset_beats_the_copy_baseline(tmp_path):
    cfg = load_config("cascade-tiny", [f"train.out_dir={tmp_path}", "log.progress=lines"])
    result = train(cfg, console=quiet())
    last = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "val_loss" in r][-1]
    assert last["val_loss"] < 0.5 * last["val_copy_baseline"]
    findings = [json.loads(line)["code"] for line in (result.run_dir / "findings.jsonl").read_text().splitlines()]
    assert findings == []


def test_packed_frames_equal_the_folder(tmp_path, capsys):
    from scratchlab.cli import main
    from scratchlab.families.cascade.data import get_windows, load_signals

    rng = np.random.default_rng(0)
    folder = tmp_path / "f"
    folder.mkdir()
    names = [f"c{i:02d}.npy" for i in range(12)]
    for i, n in enumerate(names):
        np.save(folder / n, rng.normal(size=(40 + 3 * i, 5)).astype(np.float32))
    (folder / "manifest.jsonl").write_text("".join(json.dumps({"frames": n, "frame_rate": 25}) + "\n" for n in names))
    assert main(["data", "frames", str(folder), "--pack", str(tmp_path / "p")]) == 0
    assert "12 clips, 5 features" in capsys.readouterr().out
    a, b = load_signals(str(folder), 0.25), load_signals(str(tmp_path / "p"), 0.25)
    assert a.train_names == b.train_names and a.val_names == b.val_names and b.frame_rate == 25.0
    assert a.summary()["train"] == b.summary()["train"] and b.n_features == 5
    for clip in range(len(a.train)):
        assert np.array_equal(a.train[clip], b.train[clip])
    for mode in ("random", "fixed"):
        wa = get_windows(a.train, 16, 8, mode, generator=torch.Generator().manual_seed(1), count=20)
        wb = get_windows(b.train, 16, 8, mode, generator=torch.Generator().manual_seed(1), count=20)
        assert torch.equal(wa, wb)
    np.save(folder / "c03.npy", np.full((40, 5), np.nan, dtype=np.float32))
    assert main(["data", "frames", str(folder), "--pack", str(tmp_path / "p2")]) == 2
    assert "c03.npy (contains NaN" in capsys.readouterr().err and not (tmp_path / "p2" / "pack.json").exists()
