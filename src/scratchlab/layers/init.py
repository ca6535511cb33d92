"""Weight initialisation schemes, selected by ``model.init``.

- ``normal``: N(0, init_std) for every matrix and embedding.
- ``xavier``: Xavier-uniform for linear layers, N(0, init_std) for embeddings.
- ``depth_scaled``: ``normal``, with residual output projections (attention out, FFN down)
  at init_std / sqrt(2 * n_layers) so the residual stream does not grow with depth (GPT-2).
- ``truncated_normal``: N(0, init_std) truncated at +-2 std.
Biases start at zero and norm weights at one in every scheme. Modules marked ``zero_init``
(``model.zero_init_out``: attention out-projections and FFN down-projections, expert ``w_out``,
marked by the decoder Block) start at exactly zero in every scheme, so each block starts as the identity. Stacked expert weights
(``GroupedExperts``: [E, out, in]) are initialised as E separate linear layers, their
output projection (``w_out``) counting as a residual output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scratchlab.layers.moe import GroupedExperts

INIT_SCHEMES = ("normal", "xavier", "depth_scaled", "truncated_normal")


def init_weights(model: nn.Module, scheme: str, std: float, n_layers: int) -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    residual_std = std / math.sqrt(2 * n_layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if scheme == "xavier":
                nn.init.xavier_uniform_(module.weight)
            elif scheme == "truncated_normal":
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            else:
                is_residual = scheme == "depth_scaled" and getattr(module, "is_residual_out", False)
                nn.init.normal_(module.weight, std=residual_std if is_residual else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
        elif isinstance(module, GroupedExperts):
            for weight, residual in ((module.w_in, False), (module.w_out, True)):
                _init_stacked(weight, scheme, residual_std if residual and scheme == "depth_scaled" else std)
            if getattr(module, "zero_init", False):
                nn.init.zeros_(module.w_out)
            for b in (module.b_in, module.b_out):
                if b is not None:
                    nn.init.zeros_(b)
        elif isinstance(module, nn.Embedding):
            if scheme == "truncated_normal":
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            else:
                nn.init.normal_(module.weight, std=std)


def _init_stacked(weight: torch.Tensor, scheme: str, std: float) -> None:
    """[E, out, in] matrices, each as an nn.Linear weight (xavier's fans are per expert, not E * out)."""
    if scheme == "xavier":
        bound = math.sqrt(6 / (weight.shape[-1] + weight.shape[-2]))
        nn.init.uniform_(weight, -bound, bound)
    elif scheme == "truncated_normal":
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    else:
        nn.init.normal_(weight, std=std)
