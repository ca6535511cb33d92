"""The cascade family's monitors: continuous outputs that drift in scale, stop moving, or copy the input.

Units of the doctor's `RunMonitor` (doctor/monitors.py), registered in the family's spec
(``FamilySpec.monitors``) and built by `monitors(cfg)` with their thresholds read from the config
section ``doctor.signal`` (`SignalMonitorConfig`; docs/cascade.md). The rows they read are written by the
cascade task: eval rows carry ``val_rms_ratio``, ``val_output_std_ratio``, ``val_input_corr``,
``val_novelty`` and ``grad_top``; train rows of a learnable RMS scaling carry ``rms_scale_factor``.

- output_rms_off: val_rms_ratio (output RMS / target RMS) outside [rms_ratio_low, rms_ratio_high], or
  (train rows) the learnable scaling's factor outside that range;
- output_constant: val_output_std_ratio (output std over time / target's) below constant_std;
- output_copies_input: after the warmup, val_input_corr above copy_corr while val_novelty (1 - mean
  cosine of the predicted and the true change from the last input frame) is above copy_novelty.
  A smooth signal's next frame correlates with the current one (the synthetic signal: ~0.9), so the
  correlation alone cannot tell copying from predicting: the change must be missed too;
- grad_explosion: the doctor's generic unit, on at 100 for this family unless doctor.signal.grad_norm_max
  says otherwise (0 = off).
"""

from __future__ import annotations

import math

from scratchlab.config import Config, SignalMonitorConfig
from scratchlab.doctor.findings import make_finding
from scratchlab.doctor.monitors import Attributed, Episode, Found, GradExplosion, Monitor, Row, ev, num, run_warmup

GRAD_NORM_MAX = 100.0  # the family's grad_explosion bound when doctor.signal.grad_norm_max is unset


class OutputRmsOff(Attributed):
    """output_rms_off: the output's scale left its range (eval rows), or the learnable scaling's factor did
    (train rows)."""

    def __init__(self, config: SignalMonitorConfig) -> None:
        super().__init__()
        self.config = config
        self._train, self._eval = Episode(), Episode()

    def train(self, step: int, row: Row) -> Found:
        """From train rows: a learnable RMS scaling's factor over the fixed one (1 at init).

        Adam moves each scalar by about the LR per step whatever its gradient, so a mixing weight walks
        to zero and the reference RMS turns into sqrt(negative) = NaN without any gradient spike first:
        the factor leaving its range is the warning that comes in time (rows of models that log it).
        """
        c = self.config
        factor = num(row, "rms_scale_factor")
        if factor is None:
            return None
        off = not (math.isfinite(factor) and c.rms_ratio_low <= factor <= c.rms_ratio_high)
        if not self._train.update(off):
            return None
        mix = [num(row, "rms_mix_in"), num(row, "rms_mix_ctx")]
        danger = " (a mixing weight near or below 0: the reference RMS becomes sqrt of a negative, NaN)" if any(
            m is not None and m <= 0.1 for m in mix) else ""
        return make_finding(
            "output_rms_off",
            f"the learnable RMS scaling multiplies the output by {factor:.3g} at step {step} (gain "
            f"{num(row, 'rms_gain')}, mix {mix}; healthy {c.rms_ratio_low:g}-{c.rms_ratio_high:g}){danger}",
            step=step, rms_scale_factor=ev(factor), rms_gain=num(row, "rms_gain"), rms_mix=mix,
            low=c.rms_ratio_low, high=c.rms_ratio_high, lr=num(row, "lr"), **self.attribution())

    def eval(self, step: int, row: Row) -> Found:
        c = self.config
        ratio = num(row, "val_rms_ratio")
        if ratio is None or not math.isfinite(ratio):
            return None
        if not self._eval.update(not c.rms_ratio_low <= ratio <= c.rms_ratio_high):
            return None
        return make_finding(
            "output_rms_off",
            f"output RMS is {ratio:.3g}x the target's at step {step} (healthy {c.rms_ratio_low:g}-"
            f"{c.rms_ratio_high:g}): the output scale drifted",
            step=step, rms_ratio=ev(ratio), low=c.rms_ratio_low, high=c.rms_ratio_high,
            rms_gain=num(row, "rms_gain"), **self.attribution())


class OutputConstant(Attributed):
    """output_constant: the output hardly moves over time compared with the target."""

    def __init__(self, config: SignalMonitorConfig) -> None:
        super().__init__()
        self.config = config
        self._episode = Episode()

    def eval(self, step: int, row: Row) -> Found:
        c = self.config
        std_ratio = num(row, "val_output_std_ratio")
        if std_ratio is None or not math.isfinite(std_ratio):
            return None
        if not self._episode.update(std_ratio < c.constant_std):
            return None
        return make_finding(
            "output_constant",
            f"the output hardly moves over time at step {step}: its std over time is {std_ratio:.3g}x the "
            f"target's (below {c.constant_std:g})",
            step=step, output_std_ratio=ev(std_ratio), output_std=num(row, "val_output_std"),
            bound=c.constant_std, **self.attribution())


class OutputCopiesInput(Attributed):
    """output_copies_input: after the warmup, the output follows the last input frame but not its change."""

    def __init__(self, config: SignalMonitorConfig, warmup_steps: int) -> None:
        super().__init__()
        self.config, self.warmup_steps = config, warmup_steps
        self._episode = Episode()

    def eval(self, step: int, row: Row) -> Found:
        c = self.config
        corr, novelty = num(row, "val_input_corr"), num(row, "val_novelty")
        if corr is None or novelty is None or not (math.isfinite(corr) and math.isfinite(novelty)):
            return None
        copying = step > self.warmup_steps and corr > c.copy_corr and novelty > c.copy_novelty
        if not self._episode.update(copying):
            return None
        baseline = num(row, "val_copy_baseline")
        return make_finding(
            "output_copies_input",
            f"the output follows the input (correlation {corr:.3g} > {c.copy_corr:g}) but not its change "
            f"(val_novelty {novelty:.3g} > {c.copy_novelty:g}) at step {step}: the model copies the last "
            f"frame (val_loss {num(row, 'val_loss'):.4g} vs copy baseline "
            f"{baseline if baseline is None else f'{baseline:.4g}'})",
            step=step, input_corr=ev(corr), novelty=ev(novelty), copy_corr=c.copy_corr,
            copy_novelty=c.copy_novelty, val_loss=num(row, "val_loss"), val_copy_baseline=baseline,
            **self.attribution())


def monitors(cfg: Config) -> list[Monitor]:
    """The cascade's units, after the generic ones: grad_explosion (unless the config set its own bound, which
    the generic `configured_monitors` then applies), output_rms_off, output_constant, output_copies_input."""
    s = cfg.doctor.signal
    units: list[Monitor] = [GradExplosion(GRAD_NORM_MAX)] if s.grad_norm_max is None else []
    return units + [OutputRmsOff(s), OutputConstant(s), OutputCopiesInput(s, run_warmup(cfg))]
