"""Run-level monitors: checks computed from metric rows (the rows of metrics.jsonl).

Pure and cheap. Each monitor is a small unit (`Monitor`) that judges rows for its code and keeps its
own state; a `RunMonitor` runs the generic units, then a family's (``FamilySpec.monitors``: the
cascade's output_rms_off, output_constant, output_copies_input live in families/cascade/monitors.py),
on one row at a time (the trainer calls `observe` on every row it logs) and returns only NEW findings.
A condition that persists is one episode, reported once when it starts; it is reported again only
after it has ended. `RunMonitor.replay(rows)` (or `check_metrics`) replays a whole history (the
doctor, after the fact) and returns exactly what the calls to `observe` returned, in order.
`families.registry.build_monitor(cfg)` builds a run's monitor: the generic units with the thresholds
of `MonitorConfig.from_config`, plus its family's units.

Generic codes: clip_saturated, loss_spike, loss_flat, overfitting, nonfinite, update_ratio, moe_imbalance
(train rows), entropy_collapse, logit_growth (eval rows), grad_explosion (both; on when
doctor.signal.grad_norm_max is set or the family adds it) (docs/findings.md). Units read optional keys
(update_ratio, val_entropy, val_logit_max, val_attn_logit_max, ...): rows without them, as in older runs,
are skipped.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import scratchlab.doctor.catalog  # noqa: F401  (registers the codes)
from scratchlab.fileio import to_float
from scratchlab.doctor.findings import Finding, make_finding

if TYPE_CHECKING:
    from scratchlab.config import Config

Row = dict[str, Any]
# Eval-row keys judged by logit_growth: output logits, and pre-softmax attention logits (models
# with an `attention_logit_max` probe, such as scratchlab's lm family).
LOGIT_KEYS = {"val_logit_max": "output", "val_attn_logit_max": "attention"}
MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation, for normal noise


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the generic monitors (a family's units read their own config section, e.g. the cascade's
    ``doctor.signal``). Windows count logged rows unless the name says steps."""

    # Steps at the start where clipping, fast loss changes and noisy evals are normal (the LR and
    # clip-threshold warmups). Clip saturation, flatness and overfitting are judged only after it.
    warmup_steps: int = 100
    # clip_saturated: the trainer's clip_ratio (clipped fraction of the last clip_window_steps
    # steps) at or above clip_ratio, once that whole window lies after the warmup. The episode
    # ends when the ratio falls below half of it, so a ratio hovering at the threshold is one report.
    clip_ratio: float = 0.5
    clip_window_steps: int = 100  # = CLIP_WINDOW in train/loop.py: the window of clip_ratio
    clip_lr_factor: float = 10.0  # median norm this many times the threshold: blame the LR, not the clip
    # loss_spike: a train loss more than spike_z noise stds and spike_min_jump nats above the median
    # of the last spike_level_rows rows; the noise is estimated over the last spike_window_rows rows
    # (50 rows underestimate it often enough to flag heavy noise as a spike).
    spike_window_rows: int = 100
    spike_min_rows: int = 20
    spike_level_rows: int = 5
    spike_z: float = 6.0
    spike_min_jump: float = 0.5  # nats: on a very smooth curve z alone flags harmless wiggles
    # loss_flat, train: relative change below flat_rel_change across the last flat_window_steps steps,
    # once they all lie after the warmup (median of the first fifth of the rows vs the last fifth).
    # Steps, not rows, so that log_every does not change what it means.
    # loss_flat, val: (max - min) / first below flat_val_rel_change over the last flat_val_evals
    # evals. Evals run on fixed windows (no sampling noise), so a tighter tolerance still tells
    # "stuck" from "converging slowly". Either episode ends when the change is back above twice
    # its tolerance.
    flat_window_steps: int = 1000
    flat_min_rows: int = 10
    flat_rel_change: float = 0.01
    flat_val_evals: int = 5
    flat_val_rel_change: float = 0.003
    # overfitting: the last overfit_evals val losses all above the best by overfit_margin nats, the
    # latest at least as high as the first of them, while the train loss fell by overfit_margin.
    overfit_evals: int = 3
    overfit_margin: float = 0.02
    # update_ratio: the matrices' update/weight ratio ||dW|| / ||W|| of the optimizer step above
    # update_ratio_high, or below update_ratio_low, on update_ratio_rows logged rows in a row after
    # the warmup. The rule of thumb is ~1e-3, but AdamW at the high LRs of small models settles
    # near sqrt(2 lr wd): the tiny-lm-adamw preset (lr 3e-3, wd 0.1) measured 0.026 at its peak (end of
    # warmup) falling to 0.0026 at the end, so the high bound sits 4x above that. A far too high LR
    # shows as ratios of 0.2-1 right after the warmup; they fall back once the weights have grown,
    # so the check is on a short streak. Low is judged only while the lr is at least
    # update_ratio_lr_frac of its peak so far: a schedule decaying to 0 is meant to stop updates.
    # The episode ends when a row is back inside the bounds.
    update_ratio_high: float = 0.1
    update_ratio_low: float = 1e-5
    update_ratio_lr_frac: float = 0.1
    update_ratio_rows: int = 3
    # the config field advice names as "the learning rate" (the hidden matrices' LR: optim.muon_lr under Muon)
    matrix_lr_key: str = "optim.lr"
    # moe_imbalance: the busiest expert's share of routed tokens over its fair share (1/n_experts),
    # worst layer, above moe_load_ratio on moe_rows logged rows in a row after the warmup. Rows
    # carry it only for models that report their load (a `moe_load()` method, see the trainer).
    moe_load_ratio: float = 3.0
    moe_rows: int = 3
    # entropy_collapse: mean output entropy at eval below entropy_floor nats AND below
    # entropy_loss_frac x the val loss: the model is near-certain but still wrong (a model that is
    # certain and right has a low loss too). A calibrated model's entropy tracks its loss: the
    # tiny-lm-adamw preset measured 5.7 -> 4.7 nats for val losses 5.5 -> 4.5.
    entropy_floor: float = 0.5
    entropy_loss_frac: float = 0.25
    # logit_growth: the mean per-window max |logit| at eval grew logit_growth_factor x over the last
    # logit_growth_evals evals after the warmup, rising at each, and is above logit_level (healthy
    # early growth from the small initial logits stays below it: the tiny-lm-adamw preset measured
    # 9.6 -> 11.8). The episode lasts while it stays above logit_level.
    logit_growth_evals: int = 3
    logit_growth_factor: float = 2.0
    logit_level: float = 30.0

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> MonitorConfig:
        """Defaults, with the warmup taken from a run's config (LR and clip-threshold warmups)."""
        ratio = UPDATE_RATIO_BY_OPTIMIZER.get(cfg.optim.name, {})  # the optimizer's own update_ratio bounds
        return cls(**{"warmup_steps": run_warmup(cfg), **ratio, **overrides})


