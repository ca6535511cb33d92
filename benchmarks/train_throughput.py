"""Training throughput of a preset's model, at fp32 and at bf16 autocast, against this machine's matmul speed.

Usage::

    python benchmarks/train_throughput.py [--preset tiny-lm] [--steps N] [--warmup N] [--json] [section.key=value ...]
    python benchmarks/train_throughput.py --gpu-124m [--gpu h100] [section.key=value ...]   # on a CUDA GPU

``--gpu-124m`` is the GPU benchmark of issue 8: a 123.6M-parameter dense decoder (GPT-2 small's
shape: 12 layers, d_model 768, 12 heads, vocab 50304, tied embeddings; SwiGLU at 2/3 of 4x width
has the same parameter count as GPT-2's GELU MLP) at seq 1024, batch 16, bf16 autocast and
``torch.compile``, reporting tokens/s and the **MFU**: achieved FLOP/s over the GPU's dense bf16 peak
from ``scratchlab.scaling.gpus`` (recognised from the device name, or given with ``--gpu NAME`` /
``--peak-flops F``). Overrides still apply (``train.batch_size=32``, ``train.compile=false`` to see
what compile buys, ``train.device=cpu model.n_layers=1 ...`` to try the code path without a GPU,
where no MFU is reported).

What it measures, for each precision (fp32 and bf16 autocast; bf16 is skipped with a note where
the device cannot run it):

- **tokens/s of full training steps**: the trainer's own step (``Trainer.train_step`` in
  ``scratchlab.train.loop``, minus data loading and logging): forward under ``autocast``,
  ``token_loss``, backward, ``loss.item()``, gradient-norm clipping and the AdamW step of
  ``build_optimizer`` (fused on CUDA, as the trainer does), on random token batches of
  ``train.batch_size x train.seq_len`` (``train.grad_accum`` micro-batches per step). Each
  precision trains its own model, built from the same seed. Each step is timed on its own (the
  device synchronised); the figure is the median over ``--steps`` timed steps that follow
  ``--warmup`` untimed ones. Steps of the two precisions alternate, so that other load on the
  machine slows both alike and their ratio stays fair.
- **achieved FLOP/s** = ``model.flops_per_token(seq_len) x tokens/s``: 6 x non-embedding
  parameters (the output head included) + the attention term, per PaLM's appendix B. Attention
  is counted over the full T x T matrix, as that formula does, although causal attention needs
  about half of it.
- **matmul FLOP/s**: square ``N x N`` matmuls in the same dtype (fp32 or bf16), in the same run,
  after the training steps: the median of several timings of ``2 N^3`` FLOPs (the dtypes again
  alternate). This is the ceiling this machine reaches on easy, dense work right now, with these
  threads and whatever else is running; it is not a figure from a spec sheet.
- **achieved / matmul**: a CPU-friendly "MFU": the fraction of the measured matmul speed that
  training reaches. It is below 1 because a training step is more than large matmuls: a tiny
  model's matmuls are small (low arithmetic intensity), and norms, RoPE, softmax, the fp32
  cross-entropy over the vocabulary, the bf16 casts, the optimizer update (fp32 master weights and
  AdamW state at every precision) and Python overhead are memory-bound work that the FLOP count
  leaves out. Compare it across precisions, presets and machines, not against 100 %.
- **bf16 / fp32**: training tokens/s at bf16 over tokens/s at fp32 (above 1: bf16 autocast trains
  faster here), next to the same ratio for the plain matmuls. The training ratio is far below the
  matmul one when the step is dominated by the memory-bound work above, which bf16 autocast does
  not speed up (or slows, with its casts). On CPUs without AMX or AVX512-BF16, bf16 is emulated
  and the ratio is usually below 1; that is why ``train.precision=auto`` picks fp32 there (the
  header shows its choice on this machine).

**MoE presets** (``model.moe.n_routed_experts`` > 0, e.g. ``--preset lm-mla-moe``) also train, in the
same run and with their steps alternating, the dense model of the same width whose FFN has the
same *active* FLOPs (hidden = (shared + top_k) x the expert width, ``dense_reference``), and print
both models' tokens/s and MFU side by side with their ratio (``--no-dense-reference`` skips it).

Dotted overrides apply to the preset as in ``scratchlab train`` (``train.batch_size=8``,
``model.n_layers=2``, ``train.device=cpu``, ``train.threads=4``). ``model.vocab_size`` is taken
from the config, else 4096 (the tiny-lm tokenizer's size). Torch's thread count is left as it is
unless ``train.threads`` is set, exactly as training does, and printed. Figures are noisy when other
processes share the CPU: the step-time range (min-max) shows how much, and the header gives the CPU
time the process got while training, in cores. Well below the thread count (a note says so), other
load has likely crowded it out: threads then wait on each other and steps can slow several-fold.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from scratchlab.config import Config, load_config
from scratchlab.errors import UserError
from scratchlab.loss import token_loss
from scratchlab.families.registry import build_model
from scratchlab.scaling.gpus import PEAK_BF16_FLOPS, peak_flops
from scratchlab.runtime import (
    autocast,
    cpu_has_fast_bf16,
    resolve_device,
    resolve_precision,
)
from scratchlab.train.optim import build_optimizer, clip_threshold_at

Operands = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a, b and the output buffer of a matmul

DEFAULT_VOCAB = 4096
PRECISIONS = ("fp32", "bf16")
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_SAMPLES = 7
MATMUL_MIN_SAMPLE_S = 0.05  # one matmul timing repeats the matmul until it spans at least this long
CONTENDED_FRACTION = 0.6  # below this share of its threads in CPU time, the process was likely crowded out
# --gpu-124m: GPT-2 small's shape (123.6M params with tied embeddings) at seq 1024, bf16, compiled.
GPU_124M = [
    "model.n_layers=12", "model.d_model=768", "model.n_heads=12", "model.vocab_size=50304",
    "model.max_seq_len=1024", "train.seq_len=1024", "train.batch_size=16", "train.grad_accum=1",
    "train.device=cuda", "train.precision=bf16", "train.compile=true",
]


@dataclass
class Session:
    """One precision's model, optimizer and batch stream."""

    precision: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    forward: nn.Module | None = None  # torch.compile(model) with train.compile, else the model


