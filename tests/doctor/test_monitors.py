"""Run-level monitors on synthetic metric histories: each bug is caught with its step and
evidence, healthy runs stay silent, a persistent condition is reported once per episode,
and feeding rows one at a time gives exactly what replaying the history gives.

`simulate` writes rows the way the trainer does: a gradient norm every step, clip_ratio
over the last 100 steps, a train row every `log_every` steps, an eval every `eval_every`.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from scratchlab.config import build_config
from scratchlab.doctor.monitors import Monitor, MonitorConfig, RunMonitor, check_metrics
from scratchlab.families.registry import build_monitor

REAL_RUN = Path(__file__).parent / "data" / "tiny_lm_metrics.jsonl"  # the tiny-lm preset, 400 steps, real


def decaying(step: int) -> float:
    """A from-scratch loss curve: ~8 nats at step 0, still falling by ~10% per 1000 steps at step 2000."""
    return 2.5 + 5.5 * (1 + step / 50) ** -0.6


def simulate(
    max_steps: int,
    *,
    loss: Callable[[int], float] = decaying,
    grad_norm: Callable[[int, random.Random], float] | None = None,
    noise: float = 0.03,
    threshold: float | None = 1.0,
    lr: float = 3e-4,
    log_every: int = 10,
    eval_every: int = 250,
    val: Callable[[int], float] | None = None,
    seed: int = 0,
) -> list[dict]:
    rng = random.Random(seed)
    grad_norm = grad_norm or (lambda step, r: r.lognormvariate(math.log(0.5), 0.4))  # ~4% above 1.0
    clip_history: deque[bool] = deque(maxlen=100)
    rows = []
    for step in range(1, max_steps + 1):
        norm = grad_norm(step, rng)
        clipped = threshold is not None and norm > threshold
        clip_history.append(clipped)
        if step % log_every == 0 or step == max_steps:
            rows.append({
                "step": step, "tokens": step * 4096, "loss": loss(step) + rng.gauss(0, noise), "lr": lr,
                "grad_norm": norm, "clip_threshold": threshold, "clipped": clipped,
                "clip_ratio": sum(clip_history) / len(clip_history), "tokens_per_s": 1e4,
            })  # fmt: skip
        if val is not None and (step % eval_every == 0 or step == max_steps):
            rows.append({"step": step, "tokens": step * 4096, "val_loss": val(step), "val_bpb": val(step) / 2.4})
    return rows


def healthy_val(step: int) -> float:
    return decaying(step) + 0.05


def codes(findings) -> list[tuple[str, int]]:
    return [(f.code, f.step) for f in findings]


def train_row(rows: list[dict], step: int) -> dict:
    return next(r for r in rows if r["step"] == step and "loss" in r)


# ---------------------------------------------------------------- healthy runs stay silent


def test_healthy_run_is_silent():
    rows = simulate(3000, val=healthy_val)
    assert 0 < max(r["clip_ratio"] for r in rows if "loss" in r) < 0.5  # some clipping, as in real runs
    assert check_metrics(rows) == []


def test_early_clipping_that_stops_is_silent():
    # Clipped on every step for 80 steps (LR warmup), then healthy: clip_ratio is 0.8 at step 100.
    rows = simulate(1500, grad_norm=lambda s, r: 2.0 if s <= 80 else 0.5, val=healthy_val)
    assert train_row(rows, 100)["clip_ratio"] == pytest.approx(0.8)
    assert check_metrics(rows, MonitorConfig(warmup_steps=100)) == []


def test_real_tiny_lm_run_is_silent_with_its_warmup():
    # The default preset clips 84% of steps around its 50-step LR warmup, then settles: silent with
    # the warmup of its config, but the same history read without any warmup is flagged.
    rows = [json.loads(line) for line in REAL_RUN.read_text().splitlines()]
    cfg = build_config({"optim": {"warmup_steps": 50}})
    assert check_metrics(rows, MonitorConfig.from_config(cfg)) == []
    assert codes(check_metrics(rows, MonitorConfig(warmup_steps=0))) == [("clip_saturated", 100)]


def test_short_run_is_silent():
    rows = simulate(20, grad_norm=lambda s, r: 2.0, log_every=1, eval_every=10, val=healthy_val)
    assert all(r["clipped"] for r in rows if "loss" in r)
    assert check_metrics(rows) == []


def test_monitor_config_takes_the_longer_warmup_of_a_run():
    cfg = build_config({"optim": {"warmup_steps": 50}, "train": {"clip": {"warmup_steps": 300}}})
    assert MonitorConfig.from_config(cfg).warmup_steps == 300
    assert MonitorConfig.from_config(cfg, spike_z=8.0).spike_z == 8.0


# ---------------------------------------------------------------- clip_saturated


def test_clip_saturated_field_note_lr_too_high():
    # Field note: clipping at 5 fired on every step with pre-clip norms ~400.
    rows = simulate(1000, grad_norm=lambda s, r: 400 * r.lognormvariate(0, 0.1), threshold=5.0, lr=3e-3)
    findings = check_metrics(rows, MonitorConfig(warmup_steps=100))
    assert codes(findings) == [("clip_saturated", 200)]  # first step whose 100-step window is after warmup
    f = findings[0]
    window = [r["grad_norm"] for r in rows if 100 < r["step"] <= 200]  # the logged rows of (100, 200]
    ev = f.evidence
    assert f.severity == "warning"
    assert ev["clip_ratio"] == 1.0 and ev["clip_threshold"] == 5.0 and ev["lr"] == 3e-3
    assert ev["median_grad_norm"] == pytest.approx(np.median(window), rel=1e-5)
    assert ev["suggested_threshold"] == pytest.approx(np.percentile(window, 90), rel=1e-5)
    assert 350 < ev["median_grad_norm"] < 450
    assert f"{np.median(window) / 5:.0f}x the threshold: the learning rate (0.003) is likely too high" in f.message


def test_clip_saturated_moderate_suggests_raising_the_threshold():
    # Norms just above the threshold on 70% of steps: raising the clip is a fair fix.
    rows = simulate(600, grad_norm=lambda s, r: 1.2 + 0.3 * r.random() if r.random() < 0.7 else 0.6)
    [f] = check_metrics(rows, MonitorConfig(warmup_steps=100))
    window = [r["grad_norm"] for r in rows if 100 < r["step"] <= f.step]
    assert f.evidence["clip_ratio"] >= 0.5
    assert 1.2 < f.evidence["suggested_threshold"] == pytest.approx(np.percentile(window, 90), rel=1e-5)
    assert f"raise train.clip.max_norm towards {f.evidence['suggested_threshold']:.3g}" in f.message


def test_clip_saturated_under_muon_names_the_matrices_lr():
    """Under Muon the logged lr is AdamW's (embeddings, norms): the advice names optim.muon_lr, quoting no value."""
    cfg = build_config({"optim": {"name": "muon"}})
    rows = simulate(1000, grad_norm=lambda s, r: 400 * r.lognormvariate(0, 0.1), threshold=5.0, lr=3e-3)
    [f] = check_metrics(rows, MonitorConfig.from_config(cfg, warmup_steps=100))
    assert "is likely too high; lower optim.muon_lr before raising the clip" in f.message
    assert "(0.003)" not in f.message and "optim.lr" not in f.message
    [f] = check_metrics(simulate(600, grad_norm=lambda s, r: 1.2 + 0.3 * r.random() if r.random() < 0.7 else 0.6),
                        MonitorConfig.from_config(cfg, warmup_steps=100))
    assert f.message.endswith(f"lower optim.muon_lr or raise train.clip.max_norm towards "
                              f"{f.evidence['suggested_threshold']:.3g} (p90 of the pre-clip norms)")


