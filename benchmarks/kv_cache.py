"""KV-cache bytes per token of the shipped `lm` presets, and of MHA / GQA at the same width.

Usage::

    python benchmarks/kv_cache.py [--dtype-bytes 2]

Counted from the cache the model really allocates for sampling (`model.new_cache`): MLA stores
kv_lora_rank + qk_rope_head_dim values per token and layer (layers/mla.py LatentCache), MHA / GQA
2 x kv_heads x head_dim. No training, no timing: it runs in seconds on any machine.
"""

from __future__ import annotations

import argparse

import torch

from rich.console import Console
from rich.table import Table

from scratchlab.config import load_config, preset_names
from scratchlab.families.registry import build_model


def kv_bytes_per_token(model, dtype_bytes: int) -> int:
    cache = model.new_cache(1, 1)
    if hasattr(cache, "per_token_values"):  # MLA: the latent and the shared rope key
        per_layer = cache.per_token_values()
    else:  # MHA / GQA: keys and values [B, kv_heads, T, head_dim]
        per_layer = 2 * cache.keys[0].shape[1] * cache.keys[0].shape[3]
    return per_layer * len(model.blocks) * dtype_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached value (2 = bf16, 4 = fp32)")
    args = parser.parse_args()
    table = Table(title=f"KV cache, bytes per token ({args.dtype_bytes} B per value, all layers)")
    for column in ("preset", "attention", "layers", "this preset", "MHA, same width"):
        table.add_column(column, justify="left" if column in ("preset", "attention") else "right")
    for name in preset_names():
        cfg = load_config(name)
        if cfg.model.family != "lm":
            continue
        # The cache does not depend on the FFN or the vocabulary: build without experts, tiny vocab.
        shape = cfg.model.model_copy(update={"vocab_size": 64, "moe": cfg.model.moe.model_copy(
            update={"n_routed_experts": 0, "n_shared_experts": 0})})
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = build_model(shape)
            mha = build_model(shape.model_copy(update={"attention": "mha", "n_kv_heads": None}))
        table.add_row(name, shape.attention, str(shape.n_layers), f"{kv_bytes_per_token(model, args.dtype_bytes):,}",
                      f"{kv_bytes_per_token(mha, args.dtype_bytes):,}")
    Console().print(table)


if __name__ == "__main__":
    main()