def run_warmup(cfg: Config) -> int:
    """The steps at the start of a run where clipping and fast changes are normal: the longer of the warmups."""
    return max(cfg.optim.warmup_steps, cfg.train.clip.warmup_steps)


# update_ratio bounds of the hidden matrices by optimizer (optim.name; AdamW's are the defaults above).
# Muon's orthogonalised steps move a matrix by ~muon_lr x its shape factor whatever the gradient's size:
# the tiny-lm preset with muon (muon_lr 0.02) measured 0.054 at the end of warmup, falling to 0.02 by step 60
# (AdamW: 0.026); 30x that LR gives ~1. The high bound sits ~5x above the healthy peak.
UPDATE_RATIO_BY_OPTIMIZER: dict[str, dict[str, Any]] = {
    "muon": {"update_ratio_high": 0.25, "matrix_lr_key": "optim.muon_lr"},
}


# ---------------------------------------------------------------- small helpers


def num(row: Row, key: str) -> float | None:
    """A metric as a float; non-finite values arrive as the strings "nan" / "inf"."""
    return to_float(row.get(key))  # the one coercion (fileio): junk -> None, a huge int -> inf


def ev(value: float) -> float | str:
    """A number for evidence: 6 significant digits, non-finite as a string (valid JSON)."""
    return float(f"{value:.6g}") if math.isfinite(value) else str(value)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mad(values: list[float]) -> float:
    med = statistics.median(values)
    return statistics.median(abs(x - med) for x in values)