@dataclass
class StepTimes:
    """Seconds of each timed training step, and how many of them were non-finite (update skipped)."""

    seconds: list[float] = field(default_factory=list)
    nonfinite: int = 0


@dataclass
class PrecisionResult:
    precision: str
    steps: int
    step_s_median: float
    step_s_min: float
    step_s_max: float
    tokens_per_s: float
    achieved_flops_per_s: float
    matmul_flops_per_s: float
    achieved_over_matmul: float
    nonfinite_steps: int
    peak_flops_per_s: float | None = None  # the GPU's dense bf16 peak (datasheet), when known
    mfu: float | None = None  # achieved / peak: model FLOPs utilisation


# ---------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training tokens/s and FLOP/s at fp32 and bf16 autocast, against measured matmul FLOP/s.",
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=8")
    parser.add_argument("--preset", default="tiny-lm", help="preset name or YAML config path (default: tiny-lm)")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per precision (default: 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps before them (default: 3)")
    parser.add_argument(
        "--matmul-size", type=int, default=0, help="N of the N x N matmuls (default: 2048 on CPU, 8192 on GPU)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON dict instead of the table")
    parser.add_argument("--gpu-124m", action="store_true",
                        help="the GPU benchmark: ~124M dense model, seq 1024, bf16, torch.compile, MFU vs GPU peak")
    parser.add_argument("--precisions", default="",
                        help="comma list of fp32,bf16 (default: both; bf16 only with --gpu-124m)")
    parser.add_argument("--gpu", default="", help="GPU for the MFU peak (scratchlab.scaling.gpus names, e.g. h100); "
                        "default: recognised from the device name")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="peak bf16 FLOP/s for the MFU, overriding --gpu")
    parser.add_argument("--no-dense-reference", action="store_true",
                        help="MoE presets: do not also time the dense model of the same width and active FLOPs")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.matmul_size < 0:
        parser.error("--steps must be >= 1; --warmup and --matmul-size >= 0")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precisions takes {', '.join(PRECISIONS)}")
    args.precisions = precisions or (["bf16"] if args.gpu_124m else list(PRECISIONS))
    if args.gpu_124m:
        args.preset = "tiny-lm"  # its lm family and optimizer settings; GPU_124M sets the shape
        args.overrides = [*GPU_124M, *args.overrides]  # the user's overrides win
    return args