def test_clip_saturated_once_per_episode():
    saturated = lambda s, r: 3.0 if 100 < s <= 600 or 1200 < s <= 1800 else 0.5  # noqa: E731
    rows = simulate(2400, grad_norm=saturated)
    # Episode 1 starts at 200 and ends once clip_ratio < 0.25 (step 680); episode 2: ratio 0.5 at 1250.
    assert codes(check_metrics(rows, MonitorConfig(warmup_steps=100))) == [("clip_saturated", 200),
                                                                          ("clip_saturated", 1250)]


def test_clip_saturated_needs_clipping_on():
    rows = simulate(600, grad_norm=lambda s, r: 400.0, threshold=None)
    assert check_metrics(rows) == []


# ---------------------------------------------------------------- loss_spike


def test_loss_spike_reported_with_robust_z():
    rows = simulate(2000, val=healthy_val)
    spiked = train_row(rows, 1500)
    spiked["loss"] += 2.0
    findings = check_metrics(rows)
    assert codes(findings) == [("loss_spike", 1500)]
    before = np.array([r["loss"] for r in rows if "loss" in r and r["step"] < 1500][-100:])
    level = np.median(before[-5:])
    diffs = np.diff(before)
    noise = 1.4826 * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2)
    ev = findings[0].evidence
    assert ev["loss"] == pytest.approx(spiked["loss"], rel=1e-5)
    assert ev["median"] == pytest.approx(level, rel=1e-5)
    assert ev["noise"] == pytest.approx(noise, rel=1e-5)
    assert ev["noise"] == pytest.approx(0.03, rel=0.3)  # the simulated noise, despite the falling curve
    assert ev["z"] == pytest.approx((spiked["loss"] - level) / noise, rel=1e-4)
    assert ev["window_rows"] == 100


