"""Preflight: checks on a model and one real batch before step 0, each a silent bug from the field notes.

    from scratchlab.doctor.preflight import preflight
    findings = preflight(model, batch, special_token_ids=(pad_id,), dataset=train_set, overfit_steps=100)

The model can be any ``nn.Module`` whose ``forward(input_ids)`` takes integer ids [B, T] (text) or
[B, T, K] (K codebooks) and returns logits [B, T, V] / [B, T, K, V], or an object with ``.logits``.
The leak checks (`check_causal_leak`, `check_batch_leak`) also take continuous frames: float
``input_ids`` [B, T, F] and outputs [B, T', F'] on the same time axis (T' <= T); a perturbed frame
is the frame plus Gaussian noise of the batch's per-feature std.
``batch`` is ``{"input_ids", "labels"}`` (labels -100 = ignored); ``dataset`` is an optional map-style
Dataset of such dicts (one sample each, no batch dim). Items may carry ``window_start`` (int) and
``clip_len`` (tokens/frames in the source clip): with them the crop check is precise (it knows how many
windows a clip holds); without them it can only compare repeated draws.

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
  float64 copy of the model (autocast off, `_confirmed`), where round-off is ~1e-16 and decides.
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
- deterministic_windows: see `check_deterministic_windows` (no false positives on fixed datasets).
- vocab_coverage_low (info): distinct target ids / V < 0.5, judged only when the scan is conclusive
  (the whole dataset, or at least 10 x V targets: a small sample of a Zipfian vocabulary under-covers).
- data_too_small: len(dataset) x targets per sample < 0.1 x trainable parameters (compute-optimal is
  ~20 tokens per parameter; below 0.1 the model can only memorise).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import scratchlab.doctor.catalog  # noqa: F401  (registers the codes)
from scratchlab.doctor.findings import Finding, make_finding
from scratchlab.loss import IGNORE_INDEX, token_loss

PERTURB_SAMPLES = 2  # samples used by the leak checks (one forward each per probe)
GRAD_SAMPLES = 4  # samples used by the one-backward checks
OVERFIT_SAMPLES = 4
LEAK_RTOL = 1e-6  # a leak changes outputs by more than this x max|logit| (causal models: exactly 0)
LABEL_OFFSETS = range(-4, 5)
LABEL_MIN_TARGETS = 8  # fewer compared targets than this: no verdict on the label shift
INIT_LOSS_MARGIN = (1.0, 0.5)  # loss > ln V + max(1, 0.5 ln V)
GRAD_OUTLIER_RATIO = 100.0  # per-element grad RMS vs the median
GRAD_TO_WEIGHT_RATIO = 1000.0  # grad/weight norm vs the median: weights legitimately differ in scale
OVERFIT_LR = 1e-3
OVERFIT_TARGET = 0.5  # final loss must fall below this fraction of the starting loss
WINDOW_INDICES, WINDOW_REPEATS = 4, 3
WINDOW_P_VALUE = 1e-3  # flag a constant crop only when a random crop would look so by chance < 0.1%
COVERAGE_MIN = 0.5
COVERAGE_TARGETS_PER_VOCAB = 10
SCAN_MAX_SAMPLES, SCAN_SECONDS = 512, 2.0
TOKENS_PER_PARAM_MIN = 0.1


# ---------------------------------------------------------------- helpers


def _forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` in fp32, unwrapping ``.logits`` / ``["logits"]`` / a tuple's first item."""
    out = model(ids)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if logits is None:
        logits = out
    if not torch.is_tensor(logits):
        raise TypeError(f"forward returned {type(out).__name__}; expected logits or an object with .logits")
    if ids.is_floating_point():  # continuous frames [B, T, F] -> outputs [B, T', F'] on the same time axis
        if logits.ndim != ids.ndim or logits.shape[0] != ids.shape[0]:
            raise ValueError(f"outputs of shape {tuple(logits.shape)} for continuous inputs of shape "
                             f"{tuple(ids.shape)}; expected [B, T, F] for [B, T, F]")
        return logits.float()
    if logits.ndim != ids.ndim + 1 or tuple(logits.shape[: ids.ndim]) != tuple(ids.shape):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for input_ids of shape {tuple(ids.shape)}; "
                         "expected [B, T, V] for [B, T] or [B, T, K, V] for [B, T, K]")
    return logits.float()


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Everything inside may draw random numbers; the caller's torch, numpy and random states come back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _seeded_forward(model: nn.Module, ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A forward with the same RNG state every time, so two forwards draw identical dropout masks."""
    with torch.random.fork_rng(devices=_rng_devices(ids.device)):
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: it would queue CUDA seeding
        if ids.device.type == "cuda":
            with torch.cuda.device(ids.device):
                torch.cuda.manual_seed(seed)
        return _forward(model, ids)