def bench_config(preset: str, overrides: list[str]) -> Config:
    """The preset plus overrides, with model.vocab_size filled (there is no data to take it from)."""
    cfg = load_config(preset, overrides)
    vocab = cfg.model.vocab_size or DEFAULT_VOCAB
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": vocab})})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "auto_precision": resolve_precision("auto", device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def bf16_unsupported_reason(device: torch.device) -> str | None:
    """Why bf16 autocast cannot run on ``device``, or None if it can."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} does not support bf16"
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            probe = torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
        probe.sum().item()
    except (RuntimeError, TypeError) as exc:
        return f"bf16 autocast is unavailable on {device.type} ({exc})"
    return None


def model_summary(cfg: Config) -> dict[str, Any]:
    model = build_model(cfg.model)  # on CPU, only to count parameters and FLOPs
    t = cfg.train
    return {
        "params": model.num_params(),
        "non_embedding_params": model.num_params(exclude_embeddings=True),
        "flops_per_token": model.flops_per_token(t.seq_len),
        "vocab_size": cfg.model.vocab_size,
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "grad_accum": t.grad_accum,
        "tokens_per_step": t.batch_size * t.grad_accum * t.seq_len,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- training steps


def new_session(cfg: Config, device: torch.device, precision: str) -> Session:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    model.train()
    if cfg.train.activation_checkpointing:
        model.activation_checkpointing = True
    optimizer = build_optimizer(model, cfg.optim, fused=device.type == "cuda")
    forward = torch.compile(model) if cfg.train.compile else model  # compiles in the first (warmup) step
    return Session(precision, model, optimizer, torch.Generator().manual_seed(cfg.train.seed), forward)


def random_batch(cfg: Config, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, T] and their next-token labels: the shapes the data layer gives the trainer."""
    t = cfg.train
    tokens = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(
    session: Session, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: Config, step: int, device: torch.device
) -> bool:
    """One optimizer step as `Trainer.train_step` runs it. False if it was skipped as non-finite."""
    model, optimizer = session.model, session.optimizer
    loss_sum = 0.0
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device), labels.to(device)
        with autocast(device, session.precision):
            logits = (model if session.forward is None else session.forward)(input_ids)
        loss = token_loss(logits, labels)
        (loss / len(batches)).backward()
        loss_sum += loss.item()
    threshold = clip_threshold_at(step, cfg.train.clip)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), threshold))
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return finite


def timed_step(session: Session, cfg: Config, step: int, device: torch.device) -> tuple[float, bool]:
    """Seconds of one training step (batch creation excluded) and whether it was finite."""
    batches = [random_batch(cfg, session.generator) for _ in range(cfg.train.grad_accum)]
    synchronize(device)
    started = time.perf_counter()
    finite = train_step(session, batches, cfg, step, device)
    return time.perf_counter() - started, finite


def time_training(
    cfg: Config, device: torch.device, precisions: list[str], steps: int, warmup: int
) -> dict[str, StepTimes]:
    """Train one model per precision, alternating their steps; keep the times of the steps after warmup."""
    sessions = [new_session(cfg, device, precision) for precision in precisions]
    times = {precision: StepTimes() for precision in precisions}
    for step in range(warmup + steps):
        for session in sessions:
            elapsed, finite = timed_step(session, cfg, step, device)
            if step >= warmup:
                times[session.precision].seconds.append(elapsed)
                times[session.precision].nonfinite += not finite
    return times