def spike_z(value: float, reference: list[float], level_rows: int) -> tuple[float, float, float]:
    """(z, level, noise) of value against the rows before it.

    level: median of the last `level_rows` rows (where the curve is now). noise: the std of the
    row-to-row noise, from the MAD of successive differences (over sqrt(2): a difference holds two
    draws). Differences cancel the trend, so a steep early curve does not hide a spike the way
    the MAD of the raw losses would. z is inf when the reference has no noise at all.
    """
    level = statistics.median(reference[-level_rows:])
    noise = MAD_TO_STD * _mad([b - a for a, b in zip(reference, reference[1:])]) / math.sqrt(2)
    if noise == 0:
        return (math.inf if value > level else 0.0), level, noise
    return (value - level) / noise, level, noise


@dataclass
class Episode:
    """A persistent condition: report when it starts, stay quiet while it lasts."""

    active: bool = False

    def update(self, enter: bool, stay: bool | None = None) -> bool:
        """Returns True when an episode starts. `stay` (default: enter) keeps an active one going."""
        was = self.active
        self.active = enter or (was and (enter if stay is None else stay))
        return self.active and not was


@dataclass
class _Point:
    step: int
    loss: float
    grad_norm: float | None


def _push(window: deque[_Point], point: _Point, steps: int) -> None:
    """Append, and drop the rows older than the last `steps` steps."""
    window.append(point)
    while window[0].step <= point.step - steps:
        window.popleft()


def _lr_text(lr: float | None) -> str:
    return "" if lr is None else f" ({lr:.3g})"


Found = Finding | None | list[Finding | None]


# ---------------------------------------------------------------- the unit


class Monitor:
    """One monitor: a small unit that judges rows for its code(s) and keeps its own state.

    The `RunMonitor` calls ``see`` on every row that has a step (before anything else), then ``train``
    on finite train rows and ``eval`` on finite eval rows (a non-finite row is the nonfinite check's
    alone: its numbers never enter a window). Each returns the findings that START at this row (None,
    one finding or a list). A family adds its own units (``FamilySpec.monitors``).
    """

    def see(self, step: int, row: Row) -> None:
        """Every row with a step, non-finite ones included (e.g. to remember an attribution)."""

    def train(self, step: int, row: Row) -> Found:
        return None

    def eval(self, step: int, row: Row) -> Found:
        return None


class Attributed(Monitor):
    """A monitor whose findings name the top parameters by gradient norm (the latest row's ``grad_top``)."""

    def __init__(self) -> None:
        self._grad_top: tuple[int, list] | None = None

    def see(self, step: int, row: Row) -> None:
        if isinstance(row.get("grad_top"), list):
            self._grad_top = (step, row["grad_top"][:5])

    def attribution(self) -> dict:
        """Evidence naming the top parameters by gradient norm (from the latest row that carried them)."""
        if self._grad_top is None:
            return {"parameters": None}
        return {"parameters": self._grad_top[1], "parameters_step": self._grad_top[0]}


# ---------------------------------------------------------------- train rows


class LossSpike(Monitor):
    """loss_spike: a train loss far above the recent level, in units of the row-to-row noise."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._losses: deque[float] = deque(maxlen=config.spike_window_rows)  # finite train losses: the reference
        self._episode = Episode()

    def train(self, step: int, row: Row) -> Found:
        c, loss = self.config, num(row, "loss")
        reference = list(self._losses)
        self._losses.append(loss)
        if len(reference) < c.spike_min_rows:
            self._episode.update(False)
            return None
        z, level, noise = spike_z(loss, reference, c.spike_level_rows)
        if not self._episode.update(z > c.spike_z and loss > level + c.spike_min_jump):
            return None
        return make_finding(
            "loss_spike",
            f"train loss {loss:.4f} at step {step} is {loss - level:.3f} nats above the median {level:.4f} "
            f"of the previous {c.spike_level_rows} rows ({z:.1f} x the row-to-row noise {noise:.3g})",
            step=step, loss=ev(loss), median=ev(level), noise=ev(noise), z=ev(z), window_rows=len(reference),
        )


class ClipSaturated(Monitor):
    """clip_saturated: clipping fires on most steps of its window, after the warmup."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._recent: deque[_Point] = deque()  # finite train rows of the last clip_window_steps steps
        self._episode = Episode()

    def train(self, step: int, row: Row) -> Found:
        c = self.config
        _push(self._recent, _Point(step, num(row, "loss"), num(row, "grad_norm")), c.clip_window_steps)
        ratio, threshold = num(row, "clip_ratio"), num(row, "clip_threshold")
        if ratio is None or threshold is None:  # clipping off, or an older row
            self._episode.update(False)
            return None
        window_after_warmup = step - c.clip_window_steps >= c.warmup_steps
        enter = window_after_warmup and ratio >= c.clip_ratio
        if not self._episode.update(enter, stay=ratio >= c.clip_ratio / 2):
            return None
        norms = [p.grad_norm for p in self._recent if p.grad_norm is not None]
        median_norm = statistics.median(norms) if norms else math.nan
        # Pre-clip norms: a threshold at their p90 clips about one step in ten.
        suggested = quantile(norms, 0.9) if norms else math.nan
        lr = num(row, "lr")
        # The logged lr is optim.lr's schedule: quote it only when that is the matrices' LR (not under Muon).
        key, lr_text = c.matrix_lr_key, _lr_text(lr) if c.matrix_lr_key == "optim.lr" else ""
        times = median_norm / threshold if threshold > 0 else math.inf
        if times >= c.clip_lr_factor:
            advice = (f"norms {times:.0f}x the threshold: the learning rate{lr_text} is likely too high; "
                      f"lower {key} before raising the clip")
        else:
            advice = (f"lower {key}{lr_text} or raise train.clip.max_norm towards {suggested:.3g} "
                      "(p90 of the pre-clip norms)")
        return make_finding(
            "clip_saturated",
            f"gradient clipping fired on {ratio:.0%} of the last {c.clip_window_steps} steps at step {step} "
            f"(median pre-clip grad norm {median_norm:.3g}, threshold {threshold:.3g}): {advice}",
            step=step, clip_ratio=ev(ratio), median_grad_norm=ev(median_norm), clip_threshold=ev(threshold),
            suggested_threshold=ev(suggested), lr=None if lr is None else ev(lr), window_steps=c.clip_window_steps,
        )


