"""Issue 15's GPU checks in one script, for a session that has a CUDA GPU (about 5 minutes on an H200).

Usage::

    python benchmarks/moe_gpu_check.py [--steps 10] [--skip-throughput]

1. **Leak verdict** on the device: ``lm-mla-moe`` (12 x 512, MLA, 2 shared + 6 routed experts,
   top-2) on a random 4 x 1024 batch. It prints what the leak probes measure in the model's own
   fp32 -- the changes that refused this model on an H200 --
   and then the preflight verdict, which re-measures any change in float64. Expected: fp32 changes
   of ~1e-4..1e-2 of max|logit| (shape-dependent kernels), and no causal_leak/batch_leak finding.
2. **Throughput**: ``benchmarks/train_throughput.py --preset lm-mla-moe`` (bf16, torch.compile,
   batch 16 x 1024), which also trains the dense model of the same width and active FLOPs in the
   same run and prints both tokens/s and MFU. Target: MoE MFU >= 0.5 x the dense model's.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import subprocess
import sys
from pathlib import Path

import torch

from scratchlab.config import load_config
from scratchlab.families.registry import build_model

from scratchlab.doctor import leaks

preflight = importlib.import_module("scratchlab.doctor.preflight")


def leak_verdict(device: str = "cuda", preset: str = "lm-mla-moe", seq: int = 1024, vocab: int = 32000) -> None:
    """(A CPU smoke run: ``leak_verdict("cpu", "lm-mla-moe-tiny", 64, 256)``.)"""
    cfg = load_config(preset, [f"model.vocab_size={vocab}", f"train.seq_len={seq}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    tokens = torch.randint(0, vocab, (4, seq + 1), device=device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    probe = copy.deepcopy(model).float()
    ids = batch["input_ids"][: leaks.PERTURB_SAMPLES]
    for name, changes in (("causal", leaks.causal_changes(probe, ids)), ("batch", leaks.batch_changes(probe, ids))):
        rel = [c[-2] / c[-1] for c in changes]
        print(f"fp32 {name} probe: {len(changes)} changes above {leaks.LEAK_RTOL:g} x max|logit|"
              + (f", largest {max(rel):.3g} of max|logit|" if rel else ""))
    del probe
    findings = preflight.preflight(model, batch)
    leak_findings = [f for f in findings if f.code in ("causal_leak", "batch_leak")]
    errors = [f for f in findings if f.severity == "error"]
    print(f"preflight: {len(errors)} errors; leak findings: {[str(f) for f in leak_findings] or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU session")
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    leak_verdict()
    if not args.skip_throughput:
        here = Path(__file__).resolve().parent
        subprocess.run([sys.executable, str(here / "train_throughput.py"), "--preset", "lm-mla-moe", "--precisions",
                        "bf16", "--steps", str(args.steps), "--warmup", "3", "train.device=cuda", "train.compile=true"],
                       check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