def dense_reference(cfg: Config) -> Config | None:
    """For an MoE config, the dense model of the same width whose FFN has the same active FLOPs; else None.

    Active FFN = shared + top_k experts of ``expert_mult x d_model`` each (the router's d x E is
    left out: < 1% here), so the dense FFN is (shared + top_k) x expert_mult wide (x 3/2 for SwiGLU,
    whose ``ffn_mult`` counts GELU-equivalent width).
    """
    moe = cfg.model.moe
    if not moe.n_routed_experts:
        return None
    mult = (moe.n_shared_experts + moe.top_k) * moe.expert_mult * (1.5 if moe.expert_ffn == "swiglu" else 1.0)
    model = cfg.model.model_copy(update={"moe": moe.model_copy(update={"n_routed_experts": 0, "n_shared_experts": 0}),
                                         "ffn": moe.expert_ffn, "ffn_mult": mult})
    return cfg.model_copy(update={"model": model})


def time_with_reference(cfg: Config, reference: Config, device: torch.device, precisions: list[str], steps: int,
                        warmup: int) -> tuple[dict[str, StepTimes], dict[str, StepTimes]]:
    """Like `time_training`, for ``cfg`` and ``reference`` at once: every step alternates all their sessions."""
    sessions = [(which, new_session(c, device, p)) for p in precisions for which, c in ((0, cfg), (1, reference))]
    times: tuple[dict[str, StepTimes], dict[str, StepTimes]] = ({p: StepTimes() for p in precisions},
                                                                {p: StepTimes() for p in precisions})
    for step in range(warmup + steps):
        for which, session in sessions:
            elapsed, finite = timed_step(session, (cfg, reference)[which], step, device)
            if step >= warmup:
                times[which][session.precision].seconds.append(elapsed)
                times[which][session.precision].nonfinite += not finite
    return times


def reference_table(results: dict[str, PrecisionResult], dense: dict[str, PrecisionResult]) -> Table:
    table = Table(title="MoE vs the dense model of the same width and active FLOPs (same run, alternating steps)")
    for column in ("precision", "MoE tokens/s", "dense tokens/s", "MoE / dense", "MoE MFU", "dense MFU"):
        table.add_column(column, justify="right")
    for p, r in results.items():
        d = dense[p]
        table.add_row(p, f"{r.tokens_per_s:,.0f}", f"{d.tokens_per_s:,.0f}", f"{r.tokens_per_s / d.tokens_per_s:.2f}x",
                      f"{r.mfu:.1%}" if r.mfu is not None else "-", f"{d.mfu:.1%}" if d.mfu is not None else "-")
    return table


# ---------------------------------------------------------------- matmul ceiling


def time_matmuls(operands: Operands, reps: int) -> float:
    """Seconds per matmul, averaged over ``reps`` back-to-back calls."""
    a, b, out = operands
    synchronize(a.device)
    started = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=out)
    synchronize(a.device)
    return (time.perf_counter() - started) / reps


def matmul_operands(device: torch.device, dtype: torch.dtype, n: int) -> Operands:
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    return a, b, torch.empty(n, n, device=device, dtype=dtype)


def matmul_flops_per_s(device: torch.device, precisions: list[str], n: int) -> dict[str, float]:
    """Dense N x N matmul FLOP/s per precision: the median of MATMUL_SAMPLES timings, dtypes alternating."""
    operands = {p: matmul_operands(device, MATMUL_DTYPES[p], n) for p in precisions}
    reps: dict[str, int] = {}
    for p, ops in operands.items():
        time_matmuls(ops, reps=2)  # warm-up: library init, kernel selection
        reps[p] = max(1, math.ceil(MATMUL_MIN_SAMPLE_S / max(time_matmuls(ops, reps=2), 1e-9)))
    samples: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(MATMUL_SAMPLES):
        for p, ops in operands.items():
            samples[p].append(time_matmuls(ops, reps[p]))
    return {p: 2 * n**3 / statistics.median(seconds) for p, seconds in samples.items()}


