"""Mixture-of-experts FFN: always-on shared experts + routed experts with a learned top-k router.

Dispatch (the same plan as torchtitan / megablocks, written for CPU first):

1. the router picks top-k experts per token; the N*k (token, expert) assignments are sorted
   by expert (one stable argsort), so each expert's rows form one contiguous group, padded
   to a bucketed size (``_bucket``: bounds the matmul shapes oneDNN caches kernels for);
2. one row gather builds that grouped input from the input cast once to the autocast dtype;
3. the routed experts' weights are stacked ([E, out, in]) and run as ONE grouped matmul per
   projection over the groups (``torch._grouped_mm`` on CPU; a loop over experts elsewhere),
   never a loop over tokens and never E small modules;
4. one row gather takes each token's k outputs back, mixed by their router weights (bmm).

The gathers' backward passes are gathers too (``_Dispatch``, ``_Combine``), not the serial
CPU scatter-add PyTorch would use for indexing. Shared experts are always on, so they are
one dense FFN as wide as all of them together (the same function).

Balancing is either the Switch-style auxiliary loss (E * sum_e f_e * P_e) or DeepSeek-V3's
auxiliary-loss-free per-expert bias, which only shifts which experts are *chosen*, never
the weights their outputs get.

A capacity factor > 0 drops assignments beyond ceil(cf * N * k / E) per expert (the first
ones in token order are kept): a token's output then depends on the other tokens in the
batch (the doctor's batch_leak check will say so), which is why it is off by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlab.config import MoEConfig
from scratchlab.layers.blocks import GeluFFN, SwiGLU


def _bucket(counts: torch.Tensor) -> torch.Tensor:
    """Round each group size up to one of 8 sizes per octave (steps of at least 16 rows).

    oneDNN (PyTorch's bf16 matmul on CPU) builds and keeps a kernel per distinct matrix shape;
    expert group sizes change every step, which grew a run's memory by ~100 MB per step.
    Bucketed sizes bound the shapes it ever sees, for at most 1/8 extra rows.
    """
    step = torch.exp2(torch.log2(counts.clamp(min=1).float()).floor() - 3).clamp(min=16).long()
    return (counts + step - 1) // step * step


class _Dispatch(torch.autograd.Function):
    """rows[r] = tokens[src[r]] for the padded rows grouped by expert ([M, D]).

    ``row_of[a]`` is the row of assignment a = token * k + slot (M, past the end, when it was
    dropped). The backward gathers each assignment's row gradient and sums a token's k slots:
    gathers and one reduction, no scatter-add (PyTorch's CPU kernel for that is serial).
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, src: torch.Tensor, row_of: torch.Tensor, k: int, dropped: bool):
        ctx.save_for_backward(row_of)
        ctx.k, ctx.dropped = k, dropped
        return tokens.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (row_of,) = ctx.saved_tensors
        if ctx.dropped:  # dropped assignments read a zero row
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])
        per_assignment = grad.index_select(0, row_of)
        return per_assignment.view(-1, ctx.k, grad.shape[1]).sum(1), None, None, None, None


