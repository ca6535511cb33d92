"""Transformer building blocks (a leaf: imports nothing of scratchlab): RMSNorm, RoPE, causal attention with a
KV cache, FFNs. The block that stacks them is in decoder.py.

Shapes: B batch, T time, D model width, H query heads, G key/value heads, E head dim.
Attention runs over the TIME axis (field note: one model summed over the head dim),
through ``F.scaled_dot_product_attention`` with a causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



class RMSNorm(nn.Module):
    """Standard RMSNorm over the feature dim: x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same dtype as x (bf16 under autocast) so the fused kernel runs; a no-op in fp32.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim/2] for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim; x is [B, heads, T, E], cos/sin [T, E/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class KVCache:
    """Preallocated keys/values for every layer; ``length`` tokens are filled."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *, device, dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        # [batch, max_len] bool, False = a left-padding slot (prompts of different lengths in one batch)
        self.key_mask: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def visible_keys(T: int, S: int, past: int, device, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which of S keys the T queries at positions past..past+T-1 see: [T, S] causal, or with ``key_mask``
    ([B, >= S], False = padding) [B, 1, T, S] with padding hidden; a query always sees itself, so a
    padding query's row is never all -inf (NaN) and a real query never sees padding."""
    keys = torch.arange(S, device=device)[None, :]
    queries = (past + torch.arange(T, device=device))[:, None]
    visible = keys <= queries
    if key_mask is None:
        return visible
    return (visible & key_mask[:, None, None, :S]) | (keys == queries)


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        bias: bool,
        *,
        qk_norm: bool = False,
        softcap: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.proj.is_residual_out = True  # depth-scaled init targets these
        # QK-norm: RMSNorm of each head's query and key (over the head dim) bounds attention logits.
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.softcap = softcap  # > 0: logits -> softcap * tanh(logits / softcap) before the softmax
        # The doctor's probe: when set, forward also records the largest pre-softmax logit
        # (SDPA never materialises them, so this costs an extra matmul and is off in training).
        self.probe_logit_max = False
        self.last_logit_max: float | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``value_embed`` [B, T, G * E]: added to the values (modded-nanogpt's value embeddings), if given."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        if value_embed is not None:
            v = v + value_embed.to(v.dtype)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, E]: attention over T
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        past, key_mask = 0, None
        if cache is not None:
            past, key_mask = cache.length, cache.key_mask
            k, v = cache.update(layer, k, v)
        gqa = self.n_kv_heads != self.n_heads
        if self.probe_logit_max:
            self.last_logit_max = self._logit_max(q, k, past, key_mask)
        if self.softcap > 0:
            y = self._capped_attention(q, k, v, past, key_mask)
        elif past == 0 and key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # Query i sits at absolute position past+i and may see keys 0..past+i (not padding).
            mask = visible_keys(T, k.shape[2], past, x.device, key_mask)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


    def _scores(self, q: torch.Tensor, k: torch.Tensor, past: int, cap: float = 0.0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax logits q.k / sqrt(E) [B, H, T, S] (soft-capped when cap > 0), -inf in the future."""
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-2, -1)) / self.head_dim**0.5
        if cap > 0:
            scores = cap * torch.tanh(scores / cap)
        T, S = scores.shape[-2:]
        return scores.masked_fill(~visible_keys(T, S, past, q.device, key_mask), float("-inf"))

    def _logit_max(self, q: torch.Tensor, k: torch.Tensor, past: int, key_mask: torch.Tensor | None = None) -> float:
        """Largest q.k / sqrt(E) over heads and the causally visible (query, key) pairs (before any cap)."""
        return float(self._scores(q.float(), k.float(), past, key_mask=key_mask).amax())

    def _capped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                          key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention with tanh soft-capped logits (SDPA has no cap, so the scores are materialised)."""
        scores = self._scores(q, k, past, cap=self.softcap, key_mask=key_mask)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        return scores.softmax(dim=-1).to(v.dtype) @ v


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.down.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluFFN(nn.Module):
    """down(gelu(up(x))); with ``affine``, gelu(a * h + b) with a learned per-channel a (from 1) and b (from 0)."""

    def __init__(self, d_model: int, hidden: int, bias: bool, affine: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.down.is_residual_out = True
        self.act_scale = nn.Parameter(torch.ones(hidden)) if affine else None
        self.act_shift = nn.Parameter(torch.zeros(hidden)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.act_scale is not None:
            h = h * self.act_scale + self.act_shift
        return self.down(F.gelu(h))


class ReLU2FFN(nn.Module):
    """down(relu(up(x))^2): the squared-ReLU MLP (Primer; the modded-nanogpt speedrun)."""

    def __init__(self, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.down.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


def ffn_hidden(d_model: int, ffn: str, mult: float) -> int:
    """SwiGLU has three matrices, so its hidden width is 2/3 of the GELU one (equal params), rounded to 32."""
    hidden = d_model * mult * (2 / 3 if ffn == "swiglu" else 1)
    return max(32, int(round(hidden / 32)) * 32)