# ---------------------------------------------------------------- results


def gpu_peak(device: torch.device, gpu: str = "") -> tuple[str, float] | None:
    """(name, dense bf16 peak FLOP/s) of ``gpu`` or of the CUDA device, from scratchlab.scaling.gpus; None if unknown."""
    if gpu:
        return gpu, peak_flops(gpu)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower().replace(" ", "")
    # Most specific first: "a100" contains "a10", "l40s" contains "l4", "h100pcie" contains "h100".
    for needle, key in (("h100pcie", "h100-pcie"), ("h100", "h100"), ("h200", "h200"), ("b200", "b200"),
                        ("a100", "a100"), ("l40s", "l40s"), ("a10", "a10"), ("l4", "l4"), ("4090", "rtx4090"),
                        ("v100", "v100"), ("mi300x", "mi300x")):
        if needle in name:
            return key, PEAK_BF16_FLOPS[key][0]
    return None


def summarize(
    precision: str, times: StepTimes, tokens_per_step: int, flops_per_token: float, matmul: float,
    peak: float | None = None,
) -> PrecisionResult:
    step_s = statistics.median(times.seconds)
    tokens_per_s = tokens_per_step / step_s
    achieved = flops_per_token * tokens_per_s
    # MFU is against the bf16 peak, so only bf16 steps get one (fp32 has its own, far lower, peak).
    mfu_peak = peak if precision == "bf16" else None
    return PrecisionResult(
        precision=precision,
        steps=len(times.seconds),
        step_s_median=step_s,
        step_s_min=min(times.seconds),
        step_s_max=max(times.seconds),
        tokens_per_s=tokens_per_s,
        achieved_flops_per_s=achieved,
        matmul_flops_per_s=matmul,
        achieved_over_matmul=achieved / matmul,
        nonfinite_steps=times.nonfinite,
        peak_flops_per_s=mfu_peak,
        mfu=achieved / mfu_peak if mfu_peak else None,
    )


def ratios(results: dict[str, PrecisionResult]) -> dict[str, float] | None:
    """bf16 over fp32, for training tokens/s and for matmul FLOP/s; None when one is missing."""
    if "fp32" not in results or "bf16" not in results:
        return None
    fp32, bf16 = results["fp32"], results["bf16"]
    return {
        "train": bf16.tokens_per_s / fp32.tokens_per_s,
        "matmul": bf16.matmul_flops_per_s / fp32.matmul_flops_per_s,
    }


# ---------------------------------------------------------------- output


def fmt_flops(value: float) -> str:
    if value >= 1e12:
        return f"{value / 1e12:,.2f} TFLOP/s"
    return f"{value / 1e9:,.1f} GFLOP/s"


def print_header(console: Console, report: dict[str, Any]) -> None:
    env, model, bench = report["env"], report["model"], report["bench"]
    console.print(f"[bold]device[/] {env['device']} ({env.get('gpu', env['cpu'])})")
    console.print(f"[bold]torch[/] {env['torch']}, {env['threads']} threads "
                  f"({bench['cores_used']:.2f} cores of CPU time while training)", end="")
    console.print(f", host CPU {env['cpu']}" if "gpu" in env else "")
    console.print(
        f"[bold]model[/] {report['preset']}: {model['params'] / 1e6:.2f}M params "
        f"({model['non_embedding_params'] / 1e6:.2f}M non-embedding), vocab {model['vocab_size']}, "
        f"{model['flops_per_token'] / 1e6:.1f} MFLOP/token"
    )
    console.print(
        f"[bold]batch[/] {model['batch_size']} x {model['seq_len']} tokens x {model['grad_accum']} accum = "
        f"{model['tokens_per_step']:,} tokens/step; {bench['warmup']} warmup + {bench['steps']} timed steps"
    )
    console.print(f"train.precision=auto picks {env['auto_precision']} here; fp32 matmul precision "
                  f"'{env['fp32_matmul_precision']}'; torch.compile {'on' if bench.get('compile') else 'off'}")
    if bench.get("peak"):
        console.print(f"[bold]MFU peak[/] {bench['peak']['gpu']}: {fmt_flops(bench['peak']['flops_per_s'])} dense bf16 "
                      "(datasheet, scratchlab.scaling.gpus)")


