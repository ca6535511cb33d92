"""MoE dispatch A/B on CPU: dense vs this checkout's MoE vs the MoE of another commit, in ONE process.

Usage::

    python benchmarks/moe_ab.py [--ref 8aec229] [--seq 256] [--steps 8]

The three models (blocks.py's shape: 4 x 256, vocab 4096; the MoE routes to 2 of 8 GELU experts
of half the dense width: same active FLOPs) train with their steps interleaved, bf16 autocast,
4,096 tokens a step; the old ``MoEFFN`` (``git show REF:src/scratchlab/layers/moe.py``) is swapped
into a copy of the new MoE model with the same weights. Prints median tokens/s and ratios to dense.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from scratchlab.config import ModelConfig, MoEConfig, OptimConfig
from scratchlab.families.registry import build_model
from scratchlab.loss import token_loss
from scratchlab.runtime import autocast
from scratchlab.train.optim import build_optimizer


def old_moe_module(ref: str):
    source = subprocess.run(["git", "show", f"{ref}:src/scratchlab/layers/moe.py"], check=True, capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "old_moe.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="8aec229")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    old = old_moe_module(args.ref)
    base = dict(n_layers=4, d_model=256, n_heads=4, vocab_size=4096, ffn="gelu", ffn_mult=4.0, max_seq_len=args.seq)
    moe = MoEConfig(n_routed_experts=8, top_k=2, expert_mult=2.0)
    models = {}
    torch.manual_seed(0)
    models["dense"] = build_model(ModelConfig(**base))
    torch.manual_seed(0)
    models["MoE (this checkout)"] = build_model(ModelConfig(**base, moe=moe))
    torch.manual_seed(0)
    swapped = build_model(ModelConfig(**base, moe=moe))
    for block in swapped.blocks:
        layer = old.MoEFFN(base["d_model"], moe, False)
        layer.load_state_dict(block.ffn.state_dict())
        block.ffn = layer
    models[f"MoE ({args.ref})"] = swapped
    optimizers = {name: build_optimizer(m, OptimConfig(lr=1e-3)) for name, m in models.items()}
    batch = max(1, 4096 // args.seq)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.steps + 1):  # the first round is warmup
        for name, model in models.items():
            ids = torch.randint(0, base["vocab_size"], (batch, args.seq + 1))
            started = time.perf_counter()
            with autocast(torch.device("cpu"), "bf16"):
                logits = model(ids[:, :-1])
            loss = token_loss(logits, ids[:, 1:])
            aux = model.aux_loss()
            (loss + aux if aux is not None else loss).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:
                rates[name].append(batch * args.seq / (time.perf_counter() - started))
    dense = statistics.median(rates["dense"])
    for name in models:
        rate = statistics.median(rates[name])
        print(f"T={args.seq} {name:22s} {rate:9,.0f} tok/s  {rate / dense:.2f}x dense")


if __name__ == "__main__":
    main()
