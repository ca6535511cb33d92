"""Optimizers by parameter role, the learning-rate schedule and the gradient-clip schedule.

Roles (``param_roles``): ``matrix`` (hidden matrices: attention, FFN and MoE expert weights, MLA
projections, the cascade's stage matrices), ``embed`` (``nn.Embedding`` weights), ``head`` (the
weights of output modules named ``head`` / ``heads``, when not tied to an embedding) and ``vector``
(norms, biases, scalars: anything with fewer than 2 dims). ``optim.name`` picks who updates what:

- ``adamw``: AdamW for every role (matrices, embeddings and heads decayed, vectors not), exactly the
  optimizer of earlier releases unless ``optim.embed_lr`` / ``head_lr`` split their roles out;
- ``muon``: ``torch.optim.Muon`` for the 2-D hidden matrices, ``StackedMuon`` (the same update,
  batched) for stacked 3-D expert weights [E, out, in], AdamW for embeddings, heads and vectors.

Every group carries ``base_lr``; the trainer sets its LR to ``lr_at(step, ..., base_lr)``. Schedules
are pure functions of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from scratchlab.config import ClipConfig, OptimConfig
from scratchlab.errors import UserError

HEAD_NAMES = ("head", "heads")  # output modules (logits / predictions): AdamW under muon, as Muon prescribes
# torch.optim.Muon's Newton-Schulz coefficients (Keller Jordan's quintic) and epsilon.
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NS_EPS = 1e-7


# ---------------------------------------------------------------- roles


def param_roles(model: nn.Module, exclude: Iterable[int] = ()) -> list[tuple[str, str, nn.Parameter]]:
    """(name, role, parameter) of every trainable parameter, in ``model.parameters()`` order.

    Tied weights appear once, with the role of their first owner (the lm's tied head is its embedding).
    ``exclude`` holds the ids of parameters a model put in groups of its own (``param_groups_hint``).
    """
    skip = set(exclude)
    owner: dict[int, tuple[str, str]] = {}
    for module_name, module in model.named_modules():
        last = module_name.rsplit(".", 1)[-1]
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in owner:
                continue
            if param.dim() < 2:
                role = "vector"
            elif isinstance(module, nn.Embedding):
                role = "embed"
            elif last in HEAD_NAMES:
                role = "head"
            else:
                role = "matrix"
            owner[id(param)] = (f"{module_name}.{pname}" if module_name else pname, role)
    rows = []
    for param in model.parameters():
        if param.requires_grad and id(param) not in skip:
            name, role = owner[id(param)]
            rows.append((name, role, param))
    return rows


def optimizer_roles(model: nn.Module, cfg: OptimConfig) -> dict[str, list[str]]:
    """Parameter names by the optimizer that updates them ("muon" or "adamw"): what build_optimizer does."""
    hint = getattr(model, "param_groups_hint", None)
    taken = {id(p) for g in (hint() if callable(hint) else []) for p in g["params"]}
    out: dict[str, list[str]] = {"muon": [], "adamw": []}
    for name, role, _ in param_roles(model, taken):
        out["muon" if cfg.name == "muon" and role == "matrix" else "adamw"].append(name)
    out["adamw"] += [n for n, p in model.named_parameters() if id(p) in taken]
    return out


# ---------------------------------------------------------------- building


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool = False) -> torch.optim.Optimizer | RoleOptimizer:
    """The optimizer of ``optim.name`` over ``model``'s parameters, grouped by role.

    Returns a ``torch.optim.AdamW`` (``GroupedAdamW`` when the model asks for groups of its own)
    for ``adamw``, a ``RoleOptimizer`` (Muon + AdamW) for ``muon``. ``param_groups[0]`` is always
    the hidden matrices and ``param_groups[1]`` the vectors: the update-ratio probe reads them by
    position. Parameters keep fp32 master weights and fp32 optimizer state; bf16 enters only
    through autocast in the forward pass (and Muon's Newton-Schulz iteration, as torch runs it).
    """
    # A model may ask for own groups (e.g. learnable scalars: lower LR, own clip) via param_groups_hint().
    hint = getattr(model, "param_groups_hint", None)
    special = [{"base_lr": cfg.lr, **g} for g in hint()] if callable(hint) else []
    taken = {id(p) for g in special for p in g["params"]}
    by_role: dict[str, list[nn.Parameter]] = {"matrix": [], "vector": [], "embed": [], "head": []}
    for _, role, param in param_roles(model, taken):
        by_role[role].append(param)
    scalar_lr = cfg.scalar_lr or cfg.lr
    vectors = {"name": "vectors", "params": by_role["vector"], "weight_decay": 0.0, "base_lr": scalar_lr}
    adamw_kwargs = {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, **({"fused": True} if fused else {})}

    if cfg.name == "adamw":
        # Embeddings and heads stay with the matrices (decayed, optim.lr) unless given their own LR;
        # the groups keep model order, so the default layout is the earlier releases' one.
        own = {"embed": cfg.embed_lr is not None, "head": cfg.head_lr is not None}
        matrix_ids = {id(p) for role in ("matrix", "embed", "head") if not own.get(role) for p in by_role[role]}
        matrices = [p for p in model.parameters() if id(p) in matrix_ids]
        groups = [
            {"name": "matrices", "params": matrices, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            vectors,
            *_role_groups(by_role, cfg, only=[role for role, yes in own.items() if yes]),
            *special,  # after the two standard groups, which the update-ratio probe reads by position
        ]
        cls = GroupedAdamW if special else torch.optim.AdamW
        return _config_wins_on_load(cls(groups, lr=cfg.lr, **adamw_kwargs))

    matrices2d = [p for p in by_role["matrix"] if p.dim() == 2]
    stacked = [p for p in by_role["matrix"] if p.dim() > 2]
    sharded = [p for p in by_role["matrix"] if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"]
    if sharded:
        raise UserError(
            "optim.name=muon cannot run on FSDP-sharded matrices (Newton-Schulz needs each whole matrix); "
            "use train.parallel=ddp or optim.name=adamw"
        )
    muon_kwargs = {
        "lr": cfg.muon_lr, "weight_decay": cfg.muon_weight_decay, "momentum": cfg.muon_momentum,
        "nesterov": cfg.muon_nesterov, "ns_steps": cfg.muon_ns_steps, "adjust_lr_fn": cfg.muon_adjust_lr,
    }
    parts: dict[str, torch.optim.Optimizer] = {
        "muon": torch.optim.Muon([{"name": "matrices", "params": matrices2d, "base_lr": cfg.muon_lr}], **muon_kwargs),
    }
    adamw_groups = [vectors, *_role_groups(by_role, cfg, only=["embed", "head"]), *special]
    parts["adamw"] = (GroupedAdamW if special else torch.optim.AdamW)(adamw_groups, lr=cfg.lr, **adamw_kwargs)
    if stacked:
        parts["experts"] = StackedMuon([{"name": "experts", "params": stacked, "base_lr": cfg.muon_lr}], **muon_kwargs)
    for part in parts.values():
        _config_wins_on_load(part)
    return RoleOptimizer(parts)


def _role_groups(by_role: dict[str, list[nn.Parameter]], cfg: OptimConfig, only: list[str]) -> list[dict]:
    """The embedding and head groups (decayed like matrices, each at its own LR); empty roles are left out."""
    lrs = {"embed": cfg.embed_lr or cfg.lr, "head": cfg.head_lr or cfg.lr}
    return [
        {"name": role, "params": by_role[role], "weight_decay": cfg.weight_decay, "base_lr": lrs[role]}
        for role in only
        if by_role[role]
    ]


def _config_wins_on_load(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """After ``load_state_dict``, put back the hyperparameters built from this run's config (and refuse,
    before it, the state of a RoleOptimizer with one clear line).

    torch restores every group's hyperparameters from the checkpoint; the config given at resume
    (e.g. an override of optim.muon_lr) must win, and older checkpoints carry no ``base_lr``.
    """
    built = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]

    def restore(opt: torch.optim.Optimizer) -> None:
        for group, values in zip(opt.param_groups, built):
            group.update(values)

    def check(opt: torch.optim.Optimizer, state: dict) -> None:
        if "param_groups" not in state:  # a RoleOptimizer's state: one entry per part
            raise ValueError(f"optimizer state has parts {sorted(state)} (was the run trained with another optim.name?)")

    optimizer.register_load_state_dict_pre_hook(check)
    optimizer.register_load_state_dict_post_hook(restore)
    return optimizer


# ---------------------------------------------------------------- optimizers


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


def muon_lr_scale(rule: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's LR factor for a [rows, cols] matrix (its ``adjust_lr_fn``)."""
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))  # "original" (and torch's default, None)