def results_table(results: dict[str, PrecisionResult], matmul_size: int) -> Table:
    table = Table(title="training vs matmul speed")
    table.add_column("")
    for name in results:
        table.add_column(name, justify="right")
    ratio = ratios(results)
    if ratio is not None:
        table.add_column("bf16/fp32", justify="right")
    rs = list(results.values())
    rows: list[tuple[str, list[str], str]] = [  # label, one cell per precision, key of its bf16/fp32 ratio
        ("step time (median)", [f"{r.step_s_median * 1e3:,.0f} ms" for r in rs], ""),
        ("step time (min-max)", [f"{r.step_s_min * 1e3:,.0f}-{r.step_s_max * 1e3:,.0f} ms" for r in rs], ""),
        ("tokens/s", [f"{r.tokens_per_s:,.0f}" for r in rs], "train"),
        ("achieved FLOP/s", [fmt_flops(r.achieved_flops_per_s) for r in rs], "train"),
        (f"matmul FLOP/s ({matmul_size}^2)", [fmt_flops(r.matmul_flops_per_s) for r in rs], "matmul"),
        ("achieved / matmul", [f"{r.achieved_over_matmul:.1%}" for r in rs], ""),
    ]
    if any(r.mfu is not None for r in rs):
        rows.append(("MFU (vs GPU bf16 peak)", [f"{r.mfu:.1%}" if r.mfu is not None else "-" for r in rs], ""))
    for label, cells, ratio_key in rows:
        extra = [f"{ratio[ratio_key]:.2f}x" if ratio_key else ""] if ratio is not None else []
        table.add_row(label, *cells, *extra)
    return table


def print_report(console: Console, report: dict[str, Any], results: dict[str, PrecisionResult]) -> None:
    print_header(console, report)
    console.print(results_table(results, report["bench"]["matmul_size"]))
    ratio = report["bf16_over_fp32"]
    if ratio is not None:
        console.print(f"[bold]bf16 / fp32 speed[/]: training {ratio['train']:.2f}x, matmuls {ratio['matmul']:.2f}x")
    for note in report["notes"]:
        console.print(f"note: {note}", style="yellow")


# ---------------------------------------------------------------- main


def choose_precisions(
    device: torch.device, notes: list[str], skipped: dict[str, str], wanted: list[str] | None = None
) -> list[str]:
    precisions = list(wanted or PRECISIONS)
    reason = bf16_unsupported_reason(device) if "bf16" in precisions else None
    if reason is not None:
        precisions.remove("bf16")
        skipped["bf16"] = reason
        notes.append(f"bf16 skipped: {reason}")
    elif device.type == "cpu" and not cpu_has_fast_bf16():
        notes.append("this CPU has neither AMX nor AVX512-BF16: bf16 matmuls are emulated, expect bf16 to be slower")
    return precisions