def test_loss_spike_caught_on_the_steep_early_curve():
    # The 29 rows before step 300 fall from 7.5 to 4.3 nats: a z against their median / MAD is
    # about 0.4 for a 1-nat spike (the trend inflates the MAD); successive differences cancel it.
    rows = simulate(1000)
    train_row(rows, 300)["loss"] += 1.0
    assert codes(check_metrics(rows)) == [("loss_spike", 300)]


def test_loss_spike_lasting_several_rows_is_one_episode():
    rows = simulate(2000)
    for step in (1500, 1510, 1520, 1800):
        train_row(rows, step)["loss"] += 3.0
    assert codes(check_metrics(rows)) == [("loss_spike", 1500), ("loss_spike", 1800)]


def test_small_jump_on_a_smooth_curve_is_not_a_spike():
    rows = simulate(1000, noise=0.001)
    train_row(rows, 800)["loss"] += 0.3  # z is huge, but 0.3 nats is below spike_min_jump
    assert check_metrics(rows) == []


# ---------------------------------------------------------------- loss_flat


def test_train_loss_flat_with_tiny_lr():
    rows = simulate(3000, loss=lambda s: 5.0, noise=0.01, lr=1e-7)
    findings = check_metrics(rows, MonitorConfig(warmup_steps=100))
    # The first 1000-step window after the warmup is (100, 1100]; reported once.
    assert codes(findings) == [("loss_flat", 1100)]
    ev = findings[0].evidence
    assert ev["which"] == "train" and ev["lr"] == 1e-7 and ev["window_steps"] == 1000
    assert ev["rel_change"] < 0.01
    assert ev["first_median"] == pytest.approx(5.0, abs=0.01) and ev["last_median"] == pytest.approx(5.0, abs=0.01)


def test_val_loss_flat_while_train_falls():
    vals = {250: 4.0, 500: 3.6, 750: 3.5, 1000: 3.502, 1250: 3.499, 1500: 3.501, 1750: 3.5}
    rows = simulate(1750, val=lambda s: vals[s])
    findings = check_metrics(rows)
    assert codes(findings) == [("loss_flat", 1750)]  # the first 5 evals in a row within 0.3%
    ev = findings[0].evidence
    assert ev["which"] == "val" and ev["first_step"] == 750
    assert ev["val_losses"] == [3.5, 3.502, 3.499, 3.501, 3.5]
    assert ev["rel_change"] == pytest.approx(0.003 / 3.5, rel=1e-4)


# ---------------------------------------------------------------- overfitting


def test_overfitting_val_rises_while_train_falls():
    vals = {250: 4.0, 500: 3.5, 750: 3.3, 1000: 3.33, 1250: 3.36, 1500: 3.40, 1750: 3.45, 2000: 3.5}
    rows = simulate(2000, noise=0.0, val=lambda s: vals[s])
    findings = check_metrics(rows)
    assert codes(findings) == [("overfitting", 1500)]  # third eval above the best; once per episode
    ev = findings[0].evidence
    assert ev["best_val_step"] == 750 and ev["best_val_loss"] == 3.3 and ev["val_loss"] == 3.4
    assert ev["evals_above_best"] == 3
    # Train loss: median of the 10 train rows up to each eval (noise-free curve).
    assert ev["train_loss_at_best"] == pytest.approx((decaying(700) + decaying(710)) / 2, rel=1e-5)
    assert ev["train_loss"] == pytest.approx((decaying(1450) + decaying(1460)) / 2, rel=1e-5)