class LossFlat(Monitor):
    """loss_flat: the train loss (over a window of steps) or the val loss (over a few evals) stopped moving."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._flat: deque[_Point] = deque()  # finite train rows of the last flat_window_steps steps
        self._evals: list[tuple[int, float]] = []  # (step, val_loss) of the finite evals
        self._train_episode, self._val_episode = Episode(), Episode()

    def train(self, step: int, row: Row) -> Found:
        c = self.config
        _push(self._flat, _Point(step, num(row, "loss"), None), c.flat_window_steps)
        if step - c.flat_window_steps < c.warmup_steps or len(self._flat) < c.flat_min_rows:
            return None
        window = [p.loss for p in self._flat]
        k = len(window) // 5
        first, last = statistics.median(window[:k]), statistics.median(window[-k:])
        change = abs(last - first) / max(abs(first), 1e-12)
        if not self._train_episode.update(change < c.flat_rel_change, stay=change < 2 * c.flat_rel_change):
            return None
        lr = num(row, "lr")
        return make_finding(
            "loss_flat",
            f"train loss moved {change:.2%} over the last {c.flat_window_steps} steps "
            f"({first:.4f} -> {last:.4f}) at step {step}, lr{_lr_text(lr)}",
            step=step, which="train", rel_change=ev(change), first_median=ev(first), last_median=ev(last),
            window_steps=c.flat_window_steps, lr=None if lr is None else ev(lr),
        )

    def eval(self, step: int, row: Row) -> Found:
        c = self.config
        self._evals.append((step, num(row, "val_loss")))
        last = [e for e in self._evals[-c.flat_val_evals:] if e[0] > c.warmup_steps]
        if len(last) < c.flat_val_evals:
            return None
        values = [v for _, v in last]
        change = (max(values) - min(values)) / max(abs(values[0]), 1e-12)
        tol = c.flat_val_rel_change
        if not self._val_episode.update(change < tol, stay=change < 2 * tol):
            return None
        return make_finding(
            "loss_flat",
            f"val loss stayed within {change:.2%} over the last {len(last)} evals "
            f"(steps {last[0][0]}-{last[-1][0]}, {values[0]:.4f} -> {values[-1]:.4f})",
            step=step, which="val", rel_change=ev(change), first_step=last[0][0],
            val_losses=[ev(v) for v in values],
        )


class UpdateRatio(Monitor):
    """update_ratio: the optimizer step moves the weight matrices far too much or too little, for a streak."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._streak = 0  # consecutive rows past the warmup with the ratio out of range (+ high, - low)
        self._peak_lr = 0.0  # the highest lr of the train rows so far
        self._episode = Episode()

    def train(self, step: int, row: Row) -> Found:
        c = self.config
        ratio, lr = num(row, "update_ratio"), num(row, "lr")
        if lr is not None and math.isfinite(lr):
            self._peak_lr = max(self._peak_lr, lr)
        if ratio is None or not math.isfinite(ratio):
            return None  # not measured on this row (older run, skipped step): the streak is unchanged
        lr_high = lr is not None and lr > 0 and lr >= c.update_ratio_lr_frac * self._peak_lr
        side = 0
        if step > c.warmup_steps:
            if ratio > c.update_ratio_high:
                side = 1
            elif ratio < c.update_ratio_low and lr_high:
                side = -1
        # A streak counts rows on one side; crossing from high to low starts a new one.
        if side == 0:
            self._streak = 0
        elif self._streak * side > 0:
            self._streak += side
        else:
            self._streak = side
        enter = abs(self._streak) >= c.update_ratio_rows
        if not self._episode.update(enter, stay=side != 0):
            return None
        high = side > 0
        bound = c.update_ratio_high if high else c.update_ratio_low
        vectors = num(row, "update_ratio_vectors")
        key = c.matrix_lr_key
        advice = (f"the weights move too fast: lower {key}" if high
                  else f"the weights barely move: raise {key} (or check that the optimizer sees these parameters)")
        return make_finding(
            "update_ratio",
            f"update/weight ratio of the weight matrices {ratio:.3g} at step {step}, "
            f"{'above' if high else 'below'} {bound:.0e} for {c.update_ratio_rows} logged rows in a row "
            f"(rule of thumb ~1e-3), lr{_lr_text(lr)}: {advice}",
            step=step, update_ratio=ev(ratio), lr=None if lr is None else ev(lr),
            update_ratio_vectors=None if vectors is None else ev(vectors), direction="high" if high else "low",
            bound=bound, rows=c.update_ratio_rows,
        )


