"""Mixture-of-experts FFN: always-on shared experts + routed experts with a learned top-k router.

Dispatch (the same plan as torchtitan / megablocks), one code path for every device and dtype,
with static shapes and no host sync (nothing in forward reads a tensor's value on the host, so
``torch.compile`` traces it whole and a GPU never waits for the CPU):

1. the router picks top-k experts per token; the A = N*k (token, expert) assignments are sorted
   by expert (one stable argsort), so each expert's rows form one contiguous group, padded to a
   size that ``_pad_groups`` chooses; the grouped input has a STATIC number of rows
   (``_grouped_rows``, an upper bound of the padded total) and group ends live on the device;
2. one row gather builds that grouped input from the input cast once to the autocast dtype;
3. the routed experts' weights are stacked ([E, out, in]) and run as ONE grouped matmul per
   projection (``torch.nn.functional.grouped_mm`` behind the ``scratchlab::grouped_mm`` op, whose
   meta function accepts fp32 too: torch's own only accepts bf16, which broke compile in fp32);
   rows past the last group come out as exact zeros; never a loop over tokens or experts;
4. one row gather takes each token's k outputs back, mixed by their router weights (bmm).

The gathers' backward passes are gathers too (``_Dispatch``, ``_Combine``), not the serial
CPU scatter-add PyTorch would use for indexing. Shared experts are always on, so they are
one dense FFN as wide as all of them together (the same function).

Balancing is either the Switch-style auxiliary loss (E * sum_e f_e * P_e) or DeepSeek-V3's
auxiliary-loss-free per-expert bias, which only shifts which experts are *chosen*, never
the weights their outputs get.

A capacity factor > 0 drops assignments beyond ceil(cf * N * k / E) per expert (the first
ones in token order are kept): a token's output then depends on the other sequences of the
batch (never on later tokens of its own sequence). The layer declares it (``batch_coupling``)
and the doctor's batch_leak check reports it as a warning; it is off by default.

Load statistics (``last_load``, ``last_dropped``, the router logits for the entropy) stay on the
device; they are read on log steps only (doctor/probes.py ``moe_load_stats``, one sync).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from scratchlab.config import MoEConfig
from scratchlab.layers.blocks import GeluFFN, SwiGLU

_ALIGN = 16  # group sizes are multiples of this (grouped-GEMM friendly on GPUs; oneDNN buckets on CPU)


def _bucket(counts: torch.Tensor) -> torch.Tensor:
    """Round each group size up to one of 8 sizes per octave (steps of at least 16 rows).

    oneDNN (PyTorch's bf16 matmul on CPU) builds and keeps a kernel per distinct matrix shape;
    expert group sizes change every step, which grew a run's memory by ~100 MB per step.
    Bucketed sizes bound the shapes it ever sees, for at most 1/8 extra rows.
    """
    step = torch.exp2(torch.log2(counts.clamp(min=1).float()).floor() - 3).clamp(min=_ALIGN).long()
    return (counts + step - 1) // step * step


def _pad_groups(counts: torch.Tensor, bucketed: bool) -> torch.Tensor:
    """Group sizes as the grouped matmul sees them: bucketed on CPU (see ``_bucket``), else multiples of 16."""
    return _bucket(counts) if bucketed else (counts + _ALIGN - 1) // _ALIGN * _ALIGN


def _grouped_rows(assignments: int, n_experts: int, bucketed: bool) -> int:
    """A static bound on the padded total (+ at least one spare row past the last group), a multiple of 16.

    Bucketing adds at most max(15, count / 8) rows to a group, rounding to 16 at most 15.
    """
    slack = (assignments // 8 + 1 if bucketed else 0) + _ALIGN * n_experts + 1
    return (assignments + slack + _ALIGN - 1) // _ALIGN * _ALIGN


# ---------------------------------------------------------------- the grouped matmul, as one opaque op


def _grouped_mm_supports(dtype: torch.dtype) -> bool:
    # torch's grouped_mm kernels take fp32/bf16/fp16; float64 (the doctor's leak probes) loops instead.
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


def _per_group(ends: torch.Tensor) -> Iterator[tuple[int, int, int]]:
    start = 0
    for e, end in enumerate(ends.tolist()):  # float64 only: a host sync is fine in a probe
        yield e, start, end
        start = end


@torch.library.custom_op("scratchlab::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ends[e-1]..ends[e] of ``x`` [M, in] times weight[e].T (weight [E, out, in]); rows past ends[-1] are 0."""
    if _grouped_mm_supports(x.dtype):
        out = F.grouped_mm(x, weight.transpose(-2, -1), offs=ends)
    else:
        out = x.new_zeros(x.shape[0], weight.shape[1])
        for e, start, end in _per_group(ends):
            out[start:end] = x[start:end] @ weight[e].t()
    past_end = torch.arange(x.shape[0], device=x.device) >= ends[-1]  # the kernel leaves these uninitialised
    return out.masked_fill(past_end.unsqueeze(-1), 0)


@grouped_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("scratchlab::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(grad: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """[E, out, in]: group e's ``grad`` rows (transposed) times its ``x`` rows; zero for an empty group."""
    if _grouped_mm_supports(x.dtype):
        out = F.grouped_mm(grad.t(), x, offs=ends)
    else:
        out = x.new_zeros(len(ends), grad.shape[1], x.shape[1])
        for e, start, end in _per_group(ends):
            out[e] = grad[start:end].t() @ x[start:end]
    empty = torch.diff(ends, prepend=ends.new_zeros(1)) == 0  # some kernels leave empty groups unwritten
    return out.masked_fill(empty.view(-1, 1, 1), 0)


@grouped_mm_weight_grad.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(ends.shape[0], grad.shape[1], x.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, weight, ends = inputs
    ctx.save_for_backward(x, weight, ends)


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    x, weight, ends = ctx.saved_tensors
    grad_x = grouped_mm(grad, weight.transpose(-2, -1), ends) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(grad, x, ends) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class _Dispatch(torch.autograd.Function):
    """rows[r] = tokens[src[r]] for the rows grouped by expert ([M, D]).

    ``row_of[a]`` is the row of assignment a = token * k + slot (a spare row past the last group,
    always zero, when it was dropped). The backward gathers each assignment's row gradient and
    sums a token's k slots: gathers and one reduction, no scatter-add (PyTorch's CPU kernel for
    that is serial).
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, src: torch.Tensor, row_of: torch.Tensor, k: int):
        ctx.save_for_backward(row_of)
        ctx.k = k
        return tokens.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (row_of,) = ctx.saved_tensors
        per_assignment = grad.index_select(0, row_of)
        return per_assignment.view(-1, ctx.k, grad.shape[1]).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """out[n] = sum_j weights[n, j] * y[row_of[n * k + j]]: each token's k expert outputs, mixed.

    ``assignment_of_row[r]`` inverts ``row_of`` (N * k for padding rows), so the gradient of y
    is a gather too; padding rows get zero.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, row_of: torch.Tensor,
                assignment_of_row: torch.Tensor) -> torch.Tensor:
        picked = y.index_select(0, row_of).view(*weights.shape, y.shape[1])  # [N, k, D]
        ctx.save_for_backward(picked, weights, assignment_of_row)
        return torch.bmm(weights.unsqueeze(1), picked).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        picked, weights, assignment_of_row = ctx.saved_tensors
        N, k, D = picked.shape
        grad_weights = torch.bmm(picked, grad.unsqueeze(-1)).squeeze(-1)
        per_assignment = torch.cat([(weights.unsqueeze(-1) * grad.unsqueeze(1)).view(N * k, D),
                                    grad.new_zeros(1, D)])  # + one zero row for the padding rows
        return per_assignment.index_select(0, assignment_of_row), grad_weights, None, None


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

    def _bias(self, bias: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Each row's expert bias ([E * width] flat); zero for rows past the last group (they stay exactly 0)."""
        per_expert = bias.to(rows.dtype).view(len(self.w_in), -1)
        table = torch.cat([per_expert, per_expert.new_zeros(1, per_expert.shape[1])])
        expert_of_row = torch.searchsorted(ends.long(), torch.arange(len(rows), device=rows.device), right=True)
        return table.index_select(0, expert_of_row)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """``x`` [M, D] grouped by expert, group e ending at row ``ends[e]`` (int32, on the device); returns [M, D]."""
        h = grouped_mm(x, self.w_in.to(x.dtype), ends)
        if self.b_in is not None:
            h = h + self._bias(self.b_in, h, ends)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        y = grouped_mm(h, self.w_out.to(x.dtype), ends)
        if self.b_out is not None:
            y = y + self._bias(self.b_out, y, ends)
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
        # Statistics of the last forward, kept on the device (read on log steps only):
        self.last_load = torch.zeros(cfg.n_routed_experts)  # fraction of assignments per expert
        self.last_dropped = torch.zeros((), dtype=torch.long)  # assignments dropped by the capacity
        self.last_aux: torch.Tensor | None = None
        self._logits = torch.zeros(1, cfg.n_routed_experts)  # router logits of the last forward
        self._capacity_on = True

    @property
    def batch_coupling(self) -> str | None:
        """Why a token's output depends on other sequences of the batch (the doctor reads it); None if it does not."""
        if self.cfg.capacity_factor > 0:
            return (f"model.moe.capacity_factor={self.cfg.capacity_factor:g} drops assignments beyond each expert's "
                    "capacity in batch order")
        return None

    @contextlib.contextmanager
    def uncoupled(self) -> Iterator[None]:
        """No capacity dropping inside (the doctor checks that a batch dependency comes from it alone)."""
        self._capacity_on = False
        try:
            yield
        finally:
            self._capacity_on = True

    def router_entropy(self) -> torch.Tensor:
        """Mean entropy (nats) of the router's softmax over experts in the last forward, a 0-d tensor on the device."""
        probs = self._logits.float().softmax(-1)
        return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()

    @property
    def last_router_entropy(self) -> float:
        """``router_entropy()`` as a float (a host sync: for log steps)."""
        return float(self.router_entropy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, E, k = self.cfg, self.cfg.n_routed_experts, self.cfg.top_k
        # Cast once to the compute dtype (bf16 under autocast on AMX CPUs): the router, the routed
        # and the shared experts all read this copy, so autocast makes no further copies of it.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        N = flat.shape[0]
        A = N * k  # assignments; a = token * k + slot
        logits = self.router(flat)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 in a probe) routing
        scores = logits.softmax(-1) if cfg.score == "softmax" else logits.sigmoid()
        choice = scores + self.balance_bias if cfg.balance == "bias" else scores
        top = choice.topk(k, dim=-1).indices  # [N, k]
        weights = scores.gather(-1, top)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)  # normalised top-k weights

        expert_ids = top.reshape(-1)
        counts = torch.zeros(E, dtype=torch.long, device=x.device)
        counts.index_add_(0, expert_ids, torch.ones_like(expert_ids))  # not bincount: its size depends on the data
        kept = counts
        if cfg.capacity_factor > 0 and self._capacity_on:
            # The first `capacity` assignments of each expert in token order are kept; the others
            # get the key E, sort past every group and read the spare zero row.
            capacity = math.ceil(cfg.capacity_factor * A / E)
            order = expert_ids.argsort(stable=True)
            rank = torch.empty_like(order)  # position of each assignment within its expert's slice
            rank[order] = torch.arange(A, device=x.device) - (counts.cumsum(0) - counts)[expert_ids[order]]
            expert_ids = expert_ids.masked_fill(rank >= capacity, E)
            kept = counts.clamp(max=capacity)
        self.last_dropped = A - kept.sum()

        # Rows grouped by expert, each group padded (see _pad_groups) inside a static number of
        # rows M: kept assignment i in sorted order goes to row group_start[e] + its rank in expert e.
        bucketed = x.device.type == "cpu"
        padded = _pad_groups(kept, bucketed)
        M = _grouped_rows(A, E, bucketed)
        ends = padded.cumsum(0)
        zero = ends.new_zeros(1)
        group_start = torch.cat([ends - padded, zero])  # index E: dropped assignments
        kept_start = torch.cat([kept.cumsum(0) - kept, zero])
        order = expert_ids.argsort(stable=True)
        sorted_experts = expert_ids[order]
        is_kept = sorted_experts < E
        rank = torch.arange(A, device=x.device) - kept_start[sorted_experts]
        rows_sorted = torch.where(is_kept, group_start[sorted_experts] + rank, M - 1)  # M - 1: past every group
        row_of = torch.empty_like(order)
        row_of[order] = rows_sorted
        src = torch.zeros(M, dtype=torch.long, device=x.device)  # padding rows compute token 0, unused
        src[rows_sorted] = order // k
        assignment_of_row = torch.full((M,), A, dtype=torch.long, device=x.device)
        assignment_of_row[rows_sorted] = torch.where(is_kept, order, A)

        rows = _Dispatch.apply(flat, src, row_of, k)  # [M, D]
        y = self.experts(rows, ends.to(torch.int32))
        out = _Combine.apply(y, weights.to(y.dtype), row_of, assignment_of_row)  # [N, D]
        if self.shared is not None:
            out = out + self.shared(flat)

        load = counts.float() / max(1, A)  # before capacity: where the router wanted to send tokens
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
                self.balance_bias.device, self.balance_bias.dtype
            )
