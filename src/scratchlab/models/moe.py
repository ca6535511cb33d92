"""Mixture-of-experts FFN: always-on shared experts + routed experts with a learned top-k router.

Dispatch (the same plan as torchtitan / megablocks, written for CPU first):

1. the router picks top-k experts per token; the N*k (token, expert) assignments are sorted
   by expert (one stable argsort), so each expert's tokens form one contiguous slice;
2. one row gather builds that sorted [N*k, D] input, in the autocast dtype;
3. the routed experts' weights are stacked ([E, out, in]) and run as ONE grouped matmul per
   projection over the slices (``torch._grouped_mm`` on CPU; a loop over experts elsewhere),
   never a loop over tokens and never E small modules;
4. one row gather by the inverse permutation puts the outputs back in token order, where the
   k outputs of each token are mixed by their router weights.

Both gathers are permutations, so their backward passes are gathers by the inverse
permutation too (``_permute_rows``): no scatter-add, whose CPU kernel is serial and was a
large share of the old per-expert dispatch. Shared experts are always on, so they are one
dense FFN as wide as all of them together (the same function).

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
from scratchlab.models.blocks import GeluFFN, SwiGLU


class _PermuteRows(torch.autograd.Function):
    """rows[index] where ``index`` is a permutation; the backward is the gather by its inverse."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _Dispatch(torch.autograd.Function):
    """Token rows for the first ``n`` sorted assignments: tokens[order[:n] // k] ([n, D]).

    ``order`` sorts the N*k assignments (a = token * k + slot) by expert and ``inverse`` undoes
    it. The backward puts each row's gradient back at its assignment (dropped ones get zero)
    and sums a token's k slots: gathers and one reduction, no scatter-add.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int, n: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return tokens.index_select(0, order[:n] // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        if len(grad) < len(inverse):
            grad = torch.cat([grad, grad.new_zeros(len(inverse) - len(grad), grad.shape[1])])
        per_assignment = grad.index_select(0, inverse)
        return per_assignment.view(-1, ctx.k, grad.shape[1]).sum(1), None, None, None, None


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
        nn.init.normal_(self.w_in, std=0.02)  # the model's init scheme (models/init.py) overwrites these
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
        order = expert_ids.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(N * k, device=x.device)

        rows = _Dispatch.apply(flat, order, inverse, k, n_kept)  # [n_kept, D], sorted by expert
        y = self.experts(rows, kept, expert_ids[order[:n_kept]] if self.experts.b_in is not None else None)
        if n_kept < N * k:  # dropped assignments contribute nothing
            y = torch.cat([y, y.new_zeros(N * k - n_kept, y.shape[1])])
        y = _PermuteRows.apply(y, inverse, order).view(N, k, -1)  # back to token order
        out = torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # [N, D]: the k outputs, weighted
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