class MoeImbalance(Monitor):
    """moe_imbalance: the busiest expert gets several times its fair share, for a streak of rows."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._streak = 0  # consecutive logged rows with an overloaded expert
        self._episode = Episode()

    def train(self, step: int, row: Row) -> Found:
        c = self.config
        ratio = num(row, "moe_max_load_ratio")
        if ratio is None or not math.isfinite(ratio):
            return None  # a dense model, or not measured on this row
        over = step > c.warmup_steps and ratio > c.moe_load_ratio
        self._streak = self._streak + 1 if over else 0
        if not self._episode.update(self._streak >= c.moe_rows, stay=over):
            return None
        layer = row.get("moe_worst_layer")
        return make_finding(
            "moe_imbalance",
            f"the busiest expert (layer {layer}) gets {ratio:.1f}x its fair share of tokens at step {step}, above "
            f"{c.moe_load_ratio:g}x for {c.moe_rows} logged rows: raise the load-balance loss coefficient or use "
            "bias-based balancing",
            step=step, max_load_ratio=ev(ratio), layer=layer, bound=c.moe_load_ratio, rows=c.moe_rows,
        )


# ---------------------------------------------------------------- eval rows


@dataclass
class _Eval:
    step: int
    val_loss: float
    train_loss: float | None  # median of the latest train rows when the eval ran


class Overfitting(Monitor):
    """overfitting: the val loss rises above its best for a few evals while the train loss keeps falling."""

    TRAIN_ROWS = 10  # the train loss at an eval: median of the latest finite train rows

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._losses: deque[float] = deque(maxlen=min(self.TRAIN_ROWS, config.spike_window_rows))
        self._evals: list[_Eval] = []
        self._episode = Episode()

    def train(self, step: int, row: Row) -> Found:
        self._losses.append(num(row, "loss"))
        return None

    def eval(self, step: int, row: Row) -> Found:
        c = self.config
        recent = list(self._losses)
        self._evals.append(_Eval(step, num(row, "val_loss"), statistics.median(recent) if recent else None))
        evals, k = self._evals, c.overfit_evals
        best_i = min(range(len(evals)), key=lambda i: evals[i].val_loss)
        best, last, now = evals[best_i], evals[-k:], evals[-1]
        enter = (
            best_i < len(evals) - k  # the best is older than the last k evals
            and all(e.val_loss > best.val_loss + c.overfit_margin for e in last)
            and now.val_loss >= last[0].val_loss  # still rising, not recovering
            and best.train_loss is not None
            and now.train_loss is not None
            and now.train_loss < best.train_loss - c.overfit_margin
        )
        # The episode lasts until a new best val loss.
        if not self._episode.update(enter, stay=best_i < len(evals) - 1):
            return None
        return make_finding(
            "overfitting",
            f"val loss {now.val_loss:.4f} at step {step} is above its best {best.val_loss:.4f} (step {best.step}) "
            f"for {k} evals while the train loss fell {best.train_loss:.4f} -> {now.train_loss:.4f}; "
            f"checkpoints/best holds the step-{best.step} weights",
            step=step, best_val_step=best.step, best_val_loss=ev(best.val_loss), val_loss=ev(now.val_loss),
            train_loss_at_best=ev(best.train_loss), train_loss=ev(now.train_loss), evals_above_best=k,
        )


class EntropyCollapse(Monitor):
    """entropy_collapse: the model is near-certain of its next token and mostly wrong."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._episode = Episode()

    def eval(self, step: int, row: Row) -> Found:
        c = self.config
        val_loss, entropy = num(row, "val_loss"), num(row, "val_entropy")
        if entropy is None or not math.isfinite(entropy):
            return None
        low = entropy < c.entropy_floor and entropy < c.entropy_loss_frac * val_loss
        if not self._episode.update(low):
            return None
        return make_finding(
            "entropy_collapse",
            f"mean output entropy {entropy:.3g} nats at step {step} while the val loss is {val_loss:.4f}: the model "
            f"is near-certain of its next token and mostly wrong (expect repetitive samples)",
            step=step, val_entropy=ev(entropy), val_loss=ev(val_loss), entropy_floor=c.entropy_floor,
        )