def test_noisy_but_improving_val_is_not_overfitting():
    vals = {250: 4.0, 500: 3.5, 750: 3.3, 1000: 3.31, 1250: 3.29, 1500: 3.30, 1750: 3.28, 2000: 3.27}
    rows = simulate(2000, val=lambda s: vals[s])
    assert check_metrics(rows) == []


def test_val_rising_with_train_not_falling_is_not_overfitting():
    vals = {250: 4.0, 500: 3.5, 750: 3.3, 1000: 3.35, 1250: 3.40, 1500: 3.45, 1750: 3.5}
    rows = simulate(1750, loss=lambda s: 3.2 + s / 10_000, val=lambda s: vals[s])  # train slowly rising
    assert "overfitting" not in {f.code for f in check_metrics(rows)}


# ---------------------------------------------------------------- nonfinite


def nan_row(step: int) -> dict:
    return {"step": step, "tokens": step * 4096, "loss": "nan", "lr": 3e-4, "grad_norm": "inf",
            "clip_threshold": 1.0, "clipped": False, "clip_ratio": 0.0, "tokens_per_s": 1e4, "nonfinite": True}


def test_nonfinite_rows_are_errors_once_per_episode():
    rows = simulate(500, log_every=1, eval_every=100, val=healthy_val)
    for i, row in enumerate(rows):
        if "loss" in row and row["step"] in (57, 58, 59, 300):
            rows[i] = nan_row(row["step"])
        if "val_loss" in row and row["step"] == 400:
            row["val_loss"] = "inf"
    train_row(rows, 120)["loss"] += 2.0  # a spike just after the NaN rows, with them in the window
    findings = check_metrics(rows)
    # The NaN rows do not hide a spike right after them, nor raise spikes of their own.
    assert codes(findings) == [("nonfinite", 57), ("loss_spike", 120), ("nonfinite", 300), ("nonfinite", 400)]
    assert findings[1].evidence["noise"] == pytest.approx(0.03, rel=0.3)
    assert [f.severity for f in findings] == ["error", "warning", "error", "error"]
    assert findings[0].evidence == {"loss": "nan", "grad_norm": "inf"}
    assert "step 57" in findings[0].message
    assert findings[3].evidence["val_loss"] == "inf"


def test_nonfinite_flag_alone_is_caught():
    rows = simulate(100, log_every=1)
    rows[40]["nonfinite"] = True  # finite-looking numbers, but the trainer skipped the step
    assert codes(check_metrics(rows)) == [("nonfinite", 41)]


# ---------------------------------------------------------------- incremental == replay


def test_observe_row_by_row_equals_replay():
    rows = simulate(3000, grad_norm=lambda s, r: 3.0 if 1000 < s <= 1600 else 0.5, val=healthy_val)
    train_row(rows, 500)["loss"] += 3.0
    rows[rows.index(train_row(rows, 2000))] = nan_row(2000)
    rows.append({"step": 3000})  # a row of neither kind is ignored
    monitor = RunMonitor(MonitorConfig(warmup_steps=100))
    incremental = []
    for row in rows:
        new = monitor.observe(row)
        assert all(f.step == row["step"] for f in new)  # reported at the row that starts it, not later
        incremental += new
    assert codes(incremental) == [("loss_spike", 500), ("clip_saturated", 1050), ("nonfinite", 2000)]
    assert incremental == check_metrics(rows, MonitorConfig(warmup_steps=100))


# ---------------------------------------------------------------- model internals: update ratio, entropy, logits


def with_key(rows: list[dict], key: str, value: Callable[[int], float], kind: str = "loss") -> list[dict]:
    """Add an optional metric to the train rows (kind="loss") or eval rows (kind="val_loss")."""
    for row in rows:
        if kind in row:
            row[key] = value(row["step"])
    return rows