def _other_ids(x: torch.Tensor, pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (ids taken from ``pool``) with every id replaced by a DIFFERENT id that occurs in ``pool``.

    Ids seen in the batch are valid for the embedding; for codebooks ([..., K]) each codebook draws from
    its own ids, since codebooks may have vocabularies of different sizes.
    """
    if pool.is_floating_point():  # continuous frames: a different value, not an id
        return _other_frames(x, pool, generator)
    if pool.ndim == 3:
        return torch.stack([_other_ids(x[..., k], pool[..., k], generator) for k in range(pool.shape[-1])], dim=-1)
    values = pool.unique()  # sorted
    if values.numel() == 1:  # a single id in the batch: use its neighbour
        v = int(values[0])
        values = torch.tensor([v - 1, v] if v > 0 else [v, v + 1], dtype=pool.dtype, device=pool.device)
    where = torch.searchsorted(values, x.contiguous())
    shift = torch.randint(1, values.numel(), x.shape, generator=generator).to(x.device)
    return values[(where + shift) % values.numel()]


def _other_frames(x: torch.Tensor, pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Continuous ``x`` moved by Gaussian noise of the batch's per-feature std: a clearly different frame."""
    std = pool.float().reshape(-1, pool.shape[-1]).std(dim=0).clamp_min(1e-3)
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return (x.float() + noise * std).to(x.dtype)


def _abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| where NaN == NaN and inf == inf count as equal and NaN vs a number as infinitely different."""
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, torch.zeros_like(a), (a - b).abs()).nan_to_num(nan=math.inf)


def _scale(logits: torch.Tensor) -> float:
    finite = logits[logits.isfinite()]
    return max(float(finite.abs().max()), 1e-3) if finite.numel() else 1.0


def _sig(x: float, digits: int = 4) -> float | str:
    """A float rounded to a few significant digits for the evidence (JSON has no NaN/Inf: those as text)."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else str(x)


def _check_failed(check: str, exc: BaseException) -> Finding:
    text = " ".join(str(exc).split())[:300]
    return make_finding("check_failed", f"preflight check '{check}' could not run: {type(exc).__name__}: {text}",
                        check=check, exception=type(exc).__name__, error=text)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights appear once


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return fallback


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


# ---------------------------------------------------------------- perturbation checks


def _first_change(base: torch.Tensor, out: torch.Tensor, tol: float) -> tuple[int, float] | None:
    """(first time index, diff there) where ``out`` differs from ``base`` beyond tol; dims [B, T, ...]."""
    diff = _abs_diff(out, base).transpose(0, 1).flatten(1).amax(dim=1)  # [T]
    bad = (diff > tol).nonzero()
    return (int(bad[0]), float(diff[bad[0]])) if bad.numel() else None


def _confirmed(probe: Callable[[nn.Module, torch.Tensor], Any], model: nn.Module, ids: torch.Tensor) -> tuple[Any, str]:
    """``probe(model, ids)``; where it finds something, the same probe on a float64 copy decides.

    Two forwards of a healthy model can differ by round-off where kernels pick their reduction
    order by shape (an MoE's per-expert matmuls change shape when one token's routing changes;
    cuBLAS, TF32 and bf16 kernels are chosen by M), enough to pass the fp32 tolerance or to flip
    a top-k routing choice. In float64 (autocast off) that noise is ~1e-16 of the logits, 10^10
    below LEAK_RTOL, so only a real dependency remains. Healthy models usually differ by exactly 0
    and pay nothing; a model that cannot be copied or run in float64 keeps the first verdict.
    Returns (result, the precision that decided it).
    """
    found = probe(model, ids)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), ids.dtype)
    precision = str(dtype).removeprefix("torch.")
    if not found:
        return found, precision
    device = ids.device.type
    try:
        with torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext():
            copy64 = copy.deepcopy(model).to(torch.float64)
            return probe(copy64, ids.to(torch.float64) if ids.is_floating_point() else ids), "float64"
    except Exception:  # noqa: BLE001 - no float64 here (an op or a device without it, no memory): keep the verdict
        return found, precision