@torch.no_grad()
def newton_schulz(grad: torch.Tensor, steps: int, eps: float = NS_EPS) -> torch.Tensor:
    """Orthogonalise each matrix of ``grad`` [..., rows, cols] (bf16 quintic Newton-Schulz, as torch.optim.Muon)."""
    a, b, c = NS_COEFFICIENTS
    x = grad.bfloat16()
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.mT
    flat = x.dim() == 2
    x = x.unsqueeze(0) if flat else x.flatten(0, -3)
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):  # the same fused bf16 ops as torch's addmm, batched
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.squeeze(0) if flat else x.view(*grad.shape[:-2], *x.shape[-2:])
    return x.mT if tall else x


class StackedMuon(torch.optim.Optimizer):
    """Muon for stacked matrices [E, rows, cols] (MoE experts): each of the E matrices gets its own
    orthogonalised update, LR scale and decay, exactly torch.optim.Muon's rule on a [rows, cols]
    matrix, batched over E (torch.optim.Muon accepts 2-D parameters only)."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # noqa: ANN201 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * muon_lr_scale(group["adjust_lr_fn"], p.shape[-2], p.shape[-1]))
        return loss


class RoleOptimizer:
    """Several optimizers stepping as one (``muon``: Muon, AdamW, StackedMuon): the trainer's interface.

    ``param_groups`` is their groups in order (the same dicts: setting a group's ``lr`` reaches its
    optimizer); ``state_dict`` is one entry per part, so a checkpoint resumes bit-exactly and a
    checkpoint of another optimizer fails to load with a clear message.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for part in self.parts.values() for p, s in part.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable | None = None):  # noqa: ANN201 - torch's signature
        loss = closure() if closure is not None else None  # one forward/backward, then every part steps
        for part in self.parts.values():
            part.step()
        return loss

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.parts):
            raise ValueError(
                f"optimizer state has parts {sorted(state)}, this optimizer {sorted(self.parts)} "
                "(was the run trained with another optim.name?)"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


# ---------------------------------------------------------------- schedules


def lr_at(step: int, cfg: OptimConfig, max_steps: int, base_lr: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule.

    ``base_lr`` is a group's peak LR (default ``optim.lr``); the schedule's shape is the same for all.
    """
    peak = cfg.lr if base_lr is None else base_lr
    warmup = min(cfg.warmup_steps, max_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    min_lr = peak * cfg.min_lr_frac
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    # wsd: warmup, stable at lr, then linear decay over the last decay_frac of training.
    decay_steps = max(1, round(cfg.decay_frac * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (min_lr - peak) * min(1.0, (step - decay_start + 1) / decay_steps)


def clip_threshold_at(step: int, cfg: ClipConfig) -> float:
    """Clip threshold that rises linearly from start_frac * max_norm to max_norm over warmup_steps."""
    if cfg.max_norm <= 0:
        return math.inf
    if step >= cfg.warmup_steps:
        return cfg.max_norm
    frac = cfg.start_frac + (1 - cfg.start_frac) * step / cfg.warmup_steps
    return cfg.max_norm * frac
