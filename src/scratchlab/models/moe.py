"""Mixture-of-experts FFN: always-on shared experts + routed experts with a learned top-k router.

Dispatch sorts the (token, expert) assignments by expert and runs each expert once on its
slice (a loop over experts, never over tokens), then scatters the weighted outputs back.
Balancing is either the Switch-style auxiliary loss (E * sum_e f_e * P_e) or DeepSeek-V3's
auxiliary-loss-free per-expert bias, which only shifts which experts are *chosen*, never
the weights their outputs get.

A capacity factor > 0 drops assignments beyond ceil(cf * N * k / E) per expert: a token's
output then depends on the other tokens in the batch (the doctor's batch_leak check will
say so), which is why it is off by default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scratchlab.config import MoEConfig
from scratchlab.models.blocks import GeluFFN, SwiGLU


class MoEFFN(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = max(8, round(d_model * cfg.expert_mult))
        expert = SwiGLU if cfg.expert_ffn == "swiglu" else GeluFFN
        self.router = nn.Linear(d_model, cfg.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(expert(d_model, hidden, bias) for _ in range(cfg.n_routed_experts))
        # Shared experts are always on: one FFN as wide as all of them together is the same function.
        self.shared = expert(d_model, hidden * cfg.n_shared_experts, bias) if cfg.n_shared_experts else None
        # Aux-loss-free balancing: added to the scores for the top-k choice only; persistent so resume is exact.
        self.register_buffer("balance_bias", torch.zeros(cfg.n_routed_experts))
        self.last_load = torch.zeros(cfg.n_routed_experts)  # fraction of assignments per expert, last forward
        self.last_aux: torch.Tensor | None = None
        self.last_dropped = 0
        self.last_router_entropy = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, E, k = self.cfg, self.cfg.n_routed_experts, self.cfg.top_k
        flat = x.reshape(-1, x.shape[-1])
        N = flat.shape[0]
        logits = self.router(flat).float()  # [N, E]
        scores = logits.softmax(-1) if cfg.score == "softmax" else logits.sigmoid()
        choice = scores + self.balance_bias if cfg.balance == "bias" else scores
        top = choice.topk(k, dim=-1).indices  # [N, k]
        weights = scores.gather(-1, top)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)  # normalised top-k weights

        expert_ids = top.reshape(-1)
        order = expert_ids.argsort(stable=True)
        expert_ids = expert_ids[order]
        token_ids = torch.arange(N, device=x.device).repeat_interleave(k)[order]
        weights = weights.reshape(-1)[order]
        counts = torch.bincount(expert_ids, minlength=E)

        dropped = 0
        if cfg.capacity_factor > 0:
            capacity = math.ceil(cfg.capacity_factor * N * k / E)
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(len(expert_ids), device=x.device) - starts[expert_ids]
            keep = position < capacity
            dropped = int((~keep).sum())
            expert_ids, token_ids, weights = expert_ids[keep], token_ids[keep], weights[keep]
            kept_counts = torch.bincount(expert_ids, minlength=E)
        else:
            kept_counts = counts

        out = torch.zeros_like(flat)
        for e, (tokens, w) in enumerate(zip(token_ids.split(kept_counts.tolist()), weights.split(kept_counts.tolist()))):
            if len(tokens):
                out.index_add_(0, tokens, self.experts[e](flat[tokens]) * w.unsqueeze(-1).to(flat.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)

        load = counts.float() / max(1, N * k)  # before capacity: where the router wanted to send tokens
        importance = (scores / scores.sum(-1, keepdim=True)).mean(0)  # differentiable: gradients reach the router
        self.last_aux = E * (load * importance).sum() if cfg.balance == "aux_loss" else None
        self.last_load = load.detach()
        self.last_dropped = dropped
        probs = logits.detach().softmax(-1)
        self.last_router_entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        return out.view_as(x)

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free step: nudge under-loaded experts up, over-loaded ones down."""
        if self.cfg.balance == "bias":
            self.balance_bias += self.cfg.bias_update_rate * torch.sign(self.last_load.mean() - self.last_load).to(
                self.balance_bias.device
            )