class LogitGrowth(Monitor):
    """logit_growth: the max |logit| at eval (output, or attention for models that report it) keeps growing."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._history = {key: deque(maxlen=config.logit_growth_evals) for key in LOGIT_KEYS}  # key -> (step, value)
        self._episodes = {key: Episode() for key in LOGIT_KEYS}

    def eval(self, step: int, row: Row) -> Found:
        return [self._check(step, row, key) for key in LOGIT_KEYS]

    def _check(self, step: int, row: Row, key: str) -> Finding | None:
        c = self.config
        value = num(row, key)
        if value is None or not math.isfinite(value) or step <= c.warmup_steps:
            return None
        history = self._history[key]
        history.append((step, value))
        window = [v for _, v in history]
        rising = all(b > a for a, b in zip(window, window[1:]))
        enter = (len(window) == c.logit_growth_evals and rising and value > c.logit_level
                 and value >= c.logit_growth_factor * window[0])
        if not self._episodes[key].update(enter, stay=value > c.logit_level):
            return None
        first_step, which = history[0][0], LOGIT_KEYS[key]
        return make_finding(
            "logit_growth",
            f"max |{which} logit| at eval grew {value / window[0]:.1f}x over the last {len(window)} evals "
            f"(steps {first_step}-{step}: {window[0]:.3g} -> {value:.3g}) and keeps rising",
            step=step, logits=which, key=key, value=ev(value), first_step=first_step,
            values=[ev(v) for v in window], level=c.logit_level,
        )


# ---------------------------------------------------------------- both: the gradient norm


class GradExplosion(Attributed):
    """grad_explosion: grad_norm (train rows, pre-clip) or val_grad_norm (eval rows) above ``bound``.

    Off unless a run asks for it (``doctor.signal.grad_norm_max``, `configured_monitors`) or its family adds
    it (the cascade: 100 by default). The evidence names the top parameters by gradient norm from the row's
    ``grad_top``, else the latest one seen.
    """

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.bound = bound
        self._episodes = {"grad_norm": Episode(), "val_grad_norm": Episode()}

    def train(self, step: int, row: Row) -> Found:
        return self._check(step, row, "grad_norm")

    def eval(self, step: int, row: Row) -> Found:
        return self._check(step, row, "val_grad_norm")

    def _check(self, step: int, row: Row, key: str) -> Finding | None:
        norm = num(row, key)
        if self.bound <= 0 or norm is None or not math.isfinite(norm):
            return None  # off, absent, or non-finite (the nonfinite check speaks for that)
        if not self._episodes[key].update(norm > self.bound):
            return None
        evidence = self.attribution()
        names = ", ".join(str(p.get("name")) for p in (evidence["parameters"] or [])[:3]) or "not measured"
        where = "training step" if key == "grad_norm" else "eval batch"
        return make_finding(
            "grad_explosion",
            f"gradient norm {norm:.4g} on the {where} at step {step}, above {self.bound:g}; top parameters "
            f"by gradient norm: {names}",
            step=step, key=key, grad_norm=ev(norm), bound=self.bound, lr=num(row, "lr"), **evidence,
        )


def configured_monitors(cfg: Config) -> list[Monitor]:
    """Generic monitors that a run's config turns on: grad_explosion when ``doctor.signal.grad_norm_max`` is set
    (> 0). Left unset (None), a family may bring its own default (the cascade's monitors: 100)."""
    bound = cfg.doctor.signal.grad_norm_max
    return [GradExplosion(bound)] if bound else []


# ---------------------------------------------------------------- the runner


class RunMonitor:
    """The generic monitors (built from ``config``) followed by ``extra`` units (a family's, a run's).

    ``observe(row)`` returns the findings that start at this row, unit by unit in order. A non-finite
    train or eval row is reported here (``nonfinite``, once per episode) and is not shown to the units.
    """

    def __init__(self, config: MonitorConfig | None = None, extra: Sequence[Monitor] = ()) -> None:
        self.config = config or MonitorConfig()
        c = self.config
        self.units: list[Monitor] = [LossSpike(c), ClipSaturated(c), LossFlat(c), UpdateRatio(c), MoeImbalance(c),
                                     Overfitting(c), EntropyCollapse(c), LogitGrowth(c), *extra]
        self._nonfinite = {"train": Episode(), "eval": Episode()}

    @property
    def grad_norm_max(self) -> float:
        """The lowest grad_explosion bound in force (0: off); the trainer names the parameters above it."""
        return min((u.bound for u in self.units if isinstance(u, GradExplosion) and u.bound > 0), default=0.0)

    def observe(self, row: Row) -> list[Finding]:
        """Findings that start at this row (train or eval row of metrics.jsonl)."""
        step = row.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            return []
        step = int(step)
        for unit in self.units:
            unit.see(step, row)
        if "val_loss" in row:
            found, kind = self._gate_eval(step, row), "eval"
        elif "loss" in row:
            found, kind = self._gate_train(step, row), "train"
        else:
            return []
        if found is None:  # a finite row: every unit judges it
            found = []
            for unit in self.units:
                result = unit.eval(step, row) if kind == "eval" else unit.train(step, row)
                found += result if isinstance(result, list) else [result]
        return [f for f in found if f is not None]

    def replay(self, rows: Iterable[Row]) -> list[Finding]:
        """Every finding of a whole metrics history, in row order."""
        return [finding for row in rows for finding in self.observe(row)]

    def _gate_train(self, step: int, row: Row) -> list[Finding] | None:
        loss, grad_norm = num(row, "loss"), num(row, "grad_norm")
        bad = row.get("nonfinite") is True or any(v is not None and not math.isfinite(v) for v in (loss, grad_norm))
        if self._nonfinite["train"].update(bad):
            values = {k: ev(v) for k, v in (("loss", loss), ("grad_norm", grad_norm)) if v is not None}
            shown = ", ".join(f"{k} {v}" for k, v in values.items())
            return [make_finding("nonfinite", f"non-finite training step at step {step} ({shown}); the step was "
                                 "skipped", step=step, **values)]
        return [] if bad or loss is None else None  # a skipped step: its numbers must not enter the windows

    def _gate_eval(self, step: int, row: Row) -> list[Finding] | None:
        val_loss, val_bpb = num(row, "val_loss"), num(row, "val_bpb")
        bad = any(v is not None and not math.isfinite(v) for v in (val_loss, val_bpb))
        if self._nonfinite["eval"].update(bad):
            values = {k: ev(v) for k, v in (("val_loss", val_loss), ("val_bpb", val_bpb)) if v is not None}
            shown = ", ".join(f"{k} {v}" for k, v in values.items())
            return [make_finding("nonfinite", f"non-finite validation loss at step {step} ({shown})",
                                 step=step, **values)]
        return [] if bad or val_loss is None else None


def check_metrics(rows: Iterable[Row], config: MonitorConfig | None = None,
                  extra: Sequence[Monitor] = ()) -> list[Finding]:
    """Replay a whole metrics history through a fresh RunMonitor: every finding, in row order."""
    return RunMonitor(config, extra).replay(rows)
