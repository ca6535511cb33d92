"""Multi-head latent attention (DeepSeek-V2), over the time axis, causal.

    queries:  x -> [W_dq -> RMSNorm ->] W_uq -> per head (q_nope | q_rope)
    keys/values: x -> W_dkv -> (c_kv | k_rope);  c_kv -> RMSNorm -> W_ukv -> per head (k_nope | v)
    k = (k_nope | k_rope shared by all heads);  RoPE only on the *_rope parts (decoupled RoPE)

The KV cache stores only c_kv and the roped k_rope: (kv_lora_rank + qk_rope_head_dim)
values per token and layer, instead of 2 x heads x head_dim. Keys and values are
re-expanded from the cached latent at each step (simple and exact; the "absorbed" matmul
trick of DeepSeek is a speed optimisation left for later).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlab.config import MLAConfig
from scratchlab.layers.blocks import RMSNorm, apply_rope, visible_keys


class LatentCache:
    """Per layer: the normalised kv latent [B, S, R] and the roped shared key [B, S, Rr]."""

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_rank: int, rope_dim: int, *, device, dtype):
        self.latents = [torch.zeros(batch, max_len, kv_rank, device=device, dtype=dtype) for _ in range(n_layers)]
        self.rope_keys = [torch.zeros(batch, max_len, rope_dim, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.key_mask: torch.Tensor | None = None  # as KVCache.key_mask: False = a left-padding slot

    def per_token_values(self) -> int:
        return self.latents[0].shape[-1] + self.rope_keys[0].shape[-1]

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.latents[layer][:, start:end] = latent
        self.rope_keys[layer][:, start:end] = rope_key
        return self.latents[layer][:, :end], self.rope_keys[layer][:, :end]


class LatentAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, cfg: MLAConfig, bias: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.n_heads, self.cfg = n_heads, cfg
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_down = nn.Linear(d_model, cfg.q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps)
            self.q_up = nn.Linear(cfg.q_lora_rank, n_heads * qk_dim, bias=bias)
        else:
            self.q_proj = nn.Linear(d_model, n_heads * qk_dim, bias=bias)
        self.kv_down = nn.Linear(d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps)
        self.kv_up = nn.Linear(cfg.kv_lora_rank, n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=bias)
        self.proj = nn.Linear(n_heads * cfg.v_head_dim, d_model, bias=bias)
        self.proj.is_residual_out = True
        self.probe_logit_max = False  # the doctor's probe, as in CausalSelfAttention
        self.last_logit_max: float | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0):
        B, T, _ = x.shape
        c, H = self.cfg, self.n_heads
        q = self.q_up(self.q_norm(self.q_down(x))) if c.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, H, -1).transpose(1, 2)  # [B, H, T, nope + rope]
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)

        latent, rope_key = self.kv_down(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_norm(latent)
        rope_key = apply_rope(rope_key.unsqueeze(1), cos, sin).squeeze(1)  # [B, T, rope]: one key for all heads
        past, key_mask = 0, None
        if cache is not None:
            past, key_mask = cache.length, cache.key_mask
            latent, rope_key = cache.update(layer, latent, rope_key)
        S = latent.shape[1]
        kv = self.kv_up(latent).view(B, S, H, -1).transpose(1, 2)  # [B, H, S, nope + v]
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, rope_key.unsqueeze(1).expand(B, H, S, c.qk_rope_head_dim)], dim=-1)

        visible = None
        if self.probe_logit_max or past > 0 or key_mask is not None:  # training uses SDPA's own causal mask
            visible = visible_keys(T, S, past, x.device, key_mask)
        if self.probe_logit_max:
            scores = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
            self.last_logit_max = float(scores.masked_fill(~visible, float("-inf")).amax())
        if past == 0 and key_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * c.v_head_dim))