class _Combine(torch.autograd.Function):
    """out[n] = sum_j weights[n, j] * y[row_of[n * k + j]]: each token's k expert outputs, mixed.

    ``assignment_of_row[r]`` inverts ``row_of`` (N * k for padding rows), so the gradient of y
    is a gather too; padding rows get zero.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, row_of: torch.Tensor, assignment_of_row: torch.Tensor,
                dropped: bool) -> torch.Tensor:
        if dropped:  # dropped assignments read a zero row
            y = torch.cat([y, y.new_zeros(1, y.shape[1])])
        picked = y.index_select(0, row_of).view(*weights.shape, y.shape[1])  # [N, k, D]
        ctx.save_for_backward(picked, weights, assignment_of_row)
        return torch.bmm(weights.unsqueeze(1), picked).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        picked, weights, assignment_of_row = ctx.saved_tensors
        N, k, D = picked.shape
        grad_weights = torch.bmm(picked, grad.unsqueeze(-1)).squeeze(-1)
        per_assignment = grad.new_empty(N * k + 1, D)  # + one zero row for the padding rows
        per_assignment[-1] = 0
        torch.mul(weights.unsqueeze(-1), grad.unsqueeze(1), out=per_assignment[:-1].view(N, k, D))
        return per_assignment.index_select(0, assignment_of_row), grad_weights, None, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """Row slice e of ``x`` (rows ends[e-1]..ends[e]) times weight[e].T; weight is [E, out, in].

    ``x`` must have exactly ends[-1] rows: the grouped kernel leaves rows past the last end
    uninitialised. ``counts`` (the slice sizes) selects the loop fallback when given.
    """
    if counts is None:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=ends)
    return torch.cat([part @ w.t() for part, w in zip(x.split(counts), weight)])


def _use_grouped_mm(device: torch.device) -> bool:
    # CPU runs torch._grouped_mm in any float dtype; CUDA needs sm90+ and alignment we have not
    # tested, so other devices loop over experts (E matmuls, still no loop over tokens).
    return device.type == "cpu" and hasattr(torch, "_grouped_mm")


class GroupedExperts(nn.Module):
    """E routed FFN experts with stacked weights: ``w_in`` [E, width, D] and ``w_out`` [E, D, hidden].

    Expert e is exactly ``GeluFFN`` / ``SwiGLU`` with up (or gate_up) weight ``w_in[e]`` and down
    weight ``w_out[e]`` (``nn.Linear`` layout: [out, in]).
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int, swiglu: bool, bias: bool) -> None:
        super().__init__()
        self.swiglu, self.hidden = swiglu, hidden
        width = 2 * hidden if swiglu else hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, width, d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        # Biases are stored flat ([E * width]) so the optimizer sees vectors and does not decay them.
        self.b_in = nn.Parameter(torch.zeros(n_experts * width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n_experts * d_model)) if bias else None
        nn.init.normal_(self.w_in, std=0.02)  # the model's init scheme (layers/init.py) overwrites these
        nn.init.normal_(self.w_out, std=0.02)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, expert_of_row: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [M, D] sorted by expert with ``counts`` [E] rows each (sum M); returns [M, D]."""
        ends = counts.cumsum(0).to(torch.int32)
        split = None if _use_grouped_mm(x.device) else counts.tolist()
        h = grouped_linear(x, self.w_in.to(x.dtype), ends, split)
        if self.b_in is not None:
            h = h + self.b_in.to(x.dtype).view(len(self.w_in), -1).index_select(0, expert_of_row)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        y = grouped_linear(h, self.w_out.to(x.dtype), ends, split)
        if self.b_out is not None:
            y = y + self.b_out.to(x.dtype).view(len(self.w_out), -1).index_select(0, expert_of_row)
        return y


class MoEFFN(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = max(8, round(d_model * cfg.expert_mult))
        swiglu = cfg.expert_ffn == "swiglu"
        self.router = nn.Linear(d_model, cfg.n_routed_experts, bias=False)
        self.experts = GroupedExperts(cfg.n_routed_experts, d_model, hidden, swiglu, bias)
        # Shared experts are always on: one FFN as wide as all of them together is the same function.
        shared = SwiGLU if swiglu else GeluFFN
        self.shared = shared(d_model, hidden * cfg.n_shared_experts, bias) if cfg.n_shared_experts else None
        # Aux-loss-free balancing: added to the scores for the top-k choice only; persistent so resume is exact.
        self.register_buffer("balance_bias", torch.zeros(cfg.n_routed_experts))
        self.last_load = torch.zeros(cfg.n_routed_experts)  # fraction of assignments per expert, last forward
        self.last_aux: torch.Tensor | None = None
        self.last_dropped = 0
        self._logits = torch.zeros(1, cfg.n_routed_experts)  # router logits of the last forward

    @property
    def last_router_entropy(self) -> float:
        """Mean entropy (nats) of the router's softmax over experts in the last forward (computed when read)."""
        probs = self._logits.softmax(-1)
        return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, E, k = self.cfg, self.cfg.n_routed_experts, self.cfg.top_k
        # Cast once to the compute dtype (bf16 under autocast on AMX CPUs): the router, the routed
        # and the shared experts all read this copy, so autocast makes no further copies of it.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        N = flat.shape[0]
        logits = self.router(flat).float()  # [N, E]
        scores = logits.softmax(-1) if cfg.score == "softmax" else logits.sigmoid()
        choice = scores + self.balance_bias if cfg.balance == "bias" else scores
        top = choice.topk(k, dim=-1).indices  # [N, k]
        weights = scores.gather(-1, top)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)  # normalised top-k weights

        # Assignment a = token * k + slot. Sorting by expert (stable: token order within an expert)
        # makes each expert's rows contiguous; dropped ones get the key E and sort to the end.
        expert_ids = top.reshape(-1)
        counts = torch.bincount(expert_ids, minlength=E)
        kept, n_kept = counts, N * k
        if cfg.capacity_factor > 0:
            capacity = math.ceil(cfg.capacity_factor * N * k / E)
            order = expert_ids.argsort(stable=True)
            rank = torch.empty_like(order)  # position of each assignment within its expert's slice
            rank[order] = torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts)[expert_ids[order]]
            expert_ids = expert_ids.masked_fill(rank >= capacity, E)
            kept = counts.clamp(max=capacity)
            n_kept = int(kept.sum())
        self.last_dropped = N * k - n_kept
        dropped = n_kept < N * k

        # Rows grouped by expert, each group padded to a bucketed size (see _bucket): kept
        # assignment i in sorted order goes to row padded_start[e] + its rank within expert e.
        order = expert_ids.argsort(stable=True)[:n_kept]
        sorted_experts = expert_ids[order]
        padded = _bucket(kept)
        n_rows = int(padded.sum())
        rank = torch.arange(n_kept, device=x.device) - (kept.cumsum(0) - kept)[sorted_experts]
        rows_sorted = (padded.cumsum(0) - padded)[sorted_experts] + rank
        row_of = torch.full((N * k,), n_rows, dtype=torch.long, device=x.device)
        row_of[order] = rows_sorted
        src = torch.zeros(n_rows, dtype=torch.long, device=x.device)  # padding rows compute token 0, unused
        src[rows_sorted] = order // k
        assignment_of_row = torch.full((n_rows,), N * k, dtype=torch.long, device=x.device)
        assignment_of_row[rows_sorted] = order

        rows = _Dispatch.apply(flat, src, row_of, k, dropped)  # [n_rows, D]
        expert_of_row = None
        if self.experts.b_in is not None:
            expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), padded, output_size=n_rows)
        y = self.experts(rows, padded, expert_of_row)
        out = _Combine.apply(y, weights.to(y.dtype), row_of, assignment_of_row, dropped)  # [N, D]
        if self.shared is not None:
            out = out + self.shared(flat)

        load = counts.float() / max(1, N * k)  # before capacity: where the router wanted to send tokens
        # Differentiable, so gradients reach the router; sigmoid scores are normalised per token first.
        importance = (scores if cfg.score == "softmax" else scores / scores.sum(-1, keepdim=True)).mean(0)
        self.last_aux = E * (load * importance).sum() if cfg.balance == "aux_loss" else None
        self.last_load = load.detach()
        self._logits = logits.detach()  # the entropy is computed from these only when it is read
        return out.view_as(x)

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free step: nudge under-loaded experts up, over-loaded ones down."""
        if self.cfg.balance == "bias":
            self.balance_bias += self.cfg.bias_update_rate * torch.sign(self.last_load.mean() - self.last_load).to(
                self.balance_bias.device
            )
