"""The decoder block every family stacks: pre-norm attention (MHA/GQA or MLA) and FFN (dense or MoE).

The factories pick the attention and FFN from the model config; the pieces themselves live in
blocks.py (a leaf), mla.py and moe.py, so nothing here is imported back by them.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlab.config import ModelConfig
from scratchlab.errors import UserError
from scratchlab.layers.blocks import CausalSelfAttention, GeluFFN, KVCache, ReLU2FFN, RMSNorm, SwiGLU, ffn_hidden
from scratchlab.layers.mla import LatentAttention
from scratchlab.layers.moe import MoEFFN


def require_dense_blocks(cfg: ModelConfig, family: str) -> None:
    """One line naming the lm-only block switches a family built from dense MHA/GQA blocks cannot honour
    (silently ignoring them would train another model than the config says)."""
    lm_only = [name for name, on in (("model.moe.n_routed_experts", cfg.moe.n_routed_experts),
                                     ("model.attention=mla", cfg.attention != "mha"),
                                     ("model.value_embed", cfg.value_embed)) if on]
    if lm_only:
        raise UserError(f"the {family} family uses dense MHA/GQA blocks; {', '.join(lm_only)} "
                        f"{'is' if len(lm_only) == 1 else 'are'} lm-only: remove {'it' if len(lm_only) == 1 else 'them'}")


def make_attention(cfg: ModelConfig) -> nn.Module:
    """The attention of one block: latent attention (``model.attention=mla``) or MHA/GQA."""
    if cfg.attention == "mla":
        return LatentAttention(cfg.d_model, cfg.n_heads, cfg.mla, cfg.bias, eps=cfg.norm_eps)
    return CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.bias,
                               qk_norm=cfg.qk_norm, softcap=cfg.attn_softcap, eps=cfg.norm_eps)


def make_ffn(cfg: ModelConfig) -> nn.Module:
    """The FFN of one block: a mixture of experts (``model.moe.n_routed_experts`` > 0) or a dense FFN."""
    if cfg.moe.n_routed_experts:
        return MoEFFN(cfg.d_model, cfg.moe, cfg.bias)
    hidden = ffn_hidden(cfg.d_model, cfg.ffn, cfg.ffn_mult)
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg.d_model, hidden, cfg.bias)
    if cfg.ffn == "relu2":
        return ReLU2FFN(cfg.d_model, hidden, cfg.bias)
    return GeluFFN(cfg.d_model, hidden, cfg.bias, affine=cfg.ffn == "gelu_affine")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = make_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = make_ffn(cfg)
        if cfg.zero_init_out:  # residual output projections start at 0 (layers/init.py honours the mark)
            for module in self.modules():
                if getattr(module, "is_residual_out", False) or hasattr(module, "w_out"):
                    module.zero_init = True

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0,
                value_embed: torch.Tensor | None = None) -> torch.Tensor:
        if value_embed is None:  # attentions without value embeddings (MLA) keep their signature
            x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        else:
            x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, value_embed=value_embed)
        return x + self.ffn(self.ffn_norm(x))