def test_update_ratio_too_high_after_warmup():
    # Healthy ratio (tiny-lm measures ~0.025 at lr 3e-3), then 10x too high from step 500 on.
    rows = with_key(simulate(1000, lr=3e-3), "update_ratio", lambda s: 0.02 if s < 500 else 0.4)
    with_key(rows, "update_ratio_vectors", lambda s: 1e-3)
    findings = check_metrics(rows, MonitorConfig(warmup_steps=100))
    assert codes(findings) == [("update_ratio", 520)]  # 3rd logged row in a row above the bound; once
    f = findings[0]
    assert f.severity == "warning" and "above" in f.message
    assert f.evidence == {"update_ratio": 0.4, "lr": 3e-3, "update_ratio_vectors": 1e-3, "direction": "high",
                          "bound": 0.1, "rows": 3}


def test_update_ratio_too_low_while_lr_is_high():
    rows = with_key(simulate(600, lr=3e-4), "update_ratio", lambda s: 1e-7)  # e.g. frozen weights
    findings = check_metrics(rows, MonitorConfig(warmup_steps=100))
    assert codes(findings) == [("update_ratio", 130)]
    assert findings[0].evidence["direction"] == "low" and findings[0].evidence["update_ratio"] == 1e-7


def test_update_ratio_silent_when_healthy_in_warmup_or_at_the_schedule_end():
    # High only during the warmup, then healthy, then ~0 while the lr decays to zero: silent.
    rows = simulate(1000, lr=3e-3)
    for row in rows:
        if "loss" in row:
            s = row["step"]
            row["lr"] = 3e-3 if s < 800 else 3e-3 * (1000 - s) / 2000  # < 10% of the peak from step 800
            row["update_ratio"] = 0.5 if s <= 100 else (0.02 if s < 800 else 1e-7)
    assert check_metrics(rows, MonitorConfig(warmup_steps=100)) == []
    # Rows without the key (older runs) are silent too, and an isolated high row is not a streak.
    assert check_metrics(simulate(1000), MonitorConfig(warmup_steps=100)) == []
    rows = with_key(simulate(1000), "update_ratio", lambda s: 0.5 if s % 50 == 0 else 0.02)
    assert check_metrics(rows, MonitorConfig(warmup_steps=100)) == []


def test_entropy_collapse_near_certain_but_wrong():
    rows = with_key(simulate(2000, val=healthy_val), "val_entropy",
                    lambda s: 0.9 * healthy_val(s) if s < 1500 else 0.05, kind="val_loss")
    findings = check_metrics(rows)
    assert codes(findings) == [("entropy_collapse", 1500)]  # once, while it lasts
    ev = findings[0].evidence
    assert ev["val_entropy"] == 0.05 and ev["val_loss"] == pytest.approx(healthy_val(1500), rel=1e-5)


def test_low_entropy_of_a_model_that_is_right_is_not_collapse():
    rows = with_key(simulate(1000, val=lambda s: 0.1), "val_entropy", lambda s: 0.08, kind="val_loss")
    assert check_metrics(rows) == []


@pytest.mark.parametrize("key,which", [("val_logit_max", "output"), ("val_attn_logit_max", "attention")])
def test_logit_growth_steady_and_large(key, which):
    maxes = {250: 8.0, 500: 12.0, 750: 14.0, 1000: 16.0, 1250: 25.0, 1500: 45.0, 1750: 90.0, 2000: 95.0}
    rows = with_key(simulate(2000, val=healthy_val), key, lambda s: maxes[s], kind="val_loss")
    findings = check_metrics(rows)
    assert codes(findings) == [("logit_growth", 1500)]  # 16 -> 25 -> 45: 2.8x and above 30; one episode
    ev = findings[0].evidence
    assert ev["values"] == [16.0, 25.0, 45.0] and ev["first_step"] == 1000 and ev["level"] == 30.0
    assert ev["value"] == 45.0 and ev["logits"] == which and ev["key"] == key
    assert f"max |{which} logit|" in findings[0].message


