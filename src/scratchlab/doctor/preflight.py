"""Preflight: checks on a model and one real batch before step 0, each a silent bug from the field notes.

    from scratchlab.doctor.preflight import preflight
    findings = preflight(model, batch, special_token_ids=(pad_id,), dataset=train_set, overfit_steps=100)

The model can be any ``nn.Module`` whose ``forward(input_ids)`` takes integer ids [B, T] (text) or
[B, T, K] (K codebooks) and returns logits [B, T, V] / [B, T, K, V], or an object with ``.logits``.
The leak checks (`check_causal_leak`, `check_batch_leak`) also take continuous frames: float
``input_ids`` [B, T, F] and outputs [B, T', F'] on the same time axis (T' <= T); a perturbed frame
is the frame plus Gaussian noise of the batch's per-feature std.
``batch`` is ``{"input_ids", "labels"}`` (labels -100 = ignored), plus any tensors the loss needs;
``dataset`` is an optional map-style Dataset of such dicts (one sample each, no batch dim), the TRAINING
set. Items may carry ``window_start`` (int), ``clip_len`` (tokens/frames in the source clip) and
``crop_len`` (how many of them one window covers): with them the crop check is precise (it knows how
many windows a clip holds); without them it can only compare repeated draws.

The loss: ``loss=fn`` with ``fn(model, batch)`` returning ``.loss`` (the figure), ``.objective`` (what is
back-propagated) and ``.outputs`` (logits or predictions); a scratchlab family passes its ``Task.loss``,
so preflight trains exactly what training trains. The default, `token_cross_entropy`, is token
cross-entropy of ``model(input_ids)`` over ``labels``. The leak checks perturb ``model(input_ids)``.

Checks are units (`Check`: a name, a function of the `Subject`, what it needs); ``checks=`` picks and
orders them (default `PREFLIGHT_CHECKS`, every one below). The leak checks live in doctor/leaks.py, the
dataset checks in doctor/data_checks.py, how a check runs a model (outputs, seeded forwards, RNG
preservation) in doctor/forward.py; the batch and gradient checks and the units are here. A family composes its list from these units
and its own (families/*/task.py ``preflight``; the cascade's in families/cascade/checks.py).

Ground rules:
- The checks run on ONE deepcopy of the model, in fp32 (memory: one more copy of the model; two for a
  moment when a zero-gradient parameter is re-checked, or a float64 one when a leak is re-measured):
  the caller's model, its parameters, grads, train/eval mode and BatchNorm statistics, and the global RNGs (torch, numpy, random) are unchanged.
  Drawing dataset items does advance a dataset's own generator, as any access would.
- Each check runs under its own try/except; one that cannot run gives an ``info`` finding
  ``check_failed`` naming the check and the exception, never a crash.
- Cost is bounded: the perturbation checks use 2 samples, the gradient checks 4, the overfit check 4.

Checks and thresholds (why):
- causal_leak: replace the tokens at time j (all codebooks; by other ids of the batch, so valid ones)
  and compare outputs at t < j, for j in {1, T//2, T-1}, one forward per sample (a dependency on the
  other samples is batch_leak's), in train mode (same seed before every forward,
  so dropout masks are identical and BatchNorm uses batch statistics) and in eval mode. A leak is a change above 1e-6 x max|logit|: a
  causal model gives exactly 0 (masked scores contribute exact zeros; matmuls are row-independent), fp32
  round-off would be ~1e-7, and the weakest real leak we know (softmax over the query axis: one query
  among T) moves logits by ~5e-5 of their scale at T = 32. Kernels that pick their reduction order by
  shape break "exactly 0" (an MoE's expert matmuls change shape when one token's routing changes; on a
  GPU with TF32/bf16 kernels the difference is ~1e-3): a change found is therefore re-measured on a
  float64 copy of the model (autocast off, `leaks.confirmed`), where round-off is ~1e-16 and decides.
- batch_leak: replace every token of sample 1 and compare sample 0's output, then the other way round
  (same tolerance, same float64 confirmation). A dependency that the model declares
  (a module with ``batch_coupling``, a reason, and ``uncoupled()``: MoE capacity dropping) and that
  vanishes with it turned off is a warning; any other is an error.
- labels_not_shifted / labels_misaligned: the fraction of targets equal to ``input_ids`` shifted by
  d in -4..4 (ignored targets excluded). Healthy is d=+1 matching all targets. A finding needs another d
  to explain at least half the targets and clearly better than d=+1 (see `check_label_shift`), so
  random tokens (match ~1/V) and repetitive data (silence codes) stay silent.
- init_loss_high: loss > ln V + max(1, 0.5 ln V). Random logits of std s give ~ln V + s^2/2, so this
  is a logit std above ~2 (V = 64) to ~3 (V = 4096): the first steps are spent shrinking logits.
  scratchlab's lm (std 0.02 init) starts within 0.1 nat of ln V.
- nonfinite: NaN/Inf in a weight, NaN/+Inf in the logits (-Inf is a legitimate mask), or a
  non-finite loss or gradient after one backward; the evidence names the first offender.
- special_tokens_in_loss: any id of ``special_token_ids`` among the non-ignored labels of the batch.
- dead_params: trainable parameters whose gradient is None (off the loss path) or exactly zero and
  still zero after one Adam step (so zero-initialised output layers and ReZero-style gates are fine).
- grad_outlier: per-element gradient RMS >= 100x the median over parameters, or grad-norm /
  weight-norm >= 1000x the median of that ratio. Measured on healthy models at init: RMS ratios up to
  7-35x (scratchlab's lm, several sizes and inits) and ~10x (GPT-2 style); grad/weight ratios up to
  ~95x (an untied 0.02-std embedding next to Xavier matrices), hence the higher bar there: weights
  legitimately differ in scale. A learnable log-scale on the logits measures ~200-450x at init
  (growing with width); the field notes saw 100-10,000x during training.
- cannot_overfit (overfit_steps > 0): Adam (lr 1e-3) on 4 samples; it passes as soon as the loss is below
  50% of the starting loss. A model that ignores its input can only reach the unigram entropy of the
  targets (~70-95% of ln V on text or random tokens); one whose gradients do not reach the weights
  does not move.
- deterministic_windows (this and the next two: the dataset checks, doctor/data_checks.py): see
  `check_deterministic_windows` (judged on what a training set returns, not on the crop it declares;
  evaluation sets and pre-cut sequences stay silent).
- vocab_coverage_low (info): distinct target ids / V < 0.5, judged only when the scan is conclusive
  (the whole dataset, or at least 10 x V targets: a small sample of a Zipfian vocabulary under-covers).
- data_too_small: len(dataset) x targets per sample < 0.1 x trainable parameters (compute-optimal is
  ~20 tokens per parameter; below 0.1 the model can only memorise).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import scratchlab.doctor.catalog  # noqa: F401  (registers the codes)
from scratchlab.doctor.data_checks import (
    DataScan,
    check_data_size,
    check_deterministic_windows,
    check_vocab_coverage,
    scan_dataset,
)
from scratchlab.doctor.findings import Finding, make_finding, sig
from scratchlab.doctor.forward import LossFn, model_device, model_outputs, preserved_rng, seeded_loss
from scratchlab.doctor.leaks import check_batch_leak, check_causal_leak
from scratchlab.loss import IGNORE_INDEX, token_loss

_sig = sig  # evidence numbers: a few significant digits (doctor.findings.sig)

GRAD_SAMPLES = 4  # samples used by the one-backward checks
OVERFIT_SAMPLES = 4
LABEL_OFFSETS = range(-4, 5)
LABEL_MIN_TARGETS = 8  # fewer compared targets than this: no verdict on the label shift
INIT_LOSS_MARGIN = (1.0, 0.5)  # loss > ln V + max(1, 0.5 ln V)
GRAD_OUTLIER_RATIO = 100.0  # per-element grad RMS vs the median
GRAD_TO_WEIGHT_RATIO = 1000.0  # grad/weight norm vs the median: weights legitimately differ in scale
OVERFIT_LR = 1e-3
OVERFIT_TARGET = 0.5  # final loss must fall below this fraction of the starting loss


# ---------------------------------------------------------------- helpers


def check_failed(check: str, exc: BaseException) -> Finding:
    text = " ".join(str(exc).split())[:300]
    return make_finding("check_failed", f"preflight check '{check}' could not run: {type(exc).__name__}: {text}",
                        check=check, exception=type(exc).__name__, error=text)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights appear once


def _targets(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = batch["input_ids"], batch["labels"]
    if labels.shape != ids.shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} for input_ids of shape {tuple(ids.shape)}")
    return ids, labels


def _checked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """token_loss, after checking the labels against V (an out-of-range id is a device assert on CUDA)."""
    kept = labels[labels != IGNORE_INDEX]
    if kept.numel() == 0:
        raise ValueError("every label is -100: no target to compute a loss on")
    if int(kept.min()) < 0 or int(kept.max()) >= logits.shape[-1]:
        raise ValueError(f"label ids span [{int(kept.min())}, {int(kept.max())}] but the logits have "
                         f"V={logits.shape[-1]}")
    return token_loss(logits, labels)


# ---------------------------------------------------------------- the loss the checks train with


@dataclass
class PreflightLoss:
    """What a preflight loss function returns: the fields of ``families.base.LossOutput`` the checks read
    (a family's ``Task.loss`` result works as it is)."""

    loss: torch.Tensor  # the figure: init_loss_high and cannot_overfit judge it
    objective: torch.Tensor  # what is back-propagated (the loss plus auxiliary terms such as z-loss)
    outputs: torch.Tensor  # logits [..., V] (V = their last dim) or continuous predictions


def token_cross_entropy(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> PreflightLoss:
    """The default loss of any model: token cross-entropy of ``model(input_ids)`` over ``labels`` (-100 ignored).

    The label ids are checked against V first (an out-of-range id is a device assert on CUDA). A model family
    passes its own loss instead (scratchlab's: ``Task.loss``), so preflight trains what training trains.
    """
    ids, labels = _targets(batch)
    logits = model_outputs(model, ids)
    loss = _checked_loss(logits, labels)
    return PreflightLoss(loss=loss, objective=loss, outputs=logits)


def _head(batch: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` samples of every tensor of the batch (the batch dimension is dim 0)."""
    return {k: v[:n] if torch.is_tensor(v) and v.ndim else v for k, v in batch.items()}


# ---------------------------------------------------------------- the batch alone


def check_label_shift(batch: Mapping[str, torch.Tensor]) -> list[Finding]:
    """labels_not_shifted / labels_misaligned: which shift d of the inputs do the labels follow?

    match(d) = fraction of non-ignored targets t with labels[t] == input_ids[t + d] (time axis 1, every
    codebook). Healthy: match(+1) == 1. A finding needs d != +1 with match(d) >= 0.5 that beats +1
    clearly: match(d) >= 0.99 > match(+1) (an exact shift), or match(d) >= match(+1) + 0.25.
    """
    ids, labels = _targets(batch)
    T = ids.shape[1]
    match: dict[int, tuple[float, int]] = {}
    for d in LABEL_OFFSETS:
        if abs(d) >= T:
            continue
        lab = labels[:, : T - d] if d >= 0 else labels[:, -d:]
        src = ids[:, d:] if d >= 0 else ids[:, : T + d]
        kept = lab != IGNORE_INDEX
        n = int(kept.sum())
        if n >= LABEL_MIN_TARGETS:
            match[d] = (int(((lab == src) & kept).sum()) / n, n)
    if not match:
        return []
    next_token = match.get(1, (0.0, 0))[0]
    best = max((d for d in match if d != 1), key=lambda d: (match[d][0], -abs(d)), default=None)
    if best is None:
        return []
    frac, n = match[best]
    if frac < 0.5 or not (frac >= 0.99 > next_token or frac >= next_token + 0.25):
        return []
    evidence = dict(offset=best, match_fraction=_sig(frac), next_token_match_fraction=_sig(next_token),
                    targets_compared=n, match_by_offset={str(d): _sig(m) for d, (m, _) in match.items()})
    if best == 0:
        return [make_finding("labels_not_shifted", f"labels equal input_ids at {frac:.0%} of targets: the model "
                             "learns to copy; make labels the next token (labels[:, t] = tokens[t+1])", **evidence)]
    return [make_finding("labels_misaligned", f"labels equal input_ids shifted by {best:+d} (not +1) at {frac:.0%} "
                         "of targets; slice one window: inputs = w[:-1], labels = w[1:]", **evidence)]


def check_special_tokens(batch: Mapping[str, torch.Tensor], special_token_ids: Sequence[int]) -> list[Finding]:
    """special_tokens_in_loss: special ids that are non-ignored targets of the batch."""
    if not special_token_ids:
        return []
    labels = batch["labels"]
    kept = labels != IGNORE_INDEX
    counts: dict[str, int] = {}
    first: list[int] | None = None
    for sid in special_token_ids:
        hits = kept & (labels == int(sid))
        n = int(hits.sum())
        if n:
            counts[str(int(sid))] = n
            pos = hits.nonzero()[0].tolist()
            first = pos if first is None or pos < first else first
    if not counts:
        return []
    total = sum(counts.values())
    frac = total / max(int(kept.sum()), 1)
    return [make_finding("special_tokens_in_loss", f"special token id(s) {', '.join(counts)} are unmasked targets "
                         f"{total} times ({frac:.1%} of targets); set their labels to -100 in the data layer",
                         ids=[int(i) for i in counts], counts=counts, fraction=_sig(frac), first_position=first)]


# ---------------------------------------------------------------- one forward + backward


@dataclass
class ParamGrad:
    name: str
    numel: int
    weight_norm: float
    weight_finite: bool
    grad: str  # "frozen" (requires_grad=False), "none" (no gradient), "zero", "ok" or "nonfinite"
    grad_norm: float


@dataclass
class StepReport:
    """What one training-mode forward + backward on the batch showed (no tensors kept)."""

    loss: float
    vocab_size: int
    logit_std: float
    logits_nan: int
    logits_posinf: int
    logits_neginf: int
    first_bad_logit: list[int] | None
    loss_has_grad: bool
    params: list[ParamGrad]
    neg_inf_bad: bool = False  # -inf is a legitimate mask in logits, not in continuous predictions


def _param_grad(name: str, p: nn.Parameter, trainable: bool) -> ParamGrad:
    finite = bool(p.isfinite().all())
    if not trainable:
        state, norm = "frozen", 0.0
    elif p.grad is None:
        state, norm = "none", 0.0
    elif not bool(p.grad.isfinite().all()):
        state, norm = "nonfinite", math.nan
    else:
        norm = float(p.grad.float().norm())
        state = "ok" if norm > 0 else "zero"
    return ParamGrad(name, p.numel(), float(p.float().norm()) if finite else math.nan, finite, state, norm)


def gradient_step(model: nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: LossFn = token_cross_entropy,
                  *, neg_inf_bad: bool = False) -> StepReport:
    """Loss, output statistics and per-parameter gradient statistics of one backward (of the objective) in
    train mode. ``neg_inf_bad``: -inf outputs count as non-finite (continuous predictions; in logits it is a mask)."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = seeded_loss(loss_fn, model, _head(batch, GRAD_SAMPLES))
    loss, objective = out.loss, out.objective
    if objective.requires_grad:
        objective.backward()
    logits = out.outputs.detach().float()
    with torch.no_grad():
        bad = logits.isnan() | (logits.isinf() if neg_inf_bad else logits == math.inf)
        finite = logits[logits.isfinite()]
        trainable = {id(p) for _, p in _trainable(model)}
        params = [_param_grad(name, p, id(p) in trainable) for name, p in model.named_parameters()]
        report = StepReport(
            loss=float(loss.detach()), vocab_size=int(logits.shape[-1]),
            logit_std=float(finite.std()) if finite.numel() > 1 else math.nan,
            logits_nan=int(logits.isnan().sum()), logits_posinf=int((logits == math.inf).sum()),
            logits_neginf=int((logits == -math.inf).sum()),
            first_bad_logit=bad.nonzero()[0].tolist()[:-1] if bool(bad.any()) else None,
            loss_has_grad=objective.requires_grad, params=params, neg_inf_bad=neg_inf_bad)
    model.zero_grad(set_to_none=True)
    return report


def check_nonfinite(report: StepReport) -> list[Finding]:
    """nonfinite: NaN/Inf in a weight, the logits (NaN/+Inf), the loss or a gradient; first offender named."""
    bad_weights = [p.name for p in report.params if not p.weight_finite]
    bad_grads = [p.name for p in report.params if p.grad == "nonfinite"]
    bad_logits = report.logits_nan + report.logits_posinf + (report.logits_neginf if report.neg_inf_bad else 0)
    bad_loss = not math.isfinite(report.loss)
    if not (bad_weights or bad_grads or bad_logits or bad_loss):
        return []
    if bad_weights:
        kind, tensor, where = "weight", bad_weights[0], f"the weight '{bad_weights[0]}' (its init or checkpoint)"
    elif bad_logits:
        kind, tensor, where = "logits", "logits", "the logits"
    elif bad_loss:
        neg = f" ({report.logits_neginf} logits are -inf)" if report.logits_neginf else ""
        kind, tensor, where = "loss", "loss", f"the loss = {report.loss}{neg}"
    else:
        kind, tensor, where = "grad", bad_grads[0], f"the gradient of '{bad_grads[0]}'"
    return [make_finding("nonfinite", f"NaN/Inf before any update, first in {where}: look for a log or division "
                         "of zero, an overflow, or a bad init",
                         tensor=tensor, kind=kind, loss=_sig(report.loss), nonfinite_weights=bad_weights[:10],
                         nonfinite_grads=bad_grads[:10], nonfinite_grad_count=len(bad_grads),
                         logits_nan=report.logits_nan, logits_posinf=report.logits_posinf,
                         logits_neginf=report.logits_neginf, first_bad_logit=report.first_bad_logit)]


def check_init_loss(report: StepReport) -> list[Finding]:
    """init_loss_high: the loss at initialisation far above ln V (the loss of uniform predictions)."""
    ln_v = math.log(report.vocab_size)
    threshold = ln_v + max(INIT_LOSS_MARGIN[0], INIT_LOSS_MARGIN[1] * ln_v)
    if not math.isfinite(report.loss) or report.loss <= threshold:
        return []
    return [make_finding("init_loss_high", f"initial loss {report.loss:.2f} is far above ln(V) = {ln_v:.2f} "
                         f"(logit std {report.logit_std:.2f}): shrink the output logits at init",
                         loss=_sig(report.loss), ln_vocab=_sig(ln_v), threshold=_sig(threshold),
                         excess=_sig(report.loss - ln_v), logit_std=_sig(report.logit_std),
                         vocab_size=report.vocab_size)]


def _still_dead(model: nn.Module, batch: Mapping[str, torch.Tensor], names: set[str], loss_fn: LossFn) -> set[str]:
    """Of ``names`` (zero gradient at init), those whose gradient is still zero after one Adam step.

    A zero-initialised output layer or gate blocks the gradient only at step 0; one step opens it.
    """
    trial = copy.deepcopy(model)
    params = [p for _, p in _trainable(trial)]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    batch = _head(batch, GRAD_SAMPLES)
    trial.train()
    for step in range(2):  # a step, then the gradients after it
        optimizer.zero_grad(set_to_none=True)
        seeded_loss(loss_fn, trial, batch).objective.backward()
        if step == 0:
            optimizer.step()
    dead = {n for n, p in _trainable(trial) if n in names and (p.grad is None or not bool(p.grad.any()))}
    del trial
    return dead


def check_dead_params(model: nn.Module, batch: Mapping[str, torch.Tensor], report: StepReport,
                      loss_fn: LossFn = token_cross_entropy) -> list[Finding]:
    """dead_params: trainable parameters the loss does not reach (no gradient, or zero even after a step)."""
    no_grad = [p.name for p in report.params if p.grad == "none"]
    zero = [p.name for p in report.params if p.grad == "zero"]
    if zero and report.loss_has_grad:
        still = _still_dead(model, batch, set(zero), loss_fn)
        zero = [n for n in zero if n in still]
    dead = no_grad + zero
    if not dead:
        return []
    sizes = {p.name: p.numel for p in report.params}
    trainable = sum(p.numel for p in report.params if p.grad != "frozen")
    numel = sum(sizes[n] for n in dead)
    why = "the loss has no gradient path (a detach?)" if not report.loss_has_grad else "no gradient reaches them"
    return [make_finding("dead_params", f"{len(dead)} trainable parameter tensors ({numel:,} values, first "
                         f"'{dead[0]}') get no gradient, {why}: wire them in, remove or freeze them",
                         names=dead[:10], count=len(dead), numel=numel, fraction=_sig(numel / max(trainable, 1)),
                         no_grad=no_grad[:10], zero_grad=zero[:10], loss_has_grad=report.loss_has_grad)]


def check_grad_outlier(report: StepReport) -> list[Finding]:
    """grad_outlier: per-element grad RMS >= 100x, or grad/weight norm >= 1000x, the median over parameters."""
    live = [p for p in report.params if p.grad == "ok"]
    if len(live) < 3:  # no population to compare against
        return []
    rms = {p.name: p.grad_norm / math.sqrt(p.numel) for p in live}
    rel = {p.name: p.grad_norm / p.weight_norm for p in live if p.weight_norm > 0}
    median_rms = statistics.median(rms.values())
    median_rel = statistics.median(rel.values()) if len(rel) >= 3 else math.nan
    rows = []
    for p in live:
        rms_ratio = rms[p.name] / median_rms
        rel_ratio = rel[p.name] / median_rel if p.name in rel and median_rel > 0 else 0.0  # 0: no weight scale
        if rms_ratio >= GRAD_OUTLIER_RATIO or rel_ratio >= GRAD_TO_WEIGHT_RATIO:
            rows.append(dict(name=p.name, numel=p.numel, grad_rms=_sig(rms[p.name]), rms_ratio=_sig(rms_ratio),
                             grad_to_weight=_sig(rel.get(p.name, 0.0)), grad_to_weight_ratio=_sig(rel_ratio)))
    if not rows:
        return []
    rows.sort(key=lambda r: -max(r["rms_ratio"], r["grad_to_weight_ratio"]))
    top = rows[0]
    biggest = max(top["rms_ratio"], top["grad_to_weight_ratio"])
    return [make_finding("grad_outlier", f"'{top['name']}' gets gradients {biggest:.0f}x the median parameter's: "
                         "fix that scale instead of learning it, or give it its own lower LR",
                         top=rows[:5], count=len(rows), median_grad_rms=_sig(median_rms),
                         median_grad_to_weight=_sig(median_rel), threshold=GRAD_OUTLIER_RATIO,
                         grad_to_weight_threshold=GRAD_TO_WEIGHT_RATIO)]


# ---------------------------------------------------------------- overfit one batch


def check_overfit(model: nn.Module, batch: Mapping[str, torch.Tensor], steps: int,
                  loss_fn: LossFn = token_cross_entropy) -> list[Finding]:
    """cannot_overfit: Adam on a few samples must bring the loss below half of where it started."""
    batch = _head(batch, OVERFIT_SAMPLES)
    samples = int(next(v for v in batch.values() if torch.is_tensor(v) and v.ndim).shape[0])
    model.train()
    params = [p for _, p in _trainable(model)]
    optimizer = torch.optim.Adam(params, lr=OVERFIT_LR) if params else None
    losses: list[float] = []

    def failed(reason: str, end: float) -> list[Finding]:
        start = losses[0] if losses else end
        return [make_finding("cannot_overfit", f"{reason}: loss {start:.3f} -> {end:.3f} in {max(len(losses), 1) - 1} "
                             f"Adam steps on {samples} samples; check labels, the loss mask and the grad path",
                             start_loss=_sig(start), end_loss=_sig(end), min_loss=_sig(min(losses, default=end)),
                             steps=max(len(losses), 1) - 1, lr=OVERFIT_LR, target_fraction=OVERFIT_TARGET,
                             samples=samples, reason=reason)]

    for step in range(steps + 1):  # steps updates, then the loss after the last one
        out = loss_fn(model, batch)
        value = float(out.loss.detach())
        if not math.isfinite(value):
            return failed(f"the loss became non-finite at step {step}", value)
        losses.append(value)
        if step and value < OVERFIT_TARGET * losses[0]:
            return []
        if optimizer is None or not out.objective.requires_grad:
            return failed("no gradient reaches the weights" if optimizer else "no trainable parameters", value)
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        out.objective.backward()
        optimizer.step()
    return failed(f"the loss did not fall below {OVERFIT_TARGET:.0%} of its start", losses[-1])


# ---------------------------------------------------------------- all together: checks as units


class Subject:
    """What the checks look at: the caller's model and batch, and what is computed from them once, on first use.

    ``probe`` is the fp32 deepcopy the model checks run on (they may train it); ``report`` is one
    `gradient_step` of ``loss`` on it; ``scan`` is `scan_dataset` of ``dataset``. A part that cannot be
    computed adds one ``check_failed`` finding (``copy_model``, ``gradients``, ``data_scan``) and the checks
    that need it are skipped.
    """

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor], *, loss: LossFn,
                 special_token_ids: Sequence[int], dataset: Any, overfit_steps: int, neg_inf_bad: bool,
                 findings: list[Finding]) -> None:
        self.model, self.batch, self.loss = model, batch, loss
        self.special_token_ids, self.dataset, self.overfit_steps = special_token_ids, dataset, overfit_steps
        self.neg_inf_bad = neg_inf_bad
        self._findings = findings
        self._made: dict[str, Any] = {}

    def _part(self, name: str, failed_as: str, make: Callable[[], Any]) -> Any:
        if name not in self._made:
            try:
                self._made[name] = make()
            except Exception as exc:  # one check_failed for the part; the checks that need it are skipped
                self._made[name] = None
                self._findings.append(check_failed(failed_as, exc))
        return self._made[name]

    @property
    def probe(self) -> nn.Module | None:
        def copy_model() -> nn.Module:
            probe = copy.deepcopy(self.model).float()
            for p in probe.parameters():
                p.grad = None
            return probe
        return self._part("probe", "copy_model", copy_model)

    @property
    def report(self) -> StepReport | None:
        probe = self.probe
        if probe is None:
            return None
        return self._part("report", "gradients",
                          lambda: gradient_step(probe, self.batch, self.loss, neg_inf_bad=self.neg_inf_bad))

    @property
    def scan(self) -> DataScan | None:
        if self.dataset is None:
            return None
        report = self._made.get("report")  # the vocabulary size, when the gradient step ran already
        return self._part("scan", "data_scan", lambda: scan_dataset(self.dataset, report.vocab_size if report else None))

    @property
    def finite(self) -> bool:
        """The gradient step ran and showed no NaN/Inf: with NaN about, the other numbers mean nothing."""
        report = self.report
        return report is not None and not check_nonfinite(report)

    def ready(self, needs: Sequence[str]) -> bool:
        """Whether every part in ``needs`` exists (computing it now if needed), in order."""
        for need in needs:
            if need == "dataset" and self.dataset is None:
                return False
            if need in ("probe", "report", "scan") and getattr(self, need) is None:
                return False
            if need == "finite" and not self.finite:
                return False
            if need == "overfit" and self.overfit_steps <= 0:
                return False
        return True

    def release(self) -> None:
        """Drop the model copy (memory: one more copy of the model) once the model checks are done."""
        self._made.pop("probe", None)


@dataclass(frozen=True)
class Check:
    """One preflight check: ``run(subject)`` returns its findings; ``name`` is what check_failed reports.

    ``needs`` (in order): ``probe`` (the fp32 model copy), ``report`` (one gradient step), ``finite`` (that
    step showed no NaN/Inf), ``overfit`` (overfit_steps > 0), ``dataset``, ``scan`` (the dataset scan). A
    family composes its list from these units and its own (families/*/task.py ``preflight``).
    """

    name: str
    run: Callable[[Subject], list[Finding]]
    needs: tuple[str, ...] = ()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for _, p in _trainable(model))


LABEL_SHIFT = Check("labels_shift", lambda s: check_label_shift(s.batch))
SPECIAL_TOKENS = Check("special_tokens_in_loss", lambda s: check_special_tokens(s.batch, s.special_token_ids))
CAUSAL_LEAK = Check("causal_leak", lambda s: check_causal_leak(s.probe, s.batch), ("probe",))
BATCH_LEAK = Check("batch_leak", lambda s: check_batch_leak(s.probe, s.batch), ("probe",))
NONFINITE = Check("nonfinite", lambda s: check_nonfinite(s.report), ("report",))
INIT_LOSS = Check("init_loss_high", lambda s: check_init_loss(s.report), ("report", "finite"))
DEAD_PARAMS = Check("dead_params", lambda s: check_dead_params(s.probe, s.batch, s.report, s.loss), ("report", "finite"))
GRAD_OUTLIER = Check("grad_outlier", lambda s: check_grad_outlier(s.report), ("report", "finite"))
OVERFIT = Check("cannot_overfit", lambda s: check_overfit(s.probe, s.batch, s.overfit_steps, s.loss),
                ("overfit", "probe"))  # the last model check: it trains the copy
WINDOWS = Check("deterministic_windows", lambda s: check_deterministic_windows(s.dataset), ("dataset",))
VOCAB_COVERAGE = Check("vocab_coverage_low", lambda s: check_vocab_coverage(s.scan, s.report.vocab_size),
                       ("scan", "report"))
DATA_SIZE = Check("data_too_small", lambda s: check_data_size(s.scan, _n_params(s.model)), ("scan",))

MODEL_CHECKS = (CAUSAL_LEAK, BATCH_LEAK, NONFINITE, INIT_LOSS, DEAD_PARAMS, GRAD_OUTLIER, OVERFIT)
DATA_CHECKS = (WINDOWS, VOCAB_COVERAGE, DATA_SIZE)
PREFLIGHT_CHECKS = (LABEL_SHIFT, SPECIAL_TOKENS, *MODEL_CHECKS, *DATA_CHECKS)


def preflight(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    loss: LossFn | None = None,
    special_token_ids: Sequence[int] = (),
    dataset: Any = None,
    overfit_steps: int = 0,
    checks: Sequence[Check] = PREFLIGHT_CHECKS,
    neg_inf_bad: bool = False,
) -> list[Finding]:
    """Run ``checks`` (default: every check) on ``model`` (a deepcopy of it) and ``batch``; see the module docstring.

    ``loss(model, batch)`` is the loss the gradient and overfit checks train with; the default is token
    cross-entropy of ``model(input_ids)`` over ``labels`` (`token_cross_entropy`), right for any model whose
    forward takes the ids. A model family passes its own (its ``Task.loss``: codebook weights, z-loss, ...),
    and every tensor of ``batch`` reaches it (cut to the first few samples).
    """
    findings: list[Finding] = []
    first = batch["input_ids"] if isinstance(batch, Mapping) and "input_ids" in batch else None
    device = model_device(model, first.device if torch.is_tensor(first) else torch.device("cpu"))
    with preserved_rng(device):
        try:
            batch = {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
            for key in ("input_ids", "labels"):
                if key in batch and not batch[key].is_floating_point():
                    batch[key] = batch[key].long()
        except Exception as exc:
            return [check_failed("batch", exc)]
        subject = Subject(model, batch, loss=loss or token_cross_entropy, special_token_ids=special_token_ids,
                          dataset=dataset, overfit_steps=overfit_steps, neg_inf_bad=neg_inf_bad, findings=findings)
        model_done = max((i for i, c in enumerate(checks) if {"probe", "report", "finite"} & set(c.needs)), default=-1)
        for i, check in enumerate(checks):
            if subject.ready(check.needs):
                try:
                    findings.extend(check.run(subject))
                except Exception as exc:  # a check that cannot run must not stop the others
                    findings.append(check_failed(check.name, exc))
            if i == model_done:
                subject.release()
    return findings
