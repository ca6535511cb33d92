"""Training throughput of a preset's model, at fp32 and at bf16 autocast, against this machine's matmul speed.

Usage::

    python benchmarks/train_throughput.py [--preset tiny-lm] [--steps N] [--warmup N] [--json] [section.key=value ...]

What it measures, for each precision (fp32, then bf16 autocast; bf16 is skipped with a note
where the device cannot run it):

- **tokens/s of full training steps**: the trainer's own step (``scratchlab.train.loop``):
  forward under ``autocast``, ``token_loss``, backward, ``loss.item()``, gradient-norm clipping
  and the AdamW step of ``build_optimizer`` (fused on CUDA, as the trainer does), on random
  token batches of ``train.batch_size x train.seq_len`` (``train.grad_accum`` micro-batches per
  step). Each step is timed on its own (the device synchronised); the figure is the median over
  ``--steps`` timed steps that follow ``--warmup`` untimed ones. A fresh model, with the same
  seed, is built for each precision.
- **achieved FLOP/s** = ``model.flops_per_token(seq_len) x tokens/s``: 6 x non-embedding
  parameters (the output head included) + the attention term, per PaLM's appendix B. Attention
  is counted over the full T x T matrix, as that formula does, although causal attention needs
  about half of it.
- **matmul FLOP/s**: square ``N x N`` matmuls in the same dtype (fp32 or bf16), in the same run,
  measured just after that precision's training steps: the median of several timings of
  ``2 N^3`` FLOPs. This is the ceiling this machine reaches on easy, dense work right now (with
  these threads and whatever else is running), not a figure from a spec sheet.
- **achieved / matmul**: a CPU-friendly "MFU": the fraction of the measured matmul speed that
  training reaches. It is below 1 because a training step is more than large matmuls: a tiny
  model's matmuls are small (low arithmetic intensity), and norms, RoPE, softmax, the fp32
  cross-entropy over the vocabulary, the bf16 casts, the optimizer update (fp32 master weights and
  AdamW state at every precision) and Python overhead are memory-bound work that the FLOP count
  ignores. Compare it across precisions, presets and machines, not against 100 %.
- **bf16 / fp32**: training tokens/s at bf16 over tokens/s at fp32 (above 1: bf16 autocast trains
  faster here), shown next to the same ratio for the plain matmuls. On CPUs without AMX or
  AVX512-BF16, bf16 is emulated and the ratio is usually below 1; that is why
  ``train.precision=auto`` picks fp32 there (the header shows its choice).

Dotted overrides apply to the preset as in ``scratchlab train`` (``train.batch_size=8``,
``model.n_layers=2``, ``train.device=cpu``, ``train.threads=4``). ``model.vocab_size`` is taken
from the config, else 4096 (the tiny-lm tokenizer's size). Torch's thread count is left as it is
unless ``train.threads`` is set, exactly as training does; it is printed. Figures are noisy when
other processes share the CPU; the step-time range shows how much.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from scratchlab.config import Config, load_config
from scratchlab.errors import UserError
from scratchlab.loss import token_loss
from scratchlab.models import build_model
from scratchlab.train.loop import autocast, cpu_has_fast_bf16, resolve_device, resolve_precision
from scratchlab.train.optim import build_optimizer, clip_threshold_at

DEFAULT_VOCAB = 4096
PRECISIONS = ("fp32", "bf16")
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_SAMPLES = 7
MATMUL_MIN_SAMPLE_S = 0.05  # each matmul timing repeats the matmul until it spans at least this long


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
    skipped_nonfinite_steps: int


# ---------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training tokens/s and FLOP/s at fp32 and bf16 autocast, against measured matmul FLOP/s.",
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=8")
    parser.add_argument("--preset", default="tiny-lm", help="preset name or YAML config path (default: tiny-lm)")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per precision (default: 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default: 3)")
    parser.add_argument(
        "--matmul-size", type=int, default=0, help="N of the N x N matmul benchmark (default: 2048 on CPU, 8192 on GPU)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON dict instead of the table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.matmul_size < 0:
        parser.error("--steps must be >= 1, --warmup and --matmul-size >= 0")
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
    """Why bf16 autocast cannot run here, or None if it can."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} does not support bf16"
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            probe = torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
        probe.sum().item()
    except (RuntimeError, TypeError) as exc:
        return f"bf16 autocast is unavailable on {device.type} ({exc})"
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- training steps


