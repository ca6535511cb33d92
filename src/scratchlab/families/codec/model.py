"""The ``codec_lm`` family: a decoder over K parallel codebooks of audio-codec tokens (MusicGen / Dia style).

    codes [B, T, K] (delay-interleaved, ids < codebook_size + 3: the codes plus BOS/PAD/EOS)
      -> sum_k embedding_k(codes[..., k])                    [B, T, D]
      -> n_layers x (self-attention over T, causal;
                     cross-attention to the text encoder's output when conditioned;
                     FFN)
      -> RMSNorm -> K heads                                  logits [B, T, K, codebook_size + 3]

The condition is the manifest's text and tags as UTF-8 bytes (families/codec/data.py), encoded by a
small bidirectional transformer over bytes (``TextEncoder``). The unconditional case is
the condition with no bytes (only the COND_BOS byte), which is what classifier-free
guidance contrasts with. The pattern (which stream position holds which frame of which
codebook) lives in families/codec/patterns.py and the data layer; the model never sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scratchlab.config import ModelConfig
from scratchlab.layers.blocks import KVCache, RMSNorm, SwiGLU, ffn_hidden, rope_tables
from scratchlab.layers.decoder import Block, require_dense_blocks
from scratchlab.layers.init import init_weights

from scratchlab.families.codec.conditioning import COND_BOS, COND_VOCAB
from scratchlab.families.codec.patterns import SpecialIds  # BOS, PAD, EOS live above the codebook



class Attention(nn.Module):
    """Non-causal multi-head attention of x over ``memory`` (itself for self-attention), with a key mask."""

    def __init__(self, d_model: int, d_memory: int, n_heads: int, bias: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_memory, 2 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj.is_residual_out = True

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v  # [B, H, S, E] each

    def forward(
        self,
        x: torch.Tensor,
        memory_mask: torch.Tensor,
        memory: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, D = x.shape
        k, v = kv if kv is not None else self.keys_values(x if memory is None else memory)
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        mask = memory_mask[:, None, None, :]  # [B, 1, 1, S]: True = attend
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class TextEncoder(nn.Module):
    """Bidirectional pre-norm transformer over condition bytes [B, C] -> [B, C, text_d_model]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.codec
        d = c.text_d_model
        self.emb = nn.Embedding(COND_VOCAB, d)
        self.pos = nn.Embedding(c.max_text_bytes + 1, d)  # + COND_BOS
        self.layers = nn.ModuleList()
        for _ in range(c.text_layers):
            layer = nn.Module()
            layer.attn_norm, layer.attn = RMSNorm(d, cfg.norm_eps), Attention(d, d, c.text_heads, cfg.bias)
            layer.ffn_norm, layer.ffn = RMSNorm(d, cfg.norm_eps), SwiGLU(d, ffn_hidden(d, "swiglu", 4.0), cfg.bias)
            self.layers.append(layer)
        self.norm = RMSNorm(d, cfg.norm_eps)

    def forward(self, cond_ids: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
        C = cond_ids.shape[1]
        x = self.emb(cond_ids) + self.pos(torch.arange(C, device=cond_ids.device))
        for layer in self.layers:
            x = x + layer.attn(layer.attn_norm(x), cond_mask)
            x = x + layer.ffn(layer.ffn_norm(x))
        return self.norm(x)


class DecoderBlock(Block):
    """The foundation's Block with a cross-attention sub-layer between self-attention and the FFN."""

    def __init__(self, cfg: ModelConfig, cross: bool) -> None:
        super().__init__(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cross else None
        self.cross = Attention(cfg.d_model, cfg.codec.text_d_model, cfg.n_heads, cfg.bias) if cross else None

    def forward(self, x, cos, sin, cache=None, layer=0, memory=None, memory_mask=None, memory_kv=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), memory_mask, memory=memory, kv=memory_kv)
        return x + self.ffn(self.ffn_norm(x))


class CodecLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.codec
        if c.n_codebooks is None or c.codebook_size is None:
            raise ValueError("model.codec.n_codebooks and codebook_size must be set (the trainer fills them from the data)")
        require_dense_blocks(cfg, "codec")
        self.cfg = cfg
        self.n_codebooks, self.n_classes = c.n_codebooks, SpecialIds.for_codebook(c.codebook_size).n_classes
        d = cfg.d_model
        self.embs = nn.ModuleList(nn.Embedding(self.n_classes, d) for _ in range(self.n_codebooks))
        self.conditioned = c.conditioning == "text"
        self.text = TextEncoder(cfg) if self.conditioned else None
        self.blocks = nn.ModuleList(DecoderBlock(cfg, self.conditioned) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.heads = nn.Linear(d, self.n_codebooks * self.n_classes, bias=False)  # K heads as one matmul
        cos, sin = rope_tables(d // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg.init, cfg.init_std, cfg.n_layers)
        # Set by the trainer (train.activation_checkpointing): recompute each decoder block in backward.
        self.activation_checkpointing = False

    def encode_condition(self, cond_ids: torch.Tensor | None, cond_mask: torch.Tensor | None):
        """Text memory [B, C, Dt] and its mask, or (None, None) for an unconditioned model."""
        if self.text is None or cond_ids is None:
            return None, None
        if cond_mask is None:
            cond_mask = torch.ones_like(cond_ids, dtype=torch.bool)
        return self.text(cond_ids, cond_mask), cond_mask

    def forward(
        self,
        codes: torch.Tensor,
        cond_ids: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, K = codes.shape
        if K != self.n_codebooks:
            raise ValueError(f"codes have {K} codebooks, the model {self.n_codebooks}")
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} frames exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = sum(emb(codes[..., k]) for k, emb in enumerate(self.embs))
        memory, memory_mask, cross_kv = None, None, [None] * len(self.blocks)
        if self.conditioned:
            if cache is not None and getattr(cache, "cross", None) is not None:
                cross_kv, memory_mask = cache.cross  # the condition is encoded once per generation
            else:
                if cond_ids is None:  # unconditional: the empty condition, as trained with uncond_prob
                    cond_ids = torch.full((B, 1), COND_BOS, dtype=torch.long, device=codes.device)
                memory, memory_mask = self.encode_condition(cond_ids, cond_mask)
                if cache is not None:
                    cross_kv = [block.cross.keys_values(memory) for block in self.blocks]
                    cache.cross = (cross_kv, memory_mask)
                    memory = None
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:  # keep only the block's input; redo its forward in backward
                x = checkpoint(block, x, cos, sin, None, i, memory=memory, memory_mask=memory_mask,
                               memory_kv=cross_kv[i], use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, memory=memory, memory_mask=memory_mask, memory_kv=cross_kv[i])
        if cache is not None:
            cache.length += T
        return self.heads(self.norm(x)).view(B, T, K, self.n_classes)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        attn, ref = self.blocks[0].attn, self.heads.weight
        cache = KVCache(len(self.blocks), batch, attn.n_kv_heads, max_len or self.cfg.max_seq_len, attn.head_dim,
                        device=ref.device, dtype=ref.dtype)
        cache.cross = None
        return cache

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= sum(e.weight.numel() for e in self.embs)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per frame (all K codebooks): 6 x decoder params + attention; the text encoder is small."""
        n = self.num_params(exclude_embeddings=True) - (sum(p.numel() for p in self.text.parameters()) if self.text else 0)
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len