def test_logit_growth_silent_when_healthy_or_not_rising():
    healthy = {250: 4.0, 500: 9.0, 750: 16.0, 1000: 20.0, 1250: 22.0, 1500: 23.0}  # 2x+ early, but small
    rows = with_key(simulate(1500, val=healthy_val), "val_logit_max", lambda s: healthy[s], kind="val_loss")
    assert check_metrics(rows) == []
    bumpy = {250: 20.0, 500: 50.0, 750: 40.0, 1000: 45.0, 1250: 44.0, 1500: 46.0}  # large but not growing
    rows = with_key(simulate(1500, val=healthy_val), "val_logit_max", lambda s: bumpy[s], kind="val_loss")
    assert check_metrics(rows) == []


# ---------------------------------------------------------------- moe_imbalance


def with_moe(rows: list[dict], ratio: Callable[[int], float]) -> list[dict]:
    for row in rows:
        if "loss" in row:
            row["moe_max_load_ratio"], row["moe_worst_layer"] = ratio(row["step"]), 2
    return rows


def test_moe_imbalance_found_once_after_three_rows():
    rows = with_moe(simulate(1000), lambda step: 1.3 if step < 500 else 6.0)
    found = check_metrics(rows, MonitorConfig(warmup_steps=100))
    assert codes(found) == [("moe_imbalance", 520)]  # rows 500, 510, 520 over the bound; reported once
    assert found[0].evidence == {"max_load_ratio": 6.0, "layer": 2, "bound": 3.0, "rows": 3}


def test_moe_balanced_or_brief_or_warmup_imbalance_is_silent():
    balanced = with_moe(simulate(1000), lambda step: 1.2)
    brief = with_moe(simulate(1000), lambda step: 8.0 if step in (500, 510) else 1.2)
    early = with_moe(simulate(1000), lambda step: 8.0 if step <= 100 else 1.2)  # routers start unbalanced
    for rows in (balanced, brief, early):
        assert check_metrics(rows, MonitorConfig(warmup_steps=100)) == []


# ---------------------------------------------------------------- units: a family's monitors, the runner's contract


class Recorder(Monitor):
    """A family unit that records what the runner shows it."""

    def __init__(self) -> None:
        self.seen, self.train_steps, self.eval_steps = [], [], []

    def see(self, step, row):
        self.seen.append(step)

    def train(self, step, row):
        self.train_steps.append(step)

    def eval(self, step, row):
        self.eval_steps.append(step)


def test_extra_units_see_every_row_but_judge_only_finite_ones():
    rows = simulate(60, val=healthy_val, eval_every=30)
    rows[rows.index(train_row(rows, 40))] = nan_row(40)
    unit = Recorder()
    monitor = RunMonitor(MonitorConfig(warmup_steps=100), extra=[unit])
    assert monitor.units[-1] is unit
    assert codes(monitor.replay(rows)) == [("nonfinite", 40)]  # the runner's own gate
    assert unit.seen == [r["step"] for r in rows]
    assert unit.train_steps == [s for s in range(10, 61, 10) if s != 40] and unit.eval_steps == [30, 60]


def test_family_units_come_from_the_registry():
    lm, cascade = build_config({}), build_config({"model": {"family": "cascade"}})
    generic = [type(u).__name__ for u in build_monitor(lm).units]
    assert [type(u).__name__ for u in build_monitor(cascade).units] == [
        *generic, "GradExplosion", "OutputRmsOff", "OutputConstant", "OutputCopiesInput"]
    # grad_explosion: off for lm unless asked, 100 for the cascade unless told otherwise (0 = off).
    assert build_monitor(lm).grad_norm_max == 0 and build_monitor(cascade).grad_norm_max == 100
    assert build_monitor(build_config({"doctor": {"signal": {"grad_norm_max": 50}}})).grad_norm_max == 50
    off = build_config({"model": {"family": "cascade"}, "doctor": {"signal": {"grad_norm_max": 0}}})
    assert build_monitor(off).grad_norm_max == 0
    # Thresholds are read from the family's own section, not copied into MonitorConfig.
    custom = build_config({"model": {"family": "cascade"}, "doctor": {"signal": {"constant_std": 0.5}}})
    (constant,) = [u for u in build_monitor(custom).units if type(u).__name__ == "OutputConstant"]
    assert constant.config is custom.doctor.signal
    assert not {"rms_ratio_low", "constant_std", "grad_norm_max"} & set(MonitorConfig.__dataclass_fields__)