def _each_sample(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One forward per sample: what a sequence's outputs depend on within itself (batch effects are batch_leak's)."""
    return torch.cat([_seeded_forward(model, ids[s:s + 1]) for s in range(ids.shape[0])])


def _causal_changes(model: nn.Module, ids: torch.Tensor) -> list[tuple]:
    """(output_pos, input_pos, mode, diff, scale) per probed input position j whose change moves an output before j."""
    T = ids.shape[1]
    leaks = []
    for mode in ("train", "eval"):
        model.train(mode == "train")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            base = _each_sample(model, ids)
            scale = _scale(base)
            for j in _causal_probes(T):
                other = ids.clone()
                other[:, j] = _other_ids(ids[:, j], ids, generator)
                change = _first_change(base[:, :j], _each_sample(model, other)[:, :j], LEAK_RTOL * scale)
                if change is not None:
                    leaks.append((change[0], j, mode, change[1], scale))
    return leaks


def _causal_probes(T: int) -> list[int]:
    return sorted({T - 1, T // 2, 1} & set(range(1, T)))  # positions that have a past to leak into


def check_causal_leak(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[Finding]:
    """causal_leak: do outputs before time j change when the tokens at j change (each sample on its own)?"""
    ids = batch["input_ids"][:PERTURB_SAMPLES]
    leaks, precision = _confirmed(_causal_changes, model, ids)
    if not leaks:
        return []
    t, j, mode, diff, scale = min(leaks, key=lambda leak: (leak[0], leak[1]))
    modes = sorted({leak[2] for leak in leaks}, reverse=True)
    return [make_finding("causal_leak", f"the output at position {t} changes when the input at position {j} changes "
                         f"({' and '.join(modes)} mode): the model sees the future; check the causal mask and any "
                         "softmax, norm or pooling over time",
                         output_pos=t, input_pos=j, mode=mode, modes=modes, max_abs_diff=_sig(diff),
                         relative_diff=_sig(diff / scale), tolerance=LEAK_RTOL,
                         probed_input_positions=_causal_probes(ids.shape[1]), samples=int(ids.shape[0]),
                         precision=precision)]


def _batch_changes(model: nn.Module, ids: torch.Tensor) -> list[tuple]:
    """(mode, observed sample, perturbed sample, first position, diff, scale) for each mode where one sample's
    output changes when the other sample changes: sample 1 perturbed first, then sample 0."""
    other = _other_ids(ids, ids, torch.Generator().manual_seed(1))
    changes = []
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():
            base = _seeded_forward(model, ids)
            for perturbed, observed in ((1, 0), (0, 1)):
                changed = ids.clone()
                changed[perturbed] = other[perturbed]
                mine = slice(observed, observed + 1)
                scale = _scale(base[mine])
                change = _first_change(base[mine], _seeded_forward(model, changed)[mine], LEAK_RTOL * scale)
                if change is not None:
                    changes.append((mode, observed, perturbed, *change, scale))
                    break
    return changes


def _declared_couplings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that declare a batch dependency on purpose (``batch_coupling``: a reason, and ``uncoupled()``)."""
    return [(name, m) for name, m in model.named_modules()
            if getattr(m, "batch_coupling", None) and callable(getattr(m, "uncoupled", None))]


def _batch_verdict(model: nn.Module, ids: torch.Tensor) -> tuple[list[tuple], list[tuple] | None] | None:
    """None, or (changes, the changes left with every declared coupling turned off; None when none is declared)."""
    changes = _batch_changes(model, ids)
    if not changes:
        return None
    declared = _declared_couplings(model)
    if not declared:
        return changes, None
    with contextlib.ExitStack() as stack:
        for _, module in declared:
            stack.enter_context(module.uncoupled())
        return changes, _batch_changes(model, ids)


