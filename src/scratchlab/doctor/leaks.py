"""The leak checks: does a model's output depend on the future (causal_leak) or on the batch's other
sequences (batch_leak)? Both perturb inputs and compare outputs; what they find is re-measured in float64
(`confirmed`). Thresholds and why: the preflight module's docstring (doctor/preflight.py)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from scratchlab.doctor.findings import Finding, make_finding, sig as _sig
from scratchlab.doctor.forward import seeded_forward

PERTURB_SAMPLES = 2  # samples used by the leak checks (one forward each per probe)
LEAK_RTOL = 1e-6  # a leak changes outputs by more than this x max|logit| (causal models: exactly 0)


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




def _first_change(base: torch.Tensor, out: torch.Tensor, tol: float) -> tuple[int, float] | None:
    """(first time index, diff there) where ``out`` differs from ``base`` beyond tol; dims [B, T, ...]."""
    diff = _abs_diff(out, base).transpose(0, 1).flatten(1).amax(dim=1)  # [T]
    bad = (diff > tol).nonzero()
    return (int(bad[0]), float(diff[bad[0]])) if bad.numel() else None


def confirmed(probe: Callable[[nn.Module, torch.Tensor], Any], model: nn.Module, ids: torch.Tensor) -> tuple[Any, str]:
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
    return torch.cat([seeded_forward(model, ids[s:s + 1]) for s in range(ids.shape[0])])


def causal_changes(model: nn.Module, ids: torch.Tensor) -> list[tuple]:
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
    leaks, precision = confirmed(causal_changes, model, ids)
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


def batch_changes(model: nn.Module, ids: torch.Tensor) -> list[tuple]:
    """(mode, observed sample, perturbed sample, first position, diff, scale) for each mode where one sample's
    output changes when the other sample changes: sample 1 perturbed first, then sample 0."""
    other = _other_ids(ids, ids, torch.Generator().manual_seed(1))
    changes = []
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():
            base = seeded_forward(model, ids)
            for perturbed, observed in ((1, 0), (0, 1)):
                changed = ids.clone()
                changed[perturbed] = other[perturbed]
                mine = slice(observed, observed + 1)
                scale = _scale(base[mine])
                change = _first_change(base[mine], seeded_forward(model, changed)[mine], LEAK_RTOL * scale)
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
    changes = batch_changes(model, ids)
    if not changes:
        return None
    declared = _declared_couplings(model)
    if not declared:
        return changes, None
    with contextlib.ExitStack() as stack:
        for _, module in declared:
            stack.enter_context(module.uncoupled())
        return changes, batch_changes(model, ids)


def check_batch_leak(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[Finding]:
    """batch_leak: does one sample's output change when the other sample changes (both ways)?

    A dependency that modules declare (``batch_coupling``, e.g. MoE capacity dropping) and that
    disappears with them turned off (``uncoupled()``) is a warning naming the reason; any other is an error.
    """
    ids = batch["input_ids"][:PERTURB_SAMPLES]
    if ids.shape[0] < 2:  # one sample: pair it with a shifted copy of itself
        ids = torch.cat([ids, ids.roll(1, dims=1)])
    verdict, precision = confirmed(_batch_verdict, model, ids)
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
