"""Block choices side by side: training tokens/s of dense vs MoE FFNs and of MHA / GQA / MLA attention,
plus KV-cache bytes per token. One process, configs interleaved so machine noise hits all alike.

Usage::

    python benchmarks/blocks.py [--steps N] [--seq-lens 256,1024]

The MoE model has the same *active* FFN parameters per token as the dense one (top-2 of 8
experts, each half the dense hidden width), so their ratio is the routing/dispatch overhead.
Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from scratchlab.config import MLAConfig, ModelConfig, MoEConfig, OptimConfig
from scratchlab.loss import token_loss
from scratchlab.families.registry import build_model
from scratchlab.runtime import autocast, resolve_device, resolve_precision
from scratchlab.train.optim import build_optimizer

BASE = dict(n_layers=4, d_model=256, n_heads=4, vocab_size=4096, ffn="gelu", ffn_mult=4.0)
VARIANTS = {
    "dense MHA": {},
    "MoE (2 of 8, same active)": {"moe": MoEConfig(n_routed_experts=8, top_k=2, expert_mult=2.0)},
    "GQA (2 kv heads)": {"n_kv_heads": 2},
    "MLA": {"attention": "mla", "mla": MLAConfig(q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=48,
                                                  qk_rope_head_dim=16, v_head_dim=64)},
}


def kv_bytes_per_token(model, dtype_bytes: int = 2) -> int:
    cache = model.new_cache(1, 1)
    if hasattr(cache, "per_token_values"):
        per_layer = cache.per_token_values()
    else:
        per_layer = 2 * cache.keys[0].shape[1] * cache.keys[0].shape[3]
    return per_layer * len(model.blocks) * dtype_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-lens", default="256,1024")
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    args = parser.parse_args()
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    console = Console(width=None if sys.stdout.isatty() else 150)  # a log file gets the whole table
    console.print(f"device {device}, precision {precision}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    table = Table(title="training tokens/s by block choice")
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    for column in ("variant", "params", f"MFLOP/token T={seq_lens[0]}", "KV cache B/token (bf16)",
                   *(f"tok/s T={t}" for t in seq_lens), *(f"vs dense T={t}" for t in seq_lens)):
        table.add_column(column, justify="right")
    results: dict[str, dict[int, list[float]]] = {}
    setups = {}
    for seq_len in seq_lens:
        batch = max(1, args.tokens_per_step // seq_len)
        for name, extra in VARIANTS.items():
            torch.manual_seed(0)
            model = build_model(ModelConfig(**{**BASE, "max_seq_len": seq_len, **extra})).to(device)
            setups[(name, seq_len)] = (model, build_optimizer(model, OptimConfig(lr=1e-3)), batch)
        for step in range(args.steps + 1):  # interleaved; the first round is warmup
            for name in VARIANTS:
                model, opt, batch = setups[(name, seq_len)]
                ids = torch.randint(0, 4096, (batch, seq_len + 1), device=device)
                started = time.perf_counter()
                with autocast(device, precision):
                    logits = model(ids[:, :-1])
                loss = token_loss(logits, ids[:, 1:])
                aux = model.aux_loss()
                (loss + aux if aux is not None else loss).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step:
                    results.setdefault(name, {}).setdefault(seq_len, []).append(batch * seq_len / (time.perf_counter() - started))
    dense = [statistics.median(results["dense MHA"][t]) for t in seq_lens]
    for name in VARIANTS:
        model = setups[(name, seq_lens[0])][0]
        rates = [statistics.median(results[name][t]) for t in seq_lens]
        # flops_per_token counts the experts a token is routed to (active), not all of them
        table.add_row(name, f"{model.num_params() / 1e6:.2f}M", f"{model.flops_per_token(seq_lens[0]) / 1e6:.1f}",
                      f"{kv_bytes_per_token(model):,}", *(f"{r:,.0f}" for r in rates),
                      *(f"{r / d:.2f}x" for r, d in zip(rates, dense)))
    console.print(table)


if __name__ == "__main__":
    main()
