"""The cascade family's preflight checks: the doctor's units, fitted to frames in and predictions out.

- causal_leak / batch_leak through `make_pairs` (`WindowForward`: frames in, predictions out);
- nonfinite after one backward of the family's loss (-inf predictions count: there is no mask);
- grad_outlier among scalar-like parameters only (`check_scalar_outliers`): the learnable RMS scalars.
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from scratchlab.doctor.findings import Finding, make_finding, sig
from scratchlab.doctor.leaks import check_batch_leak, check_causal_leak
from scratchlab.doctor.preflight import GRAD_OUTLIER_RATIO, NONFINITE, Check, StepReport
from scratchlab.families.cascade.data import make_pairs, window_of

SCALAR_NUMEL = 8  # preflight judges gradient outliers among parameters with fewer values than this


class WindowForward(nn.Module):
    """model(frames [B, T + h, F]) -> predictions [B, T, F], through `make_pairs`: what preflight perturbs.

    Perturbing frame j of the window changes the input at j and the context at j (context[t] =
    target[t - h] = frame[t]); a causal model's outputs before j stay exactly the same. A model fed
    the current target (context[t] = target[t] = frame[t + h]) changes its output at j - h: a leak.
    """

    def __init__(self, model: nn.Module, horizon: int) -> None:
        super().__init__()
        self.model, self.horizon = model, horizon

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        pairs = make_pairs(frames, self.horizon)
        return self.model(pairs["inputs"], pairs["context"])


def check_scalar_outliers(report: StepReport) -> list[Finding]:
    """grad_outlier among scalar-like parameters (< SCALAR_NUMEL values) against the median of all.

    The field notes' failure is learnable scalars (their gradient sums over every output value).
    Measured at init on cascade-tiny: the last stage's head and input projection reach ~400x and
    ~200x the median per-element gradient RMS (dense regression layers behind the RMS rescale; the
    run trains fine), while a learnable log-gain reaches ~750x: so only scalars are judged here.
    """
    live = [p for p in report.params if p.grad == "ok"]
    if len(live) < 3:
        return []
    median = statistics.median(p.grad_norm / math.sqrt(p.numel) for p in live)
    rows = sorted(((p.grad_norm / math.sqrt(p.numel) / median, p) for p in live
                   if p.numel < SCALAR_NUMEL and median > 0), key=lambda r: -r[0])
    rows = [(ratio, p) for ratio, p in rows if ratio >= GRAD_OUTLIER_RATIO]
    if not rows:
        return []
    top = [dict(name=p.name, numel=p.numel, grad_rms=sig(p.grad_norm / math.sqrt(p.numel)),
                rms_ratio=sig(ratio)) for ratio, p in rows[:5]]
    return [make_finding("grad_outlier", f"'{top[0]['name']}' gets gradients {rows[0][0]:.0f}x the median "
                         "parameter's: fix that scale instead of learning it (model.cascade.rms_scaling=fixed), "
                         "or keep its own lower LR and clip (model.cascade.scale_lr_mult, scale_max_norm)",
                         top=top, count=len(rows), median_grad_rms=sig(median),
                         threshold=GRAD_OUTLIER_RATIO, scalar_numel_below=SCALAR_NUMEL)]


def preflight_checks(horizon: int) -> tuple[Check, ...]:
    """The cascade's preflight, in order: the two leak checks on frames, then one backward of the family loss."""

    def on_frames(check):
        return lambda s: check(WindowForward(s.probe, horizon), {"input_ids": window_of(s.batch, horizon).float()})

    return (
        Check("causal_leak", on_frames(check_causal_leak), ("probe",)),
        Check("batch_leak", on_frames(check_batch_leak), ("probe",)),
        NONFINITE,
        Check("grad_outlier", lambda s: check_scalar_outliers(s.report), ("report", "finite")),
    )