def random_batch(cfg: Config, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, T] and their next-token labels, the shapes the data layer gives the trainer."""
    t = cfg.train
    tokens = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    step: int,
    device: torch.device,
    precision: str,
) -> bool:
    """One optimizer step as `Trainer.train_step` runs it (minus logging). False if skipped as non-finite."""
    loss_sum = 0.0
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device), labels.to(device)
        with autocast(device, precision):
            logits = model(input_ids)
        loss = token_loss(logits, labels)
        (loss / len(batches)).backward()
        loss_sum += loss.item()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_threshold_at(step, cfg.train.clip)))
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return finite


def time_training(cfg: Config, device: torch.device, precision: str, steps: int, warmup: int) -> tuple[list[float], int]:
    """Seconds of each timed step, and how many steps were skipped as non-finite."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(cfg.train.seed)
    times, skipped = [], 0
    for step in range(warmup + steps):
        batches = [random_batch(cfg, generator) for _ in range(cfg.train.grad_accum)]
        synchronize(device)
        started = time.perf_counter()
        finite = train_step(model, optimizer, batches, cfg, step, device, precision)
        elapsed = time.perf_counter() - started
        if step >= warmup:
            times.append(elapsed)
            skipped += not finite
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times, skipped


# ---------------------------------------------------------------- matmul ceiling


def time_matmuls(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, reps: int) -> float:
    """Seconds per matmul, averaged over ``reps`` back-to-back calls."""
    device = a.device
    synchronize(device)
    started = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=out)
    synchronize(device)
    return (time.perf_counter() - started) / reps


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Dense N x N matmul FLOP/s in ``dtype``: the median of MATMUL_SAMPLES timings."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    time_matmuls(a, b, out, reps=2)  # warm-up: library init, kernel selection
    per_call = time_matmuls(a, b, out, reps=2)
    reps = max(1, math.ceil(MATMUL_MIN_SAMPLE_S / max(per_call, 1e-9)))
    seconds = statistics.median(time_matmuls(a, b, out, reps) for _ in range(MATMUL_SAMPLES))
    return 2 * n**3 / seconds


# ---------------------------------------------------------------- one precision


def measure(
    cfg: Config, device: torch.device, precision: str, steps: int, warmup: int, matmul_size: int, flops_per_token: float
) -> PrecisionResult:
    times, skipped = time_training(cfg, device, precision, steps, warmup)
    step_s = statistics.median(times)
    tokens_per_s = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len / step_s
    achieved = flops_per_token * tokens_per_s
    matmul = matmul_flops_per_s(device, MATMUL_DTYPES[precision], matmul_size)
    return PrecisionResult(
        precision=precision,
        steps=len(times),
        step_s_median=step_s,
        step_s_min=min(times),
        step_s_max=max(times),
        tokens_per_s=tokens_per_s,
        achieved_flops_per_s=achieved,
        matmul_flops_per_s=matmul,
        achieved_over_matmul=achieved / matmul,
        skipped_nonfinite_steps=skipped,
    )


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


def ratios(results: dict[str, PrecisionResult]) -> dict[str, float] | None:
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
        return f"{value / 1e12:,.1f} TFLOP/s"
    return f"{value / 1e9:,.1f} GFLOP/s"