def run(args: argparse.Namespace, progress: Console) -> tuple[dict[str, Any], dict[str, PrecisionResult]]:
    cfg = bench_config(args.preset, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    notes: list[str] = []
    skipped: dict[str, str] = {}
    precisions = choose_precisions(device, notes, skipped, args.precisions)
    if not precisions:
        raise UserError(f"nothing to measure: {'; '.join(skipped.values())}")
    peak = gpu_peak(device, args.gpu)
    if args.peak_flops:
        peak = ("--peak-flops", args.peak_flops)
    if args.gpu_124m and device.type != "cuda":
        notes.append(f"--gpu-124m ran on {device}, not a GPU: its figures say nothing about GPU MFU")
    elif device.type == "cuda" and peak is None:
        notes.append(f"{torch.cuda.get_device_name(device)} is not in scratchlab.scaling.gpus: give --gpu or "
                     "--peak-flops for an MFU")
    if cfg.train.compile:
        notes.append("torch.compile: the model compiles in the first step, "
                     + ("a warmup step (not timed)" if args.warmup else "which is timed: use --warmup >= 1"))
    summary = model_summary(cfg)

    alternating = " (alternating steps)" if len(precisions) > 1 else ""
    progress.print(f"training {', '.join(precisions)}{alternating}: {args.warmup} warmup + {args.steps} timed steps")
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    reference = None if getattr(args, "no_dense_reference", False) else dense_reference(cfg)
    if reference is None:
        times = time_training(cfg, device, precisions, args.steps, args.warmup)
    else:
        times, reference_times = time_with_reference(cfg, reference, device, precisions, args.steps, args.warmup)
    cores_used = (time.process_time() - cpu_started) / (time.perf_counter() - wall_started)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cores_used < CONTENDED_FRACTION * threads:
        notes.append(f"training averaged {cores_used:.2f} cores of CPU time for {threads} threads: other load "
                     "likely crowded it out (figures then low and noisy), unless most of the step is serial")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the models are gone: give their memory to the matmuls
    progress.print(f"matmuls {n}x{n} ...")
    matmul = matmul_flops_per_s(device, precisions, n)

    results = {
        p: summarize(p, times[p], summary["tokens_per_step"], summary["flops_per_token"], matmul[p],
                     peak[1] if peak else None)
        for p in precisions
    }
    for r in results.values():
        if r.nonfinite_steps:
            notes.append(f"{r.precision}: {r.nonfinite_steps} timed steps had non-finite loss or gradients "
                         "and skipped the optimizer update")
    dense: dict[str, PrecisionResult] = {}
    if reference is not None:
        ref_summary = model_summary(reference)
        dense = {p: summarize(p, reference_times[p], ref_summary["tokens_per_step"], ref_summary["flops_per_token"],
                              matmul[p], peak[1] if peak else None) for p in precisions}
    report = {
        "preset": "--gpu-124m" if args.gpu_124m else args.preset,
        "overrides": args.overrides,
        "env": environment(device),
        "model": summary,
        "bench": {"steps": args.steps, "warmup": args.warmup, "matmul_size": n, "cores_used": cores_used,
                  "compile": cfg.train.compile, "activation_checkpointing": cfg.train.activation_checkpointing,
                  "peak": {"gpu": peak[0], "flops_per_s": peak[1]} if peak else None},
        "results": {name: asdict(r) for name, r in results.items()},
        "skipped": skipped,
        "bf16_over_fp32": ratios(results),
        "notes": notes,
    }
    if dense:
        report["dense_reference"] = {"model": ref_summary, "results": {p: asdict(r) for p, r in dense.items()},
                                     "moe_over_dense_tokens_per_s": {p: results[p].tokens_per_s / dense[p].tokens_per_s
                                                                     for p in precisions}}
        report["_dense_results"] = dense
    return report, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Console(stderr=True, style="dim")
    try:
        report, results = run(args, progress)
    except UserError as exc:
        progress.print(f"error: {exc}", style="red")
        return 2
    dense = report.pop("_dense_results", None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(Console(), report, results)
        if dense:
            ref = report["dense_reference"]["model"]
            Console().print(f"dense reference: {ref['params'] / 1e6:.2f}M params, {ref['flops_per_token'] / 1e6:.1f} "
                            f"MFLOP/token (MoE: {report['model']['flops_per_token'] / 1e6:.1f})")
            Console().print(reference_table(results, dense))
    return 0


if __name__ == "__main__":
    sys.exit(main())
