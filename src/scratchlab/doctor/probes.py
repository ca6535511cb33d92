"""Measurements of a model's internals that the doctor's monitors judge (via metric rows).

The trainer calls these; `scratchlab.doctor.monitors` decides what they mean.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scratchlab.loss import IGNORE_INDEX

STATS_STRIDE = 4  # eval output statistics on every 4th position (tiny-lm: 16k positions per eval)


def guilty_parameters(model: nn.Module, k: int = 5) -> list[dict]:
    """Parameters to blame for a non-finite step: non-finite gradients first, then the largest gradient norms."""
    rows = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            norm = float(p.grad.float().norm())
            rows.append({"name": name, "grad_norm": norm if math.isfinite(norm) else str(norm),
                         "finite": math.isfinite(norm)})
    rows.sort(key=lambda r: (r["finite"], -(r["grad_norm"] if r["finite"] else 0.0)))
    return rows[:k]


# Metric keys of the update/weight ratio, by optimizer param group (build_optimizer: matrices, then vectors).
UPDATE_RATIO_KEYS = ("update_ratio", "update_ratio_vectors")


@torch.no_grad()
def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of a param group's tensors, taken just before optimizer.step()."""
    return torch._foreach_mul(params, 1.0) if params else []


@torch.no_grad()
def update_ratio(before: list[torch.Tensor], after: list[torch.Tensor]) -> float | None:
    """||w_after - w_before|| / ||w_before|| over a whole group; None when undefined (empty, zero weights).

    Consumes ``before`` (it is overwritten with the update, so no second copy is made).
    """
    if not before:
        return None
    weight = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)))
    torch._foreach_sub_(before, after)  # before := -(update)
    delta = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)))
    delta_value, weight_value = torch.stack([delta, weight]).tolist()  # one device sync
    if not weight_value > 0 or not math.isfinite(weight_value):
        return None
    return delta_value / weight_value


def moe_load_stats(model: nn.Module) -> dict:
    """Expert load of the last forward, for models that report it; {} for dense models.

    The protocol: ``model.moe_load()`` returns one 1-D tensor per MoE layer with the fraction
    of routed tokens each expert received (summing to 1). The row gets the worst layer's
    busiest-expert share over its fair share (1 / n_experts): 1.0 is perfect balance.
    The statistics stay on the device until here: they come to the host in ONE copy (a log step's sync).
    """
    report = getattr(model, "moe_load", None)
    if not callable(report):
        return {}
    loads = report()
    if not loads:
        return {}
    layers = model.moe_layers() if callable(getattr(model, "moe_layers", None)) else []
    # scratchlab's MoE layers also know their router entropy and dropped assignments
    extra = [t for layer in layers for t in (layer.router_entropy(), layer.last_dropped)]
    device = loads[0].device
    values = torch.cat([*(load.detach().flatten().float().to(device) for load in loads),
                        *(t.detach().float().reshape(1).to(device) for t in extra)]).tolist()
    per_layer, start = [], 0
    for load in loads:
        per_layer.append(values[start:start + load.numel()])
        start += load.numel()
    ratios = [max(load) * len(load) for load in per_layer]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    stats: dict = {"moe_max_load_ratio": ratios[worst], "moe_worst_layer": worst,
                   "moe_load": [[round(f, 4) for f in load] for load in per_layer]}
    if layers:
        entropies, dropped = values[start::2], values[start + 1::2]
        stats["moe_router_entropy"] = sum(entropies) / len(layers)
        stats["moe_dropped"] = int(sum(dropped))
    return stats


def output_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, float]:
    """(sum of entropies over the targets in the loss, their count, sum over windows of max |logit|).

    On every STATS_STRIDE-th position only: a full-vocabulary softmax costs more than the loss
    itself, and the same fixed positions every eval keep the numbers comparable across evals.
    fp32 like the loss, so bf16 rounding does not fake a low entropy.
    """
    logits, labels = logits[:, ::STATS_STRIDE].float(), labels[:, ::STATS_STRIDE]
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)  # [batch, seq]
    kept = labels != IGNORE_INDEX
    per_window_max = logits.abs().flatten(1).amax(dim=1)  # [batch]
    return float(entropy[kept].sum()), int(kept.sum()), float(per_window_max.sum())