def print_report(console: Console, report: dict[str, Any], results: dict[str, PrecisionResult]) -> None:
    env, model, bench = report["env"], report["model"], report["bench"]
    name = env.get("gpu", env["cpu"])
    console.print(f"[bold]device[/] {env['device']} ({name})   [bold]torch[/] {env['torch']}   "
                  f"[bold]threads[/] {env['threads']}")
    if "gpu" in env:
        console.print(f"[bold]host CPU[/] {env['cpu']}   [bold]fp32 matmul precision[/] {env['fp32_matmul_precision']}")
    console.print(
        f"[bold]model[/] {report['preset']}: {model['params'] / 1e6:.2f}M params "
        f"({model['non_embedding_params'] / 1e6:.2f}M non-embedding), vocab {model['vocab_size']}, "
        f"{model['flops_per_token'] / 1e6:.1f} MFLOP/token (training)"
    )
    console.print(
        f"[bold]batch[/] {model['batch_size']} x {model['seq_len']} x {model['grad_accum']} accum = "
        f"{model['tokens_per_step']:,} tokens/step; {bench['warmup']} warmup + {bench['steps']} timed steps; "
        f"matmul {bench['matmul_size']}x{bench['matmul_size']}; train.precision=auto picks {env['auto_precision']}"
    )
    table = Table(title="training throughput vs measured matmul speed")
    for column in ("precision", "step (median)", "step range", "tokens/s", "achieved", "matmul", "achieved/matmul"):
        table.add_column(column, justify="left" if column == "precision" else "right")
    for r in results.values():
        table.add_row(
            r.precision,
            f"{r.step_s_median * 1e3:,.1f} ms",
            f"{r.step_s_min * 1e3:,.0f}-{r.step_s_max * 1e3:,.0f} ms",
            f"{r.tokens_per_s:,.0f}",
            fmt_flops(r.achieved_flops_per_s),
            fmt_flops(r.matmul_flops_per_s),
            f"{r.achieved_over_matmul:.1%}",
        )
    console.print(table)
    ratio = report["bf16_over_fp32"]
    if ratio is not None:
        console.print(f"[bold]bf16 / fp32[/] training tokens/s: {ratio['train']:.2f}x   (matmul FLOP/s: {ratio['matmul']:.2f}x)")
    for note in report["notes"]:
        console.print(f"note: {note}", style="yellow")


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace, progress: Console) -> tuple[dict[str, Any], dict[str, PrecisionResult]]:
    cfg = bench_config(args.preset, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    env = environment(device)
    notes: list[str] = []
    precisions = list(PRECISIONS)
    skipped: dict[str, str] = {}
    reason = bf16_unsupported_reason(device)
    if reason is not None:
        precisions.remove("bf16")
        skipped["bf16"] = reason
        notes.append(f"bf16 skipped: {reason}")
    elif device.type == "cpu" and not cpu_has_fast_bf16():
        notes.append("this CPU has neither AMX nor AVX512-BF16: bf16 matmuls are emulated, so expect bf16 to be slower")

    summary = model_summary(cfg)
    results: dict[str, PrecisionResult] = {}
    for precision in precisions:
        progress.print(f"{precision}: {args.warmup} warmup + {args.steps} timed training steps, then matmuls ...")
        results[precision] = measure(cfg, device, precision, args.steps, args.warmup, n, summary["flops_per_token"])
        if results[precision].skipped_nonfinite_steps:
            notes.append(f"{precision}: {results[precision].skipped_nonfinite_steps} timed steps had non-finite "
                         "loss/gradients and skipped the optimizer update")
    report = {
        "preset": args.preset,
        "overrides": args.overrides,
        "env": env,
        "model": summary,
        "bench": {"steps": args.steps, "warmup": args.warmup, "matmul_size": n},
        "results": {name: asdict(r) for name, r in results.items()},
        "skipped": skipped,
        "bf16_over_fp32": ratios(results),
        "notes": notes,
    }
    return report, results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Console(stderr=True, style="dim")
    try:
        report, results = run(args, progress)
    except UserError as exc:
        progress.print(f"error: {exc}", style="red")
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(Console(), report, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