def check_batch_leak(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[Finding]:
    """batch_leak: does one sample's output change when the other sample changes (both ways)?

    A dependency that modules declare (``batch_coupling``, e.g. MoE capacity dropping) and that
    disappears with them turned off (``uncoupled()``) is a warning naming the reason; any other is an error.
    """
    ids = batch["input_ids"][:PERTURB_SAMPLES]
    if ids.shape[0] < 2:  # one sample: pair it with a shifted copy of itself
        ids = torch.cat([ids, ids.roll(1, dims=1)])
    verdict, precision = _confirmed(_batch_verdict, model, ids)
    if not verdict:
        return []
    changes, undeclared = verdict
    declared = _declared_couplings(model)
    severity, extra = None, {}
    if undeclared is not None and not undeclared:  # only the declared dependency: expected, but worth knowing
        reasons = "; ".join(sorted({module.batch_coupling for _, module in declared}))
        more = f" and {len(declared) - 1} more" if len(declared) > 1 else ""
        advice = f"expected from {reasons} ({declared[0][0]}{more}): outputs depend on the batch's other sequences"
        severity, extra = "warning", {"declared_by": [name for name, _ in declared]}
    else:
        changes = undeclared or changes
        advice = "normalise over features, never over the batch"
    mode, observed, perturbed, t, diff, scale = changes[0]
    modes = [c[0] for c in changes]
    return [make_finding("batch_leak", f"sample {observed}'s output (from position {t}) changes when sample "
                         f"{perturbed} changes ({' and '.join(modes)} mode): {advice}", severity=severity,
                         changed_sample=observed, perturbed_sample=perturbed, first_position=t, mode=mode, modes=modes,
                         max_abs_diff=_sig(diff), relative_diff=_sig(diff / scale), tolerance=LEAK_RTOL,
                         precision=precision, **extra)]


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


def gradient_step(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> StepReport:
    """Loss, logit statistics and per-parameter gradient statistics of one backward in train mode."""
    ids, labels = _targets(batch)
    ids, labels = ids[:GRAD_SAMPLES], labels[:GRAD_SAMPLES]
    model.train()
    model.zero_grad(set_to_none=True)
    logits = _seeded_forward(model, ids)
    loss = _checked_loss(logits, labels)
    if loss.requires_grad:
        loss.backward()
    with torch.no_grad():
        bad = logits.isnan() | (logits == math.inf)
        finite = logits[logits.isfinite()]
        trainable = {id(p) for _, p in _trainable(model)}
        params = [_param_grad(name, p, id(p) in trainable) for name, p in model.named_parameters()]
        report = StepReport(
            loss=float(loss.detach()), vocab_size=int(logits.shape[-1]),
            logit_std=float(finite.std()) if finite.numel() > 1 else math.nan,
            logits_nan=int(logits.isnan().sum()), logits_posinf=int((logits == math.inf).sum()),
            logits_neginf=int((logits == -math.inf).sum()),
            first_bad_logit=bad.nonzero()[0].tolist()[:-1] if bool(bad.any()) else None,
            loss_has_grad=loss.requires_grad, params=params)
    model.zero_grad(set_to_none=True)
    return report


def check_nonfinite(report: StepReport) -> list[Finding]:
    """nonfinite: NaN/Inf in a weight, the logits (NaN/+Inf), the loss or a gradient; first offender named."""
    bad_weights = [p.name for p in report.params if not p.weight_finite]
    bad_grads = [p.name for p in report.params if p.grad == "nonfinite"]
    bad_logits = report.logits_nan + report.logits_posinf
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


def _still_dead(model: nn.Module, batch: Mapping[str, torch.Tensor], names: set[str]) -> set[str]:
    """Of ``names`` (zero gradient at init), those whose gradient is still zero after one Adam step.

    A zero-initialised output layer or gate blocks the gradient only at step 0; one step opens it.
    """
    trial = copy.deepcopy(model)
    params = [p for _, p in _trainable(trial)]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    ids, labels = _targets(batch)
    ids, labels = ids[:GRAD_SAMPLES], labels[:GRAD_SAMPLES]
    trial.train()
    for step in range(2):  # a step, then the gradients after it
        optimizer.zero_grad(set_to_none=True)
        _checked_loss(_seeded_forward(trial, ids), labels).backward()
        if step == 0:
            optimizer.step()
    dead = {n for n, p in _trainable(trial) if n in names and (p.grad is None or not bool(p.grad.any()))}
    del trial
    return dead


def check_dead_params(model: nn.Module, batch: Mapping[str, torch.Tensor], report: StepReport) -> list[Finding]:
    """dead_params: trainable parameters the loss does not reach (no gradient, or zero even after a step)."""
    no_grad = [p.name for p in report.params if p.grad == "none"]
    zero = [p.name for p in report.params if p.grad == "zero"]
    if zero and report.loss_has_grad:
        still = _still_dead(model, batch, set(zero))
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


def check_overfit(model: nn.Module, batch: Mapping[str, torch.Tensor], steps: int) -> list[Finding]:
    """cannot_overfit: Adam on a few samples must bring the loss below half of where it started."""
    ids, labels = _targets(batch)
    ids, labels = ids[:OVERFIT_SAMPLES], labels[:OVERFIT_SAMPLES]
    model.train()
    params = [p for _, p in _trainable(model)]
    optimizer = torch.optim.Adam(params, lr=OVERFIT_LR) if params else None
    losses: list[float] = []

    def failed(reason: str, end: float) -> list[Finding]:
        start = losses[0] if losses else end
        return [make_finding("cannot_overfit", f"{reason}: loss {start:.3f} -> {end:.3f} in {max(len(losses), 1) - 1} "
                             f"Adam steps on {ids.shape[0]} samples; check labels, the loss mask and the grad path",
                             start_loss=_sig(start), end_loss=_sig(end), min_loss=_sig(min(losses, default=end)),
                             steps=max(len(losses), 1) - 1, lr=OVERFIT_LR, target_fraction=OVERFIT_TARGET,
                             samples=int(ids.shape[0]), reason=reason)]

    for step in range(steps + 1):  # steps updates, then the loss after the last one
        loss = _checked_loss(_forward(model, ids), labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            return failed(f"the loss became non-finite at step {step}", value)
        losses.append(value)
        if step and value < OVERFIT_TARGET * losses[0]:
            return []
        if optimizer is None or not loss.requires_grad:
            return failed("no gradient reaches the weights" if optimizer else "no trainable parameters", value)
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return failed(f"the loss did not fall below {OVERFIT_TARGET:.0%} of its start", losses[-1])


# ---------------------------------------------------------------- the dataset


def _item(dataset: Any, index: int) -> dict[str, Any]:
    item = dataset[index]
    if not isinstance(item, Mapping) or "input_ids" not in item:
        raise TypeError(f"dataset[{index}] is {type(item).__name__}; expected a dict with 'input_ids' (and 'labels')")
    return dict(item)


def check_deterministic_windows(dataset: Any) -> list[Finding]:
    """deterministic_windows: are training windows random crops?

    Draws each of 4 indices 3 times. With ``window_start`` and ``clip_len`` in the items: a clip of L
    tokens holds L - T possible starts for a window of T inputs (+1 label). Flag when every draw starts at
    the same offset (e.g. always 0: an inverted crop flag), or every index returns its same window on
    every draw, while clips are longer than a window and a random crop would look like that with
    probability < 1e-3. Without those keys there is no telling a fixed dataset (pre-cut sequences, a
    legitimate design) from a broken crop, so identical repeated draws are flagged only when the dataset
    advertises ``random_crop = True``. A dataset with ``random_crop = False`` is fixed on purpose: no finding.
    """
    advertised = getattr(dataset, "random_crop", None)
    if advertised is False:
        return []
    n = len(dataset)
    if n == 0:
        return []
    indices = sorted({0, n // 3, (2 * n) // 3, n - 1} & set(range(n)))[:WINDOW_INDICES]
    draws = {i: [_item(dataset, i) for _ in range(WINDOW_REPEATS)] for i in indices}
    first = draws[indices[0]][0]
    T = int(torch.as_tensor(first["input_ids"]).shape[0])
    if "window_start" in first and "clip_len" in first:
        starts = {i: [int(d["window_start"]) for d in ds] for i, ds in draws.items()}
        room = {i: int(ds[0]["clip_len"]) - T for i, ds in draws.items()}  # possible starts of a T+1 window
        movable = [i for i in indices if room[i] > 1]
        if not movable:
            return []
        clip_lens = [int(draws[i][0]["clip_len"]) for i in movable]
        all_starts = {s for i in movable for s in starts[i]}
        # Chance that uniform random crops show the pattern: constant start over every draw,
        # or the same start per index over its repeats.
        p_constant = math.prod((1 / room[i]) ** len(starts[i]) for i in movable) * min(room[i] for i in movable)
        p_per_index = math.prod((1 / room[i]) ** (len(starts[i]) - 1) for i in movable)
        evidence = dict(window_len=T, clip_len=clip_lens, indices=movable, starts=[starts[i] for i in movable])
        if len(all_starts) == 1 and p_constant < WINDOW_P_VALUE:
            (s,) = all_starts
            return [make_finding("deterministic_windows", f"every draw of {len(movable)} indices starts at "
                                 f"window_start={s} although clips hold {min(clip_lens)}+ tokens (window {T}): crops "
                                 "are not random; draw the start at random for training",
                                 reason="constant_start", start=s, p_random=_sig(p_constant), **evidence)]
        if all(len(set(starts[i])) == 1 for i in movable) and p_per_index < WINDOW_P_VALUE:
            return [make_finding("deterministic_windows", f"each dataset index returns the same window on every "
                                 f"draw although clips hold {min(clip_lens)}+ tokens (window {T}): the rest of each "
                                 "clip is never seen in that position; use random crops for training",
                                 reason="same_window_per_index", p_random=_sig(p_per_index), **evidence)]
        return []
    if advertised is True:
        same = [all(torch.equal(torch.as_tensor(d["input_ids"]), torch.as_tensor(ds[0]["input_ids"])) for d in ds)
                for ds in draws.values()]
        if len(indices) >= 2 and all(same):
            return [make_finding("deterministic_windows", f"the dataset sets random_crop=True but {len(indices)} "
                                 f"indices each returned identical windows on {WINDOW_REPEATS} draws: the crop flag "
                                 "is ignored or inverted", reason="identical_draws", indices=indices,
                                 repeats=WINDOW_REPEATS, window_len=T)]
    return []


@dataclass
class DataScan:
    samples: int  # scanned
    dataset_len: int
    targets: int  # non-ignored labels scanned
    distinct: set[int]
    complete: bool  # the whole dataset was scanned


def scan_dataset(dataset: Any, vocab_size: int | None) -> DataScan:
    """Target ids of up to SCAN_MAX_SAMPLES samples (evenly spread; stops after SCAN_SECONDS)."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    item = _item(dataset, 0)
    per_sample = int((torch.as_tensor(item.get("labels", item["input_ids"])) != IGNORE_INDEX).sum())
    want = max(16, math.ceil(COVERAGE_TARGETS_PER_VOCAB * (vocab_size or 0) / max(per_sample, 1)))
    count = min(n, want, SCAN_MAX_SAMPLES)
    indices = np.unique(np.linspace(0, n - 1, num=count).round().astype(np.int64))
    deadline = time.perf_counter() + SCAN_SECONDS
    distinct: set[int] = set()
    targets = scanned = 0
    for i in indices:
        item = _item(dataset, int(i))
        labels = torch.as_tensor(item.get("labels", item["input_ids"]))
        kept = labels[labels != IGNORE_INDEX]
        distinct.update(torch.unique(kept).tolist())
        targets += int(kept.numel())
        scanned += 1
        if time.perf_counter() > deadline:
            break
    return DataScan(scanned, n, targets, distinct, complete=scanned == n)


def check_vocab_coverage(scan: DataScan, vocab_size: int) -> list[Finding]:
    """vocab_coverage_low: few distinct target ids compared with V, on a conclusive scan."""
    coverage = len({t for t in scan.distinct if 0 <= t < vocab_size}) / vocab_size
    conclusive = scan.complete or scan.targets >= COVERAGE_TARGETS_PER_VOCAB * vocab_size
    if coverage >= COVERAGE_MIN or not conclusive:
        return []
    return [make_finding("vocab_coverage_low", f"training targets cover {coverage:.0%} of the {vocab_size} ids "
                         f"(over {scan.targets:,} targets): the other embeddings and output rows stay untrained",
                         coverage=_sig(coverage), covered=round(coverage * vocab_size), vocab_size=vocab_size,
                         samples_scanned=scan.samples, targets_scanned=scan.targets, dataset_len=scan.dataset_len)]


def check_data_size(scan: DataScan, n_params: int) -> list[Finding]:
    """data_too_small: len(dataset) x targets per sample vs trainable parameters."""
    per_sample = scan.targets / max(scan.samples, 1)
    tokens = scan.dataset_len * per_sample
    ratio = tokens / max(n_params, 1)
    if ratio >= TOKENS_PER_PARAM_MIN:
        return []
    return [make_finding("data_too_small", f"{tokens:,.0f} training tokens for {n_params:,} parameters "
                         f"({ratio:.3f} tokens/param): use a smaller model or more data",
                         tokens=int(tokens), params=n_params, tokens_per_param=_sig(ratio),
                         dataset_len=scan.dataset_len, tokens_per_sample=_sig(per_sample),
                         threshold=TOKENS_PER_PARAM_MIN)]


# ---------------------------------------------------------------- all together


def preflight(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    special_token_ids: Sequence[int] = (),
    dataset: Any = None,
    overfit_steps: int = 0,
) -> list[Finding]:
    """Run every check on ``model`` (a deepcopy of it) and ``batch``; see the module docstring."""
    findings: list[Finding] = []

    def run(name: str, check: Callable[..., list[Finding]], *args: Any) -> Any:
        try:
            findings.extend(check(*args))
        except Exception as exc:  # a check that cannot run must not stop the others
            findings.append(_check_failed(name, exc))

    first = batch["input_ids"] if isinstance(batch, Mapping) and "input_ids" in batch else None
    device = _model_device(model, first.device if torch.is_tensor(first) else torch.device("cpu"))
    with _preserved_rng(device):
        try:
            batch = {k: torch.as_tensor(v).to(device) for k, v in batch.items() if k in ("input_ids", "labels")}
            batch["input_ids"] = batch["input_ids"].long()
        except Exception as exc:
            return [_check_failed("batch", exc)]
        if "labels" in batch:
            batch["labels"] = batch["labels"].long()
        run("labels_shift", check_label_shift, batch)
        run("special_tokens_in_loss", check_special_tokens, batch, special_token_ids)

        report: StepReport | None = None
        try:
            probe: nn.Module | None = copy.deepcopy(model).float()
            for p in probe.parameters():
                p.grad = None
        except Exception as exc:
            probe = None
            findings.append(_check_failed("copy_model", exc))
        if probe is not None:
            run("causal_leak", check_causal_leak, probe, batch)
            run("batch_leak", check_batch_leak, probe, batch)
            try:
                report = gradient_step(probe, batch)
            except Exception as exc:
                findings.append(_check_failed("gradients", exc))
            if report is not None:
                before = len(findings)
                run("nonfinite", check_nonfinite, report)
                if len(findings) == before:  # with NaN about, the other numbers mean nothing
                    run("init_loss_high", check_init_loss, report)
                    run("dead_params", check_dead_params, probe, batch, report)
                    run("grad_outlier", check_grad_outlier, report)
            if overfit_steps > 0:
                run("cannot_overfit", check_overfit, probe, batch, overfit_steps)  # last: it trains the copy
            del probe

        if dataset is not None:
            run("deterministic_windows", check_deterministic_windows, dataset)
            scan: DataScan | None = None
            try:
                scan = scan_dataset(dataset, report.vocab_size if report else None)
            except Exception as exc:
                findings.append(_check_failed("data_scan", exc))
            if scan is not None:
                if report is not None:
                    run("vocab_coverage_low", check_vocab_coverage, scan, report.vocab_size)
                n_params = sum(p.numel() for _, p in _trainable(model))
                run("data_too_small", check_data_size, scan, n_params)
    return findings
