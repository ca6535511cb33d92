"""Concrete `lm` model shapes (layers, width, heads) whose non-embedding parameters hit a target N.

Parameters are counted on the real modules, built on the meta device (no memory, no
init cost), so the counts follow scratchlab's `lm` family exactly: SwiGLU/GELU widths,
GQA, biases, QK-norm, tied or untied head (an untied head counts as non-embedding, as in
``TransformerLM.num_params(exclude_embeddings=True)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from scratchlab.config import ModelConfig
from scratchlab.errors import UserError

# Depth/width choices: width / depth ratios. Kaplan et al. 2020 (fig. 5) found the loss within a
# few percent over a wide range of aspect ratios at fixed N; these span common practice
# (GPT-2 small: 64, Chinchilla 70B: ~102, GPT-3 175B / LLaMA-7B: 128).
ASPECT_TARGETS = {"deep": 48.0, "balanced": 80.0, "wide": 128.0}
MAX_LAYERS = 256


@dataclass(frozen=True)
class Shape:
    label: str
    n_layers: int
    d_model: int
    n_heads: int
    ffn_hidden: int
    non_embedding_params: int
    total_params: int
    target: float
    flops_per_token: float  # training FLOPs per token at the seq_len given (6N + attention)

    @property
    def error(self) -> float:
        """Relative error of the non-embedding parameter count against the target."""
        return self.non_embedding_params / self.target - 1.0

    @property
    def aspect(self) -> float:
        return self.d_model / self.n_layers

    def overrides(self) -> list[str]:
        return [f"model.n_layers={self.n_layers}", f"model.d_model={self.d_model}", f"model.n_heads={self.n_heads}"]


def head_dim_for(d_model: int) -> int:
    return 32 if d_model < 256 else 64 if d_model < 2048 else 128


def _width_step(d_model: int) -> int:
    # Coarser steps for wide models keep head counts even (below 4096) or multiples of 4 (above).
    return 32 if d_model < 256 else 64 if d_model < 1024 else 128 if d_model < 4096 else 512


def _layer_config(base: ModelConfig, d_model: int, n_layers: int, vocab_size: int) -> ModelConfig:
    n_heads = max(1, d_model // head_dim_for(d_model))
    update: dict = {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "vocab_size": vocab_size}
    if base.n_kv_heads:  # keep the base's GQA group size when it divides
        group = max(1, base.n_heads // base.n_kv_heads)
        update["n_kv_heads"] = n_heads // group if n_heads % group == 0 else n_heads
    return base.model_copy(update=update)


@lru_cache(maxsize=4096)
def _counts(base_json: str, d_model: int, vocab_size: int) -> tuple[int, int, int, int]:
    """(params per block, final norm params, untied head params, ffn hidden) for this width, on meta."""
    from scratchlab.layers.blocks import RMSNorm, ffn_hidden
    from scratchlab.layers.decoder import Block

    base = ModelConfig.model_validate_json(base_json)
    cfg = _layer_config(base, d_model, 1, vocab_size)
    with torch.device("meta"):
        block = sum(p.numel() for p in Block(cfg).parameters())
        norm = sum(p.numel() for p in RMSNorm(d_model).parameters())
    head = 0 if cfg.tie_embeddings else vocab_size * d_model
    return block, norm, head, ffn_hidden(d_model, cfg.ffn, cfg.ffn_mult)


def _shape(base: ModelConfig, d_model: int, n_layers: int, vocab_size: int, target: float, label: str,
           seq_len: int) -> Shape:
    block, norm, head, hidden = _counts(base.model_dump_json(), d_model, vocab_size)
    non_emb = n_layers * block + norm + head
    total = non_emb + vocab_size * d_model
    # TransformerLM.flops_per_token: 6 x (non-embedding + head) + 12 L d T for attention (PaLM appendix B)
    with_head = non_emb + (vocab_size * d_model if base.tie_embeddings else 0)
    flops = 6 * with_head + 12 * n_layers * d_model * seq_len
    cfg = _layer_config(base, d_model, n_layers, vocab_size)
    return Shape(label, n_layers, d_model, cfg.n_heads, hidden, non_emb, total, target, float(flops))


def shape_for(base: ModelConfig, d_model: int, n_layers: int, vocab_size: int, seq_len: int = 2048) -> Shape:
    """The Shape of one given (depth, width), counted like the candidates."""
    s = _shape(base, d_model, n_layers, vocab_size, 0.0, "given", seq_len)
    return Shape(s.label, s.n_layers, s.d_model, s.n_heads, s.ffn_hidden, s.non_embedding_params,
                 s.total_params, float(s.non_embedding_params), s.flops_per_token)


def candidate_shapes(n_target: float, vocab_size: int, base: ModelConfig | None = None, tolerance: float = 0.10,
                     seq_len: int = 2048) -> list[Shape]:
    """Every (width, depth) on the grid whose non-embedding params are within ``tolerance`` of n_target.

    Widths step by 32 (below 256), 64 (below 1024), 128 (below 4096), then 512; heads are 32 wide below
    256, 64 below 2048, else 128.
    """
    if not (n_target > 0 and math.isfinite(n_target)):
        raise UserError(f"target parameter count must be positive (got {n_target!r})")
    base = base or ModelConfig()
    out = []
    d = 32
    while d <= 65536:
        block, norm, head, _ = _counts(base.model_dump_json(), d, vocab_size)
        if norm + head + block > n_target * (1 + tolerance):
            break  # one layer of this width is already too big, and wider only grows
        layers = max(1, round((n_target - norm - head) / block))
        if layers <= MAX_LAYERS:
            s = _shape(base, d, layers, vocab_size, n_target, "", seq_len)
            if abs(s.error) <= tolerance:
                out.append(s)
        d += _width_step(d)
    return out


def pick_shapes(n_target: float, vocab_size: int, base: ModelConfig | None = None, tolerance: float = 0.10,
                seq_len: int = 2048, targets: dict[str, float] | None = None) -> list[Shape]:
    """One shape per aspect-ratio target (deep, balanced, wide): the candidate nearest that d_model/n_layers.

    Returns fewer than three when the grid has fewer distinct widths (tiny N), labelled "option i".
    """
    targets = targets or ASPECT_TARGETS
    candidates = candidate_shapes(n_target, vocab_size, base, tolerance, seq_len)
    if not candidates:
        raise UserError(
            f"no lm shape has {n_target:,.0f} non-embedding parameters within {tolerance:.0%} "
            "(the smallest is one layer of width 32); raise the budget"
        )
    picked: list[Shape] = []
    for ratio in targets.values():
        pool = [c for c in candidates if all(c.d_model != p.d_model for p in picked)]
        if pool:  # tiny targets may have fewer than three distinct widths
            picked.append(min(pool, key=lambda c: (abs(math.log(c.aspect / ratio)), abs(c.error))))
    picked.sort(key=lambda c: c.aspect)
    labels = list(targets) if len(picked) == len(targets) else [f"option {i + 1}" for i in range(len(picked))]
    return [Shape(label, s.n_layers, s.d_model, s.n_heads, s.ffn_hidden, s.non_embedding_params, s.total_params,
                  n_target, s.flops_per_token) for label, s in zip(labels, picked)]
