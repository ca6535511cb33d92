"""The ``lm`` family: a decoder-only, pre-norm transformer over token ids.

    ids [B, T] -> embedding -> n_layers x Block -> RMSNorm -> head -> logits [B, T, V] * logits_scale
    (-> logit_softcap * tanh(logits / logit_softcap) when the cap is set)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scratchlab.config import ModelConfig
from scratchlab.errors import UserError
from scratchlab.layers.blocks import KVCache, RMSNorm, rope_tables
from scratchlab.layers.decoder import Block
from scratchlab.layers.init import init_weights


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (the trainer fills it from the data)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Value embeddings (modded-nanogpt): a second token embedding, added to every layer's attention values.
        self.value_emb = None
        if cfg.value_embed:
            if cfg.attention != "mha":
                raise UserError("model.value_embed=true needs model.attention=mha; set model.value_embed=false for MLA")
            kv_width = (cfg.n_kv_heads or cfg.n_heads) * (cfg.d_model // cfg.n_heads)
            self.value_emb = nn.Embedding(cfg.vocab_size, kv_width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.d_model // cfg.n_heads
        cos, sin = rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg.init, cfg.init_std, cfg.n_layers)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        # Set by the trainer (train.activation_checkpointing): recompute each block in backward.
        self.activation_checkpointing = False

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.tok_emb(input_ids)
        ve = self.value_emb(input_ids) if self.value_emb is not None else None
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:  # keep only the block's input; redo its forward in backward (same RNG, same autocast)
                x = checkpoint(block, x, cos, sin, None, i, value_embed=ve, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, value_embed=ve)
        if cache is not None:
            cache.length += T
        logits = self.head(self.norm(x))
        if self.cfg.logits_scale != 1.0:
            logits = logits * self.cfg.logits_scale
        if self.cfg.logit_softcap > 0:  # Gemma-2 style: bounds the logits smoothly
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    @torch.no_grad()
    def attention_logit_max(self, input_ids: torch.Tensor) -> float:
        """The largest pre-softmax attention logit over all layers and heads for ``input_ids`` (a probe)."""
        attns = [block.attn for block in self.blocks]
        for attn in attns:
            attn.probe_logit_max = True
        try:
            self(input_ids)
        finally:
            for attn in attns:
                attn.probe_logit_max = False
        return max(attn.last_logit_max for attn in attns)

    # -- mixture of experts (no-ops for a dense model)

    def moe_layers(self) -> list[nn.Module]:
        return [block.ffn for block in self.blocks if hasattr(block.ffn, "update_balance_bias")]

    def moe_load(self) -> list[torch.Tensor]:
        """Per MoE layer, the fraction of routed tokens each expert got in the last forward (the doctor reads it)."""
        return [layer.last_load for layer in self.moe_layers()]

    def aux_loss(self) -> torch.Tensor | None:
        """Load-balance loss of the last forward, already weighted by model.moe.aux_loss_coef; None if none."""
        terms = [layer.last_aux for layer in self.moe_layers() if layer.last_aux is not None]
        return self.cfg.moe.aux_loss_coef * torch.stack(terms).sum() if terms else None

    def after_optimizer_step(self) -> None:
        for layer in self.moe_layers():
            layer.update_balance_bias()

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        attn = self.blocks[0].attn
        ref = self.tok_emb.weight
        if self.cfg.attention == "mla":
            from scratchlab.layers.mla import LatentCache

            m = self.cfg.mla
            return LatentCache(len(self.blocks), batch, max_len or self.cfg.max_seq_len, m.kv_lora_rank,
                               m.qk_rope_head_dim, device=ref.device, dtype=ref.dtype)
        return KVCache(
            len(self.blocks),
            batch,
            attn.n_kv_heads,
            max_len or self.cfg.max_seq_len,
            attn.head_dim,
            device=ref.device,
            dtype=ref.dtype,
        )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if not exclude_embeddings:
            return total
        return total - sum(e.weight.numel() for e in (self.tok_emb, self.value_emb) if e is not None)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x ACTIVE non-embedding params (incl. the head) + attention (PaLM appendix B).

        A token passes through top_k of the n_routed_experts of a MoE layer (plus the shared
        experts and the router), so only those count; tokens dropped by a capacity factor are
        not subtracted (an upper bound). Attention is 6 T x (q.k width + v width) per layer:
        12 L d T for MHA/GQA, and the MLA head dims for latent attention.
        """
        n = self.num_params(exclude_embeddings=True) + (self.head.weight.numel() if self.cfg.tie_embeddings else 0)
        for layer in self.moe_layers():
            routed = sum(p.numel() for p in layer.experts.parameters())
            n -= routed - routed * layer.cfg.top_k // layer.cfg.n_routed_experts
        if self.cfg.attention == "mla":
            m = self.cfg.mla
            width = self.cfg.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        else:
            width = 2 * self.cfg.d_model
        return 6 * n + 6 * self.cfg.n_layers * width * seq_len
