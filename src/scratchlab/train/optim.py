"""Optimizer, learning-rate schedule and gradient-clip schedule.

Schedules are pure functions of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scratchlab.config import ClipConfig, OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or other vectors).

    Parameters keep fp32 master weights and fp32 optimizer state; bf16 enters only
    through autocast in the forward pass.
    """
    # A model may ask for own groups (e.g. learnable scalars: lower LR, own clip) via param_groups_hint().
    hint = getattr(model, "param_groups_hint", None)
    special = [dict(g) for g in hint()] if callable(hint) else []
    taken = {id(p) for g in special for p in g["params"]}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in taken:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *special,  # after the two standard groups, which the update-ratio probe reads by position
    ]
    kwargs = {"fused": True} if fused else {}
    cls = GroupedAdamW if special else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


class GroupedAdamW(torch.optim.AdamW):
    """AdamW whose groups may carry ``lr_mult`` (their LR = the schedule's x lr_mult) and ``max_norm``
    (their own gradient clip, after the trainer's global one).

    The trainer sets every group's ``lr`` to the schedule's value each step; the multiplier is applied
    inside ``step`` and undone after it, so checkpoints and resumes see the plain schedule.
    """

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        saved = []
        for group in self.param_groups:
            saved.append(group["lr"])
            group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
            if group.get("max_norm"):
                grads = [p for p in group["params"] if p.grad is not None]
                if grads:
                    torch.nn.utils.clip_grad_norm_(grads, group["max_norm"])
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, saved):
                group["lr"] = lr


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    warmup = min(cfg.warmup_steps, max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_frac
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    # wsd: warmup, stable at lr, then linear decay over the last decay_frac of training.
    decay_steps = max(1, round(cfg.decay_frac * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    return cfg.lr + (min_lr - cfg.lr) * min(1.0, (step - decay_start + 1) / decay_steps)


def clip_threshold_at(step: int, cfg: ClipConfig) -> float:
    """Clip threshold that rises linearly from start_frac * max_norm to max_norm over warmup_steps."""
    if cfg.max_norm <= 0:
        return math.inf
    if step >= cfg.warmup_steps:
        return cfg.max_norm
    frac = cfg.start_frac + (1 - cfg.start_frac) * step / cfg.warmup_steps
    return cfg.max_norm * frac
