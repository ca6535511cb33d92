"""Training throughput of a preset's model, at fp32 and at bf16 autocast, against this machine's matmul speed.

Usage::

    python benchmarks/train_throughput.py [--preset tiny-lm] [--steps N] [--warmup N] [--json] [section.key=value ...]
    python benchmarks/train_throughput.py --gpu-124m [--reference] [--gpu h100] [section.key=value ...]   # on a GPU
    python benchmarks/train_throughput.py --dia [section.key=value ...]                                   # on a GPU
    python benchmarks/train_throughput.py --ab-against /tmp/before/src [--rounds 3] [args ...]            # A/B
    python benchmarks/train_throughput.py --preset lm-mla-moe-tiny [--no-dense-reference]                 # MoE vs dense

``--reference`` also trains a plain PyTorch GPT-2 written in this file (nanoGPT's model: learned
positions, LayerNorm, GELU MLP, tied head; the cross-entropy inside its compiled forward; fused
AdamW; no host read per step) of the same shape, batch and precision, alternating blocks of steps
with ours in the same run, and prints ours / reference (tokens/s).

``--dia`` is the ``dia`` preset (18 x 2048 decoder, K = 9 codebooks of 1024, text encoder; 1.3B)
on generated codes (``data.path=synthetic:...,K=9,codebook=1024``), bf16, compiled: frames/s,
codes/s (x K) and MFU (``flops_per_token`` of the codec model is per frame).

``--ab-against SRC`` runs the trainer's step in two processes side by side, one with
``PYTHONPATH=SRC`` (e.g. ``git worktree add /tmp/before <commit>``, then ``/tmp/before/src``), one
with this checkout's ``src``, timing blocks of steps in turn (``--rounds`` x ``--steps`` steps each),
and prints the median tokens/s of each and the block-by-block ratios (first precision only).

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
  ``scratchlab.train.loop``, a ``Trainer`` built as a run builds it): the task's loss compiled
  with the model (``train.compile``), backward, gradient-norm clipping, the fused AdamW step,
  the next batch drawn on the data worker thread, a log row every ``train.log_every`` steps
  (written nowhere); no evals, demos or checkpoints. The lm family trains on random tokens of
  ``train.batch_size x train.seq_len`` (``RandomTokens``: the lm task's loss, no corpus); other
  families on their own task. Each precision trains its own model, built from the same seed.
  Steps run in blocks of BLOCK_STEPS back to back (the device synchronised at the ends of a
  block only, so host work overlaps device work as in a run); the figure is the median over the
  blocks of ``--steps`` timed steps that follow ``--warmup`` untimed ones. Blocks of the
  sessions alternate, so that other load on the machine slows all alike and ratios stay fair.
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
same run and with their blocks of steps alternating, the dense model of the same width whose FFN has
the same *active* FLOPs (hidden = (shared + top_k) x the expert width, ``dense_reference``), through
the same trainer step, and print both models' tokens/s and MFU side by side with their ratio
(``--no-dense-reference`` skips it).

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
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from scratchlab.config import Config, load_config
from scratchlab.errors import UserError
from scratchlab.families.base import Task
from scratchlab.families.lm.task import LMTask
from scratchlab.families.registry import build_model, build_task
from scratchlab.scaling.gpus import PEAK_BF16_FLOPS, peak_flops
from scratchlab.runtime import (
    autocast,
    compiler_missing,
    cpu_has_fast_bf16,
    resolve_device,
    resolve_precision,
)
from scratchlab.train.loop import Trainer
from scratchlab.train.progress import Reporter

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
# --dia: the dia preset (1.3B decoder, K=9 codebooks of 1024) on generated codes, bf16, compiled.
DIA = [
    "data.path=synthetic:clips=64,frames=1024,K=9,codebook=1024", "train.device=cuda", "train.precision=bf16",
    "train.compile=true", "train.grad_accum=1",
]
BLOCK_STEPS = 5  # steps timed back to back (one device sync at each end), alternating between sessions
NO_SAVE = ["train.max_steps=1000000", "train.save_every=1000000", "eval.every=1000000", "demo.every=1000000"]


@dataclass
class Session:
    """One timed training loop: a Trainer at one precision, or the reference model."""

    label: str  # fp32 / bf16 (ours), "dense-fp32" / "dense-bf16" (MoE's dense reference), or "reference"
    step: Callable[[], None]
    nonfinite: Callable[[], int] = lambda: 0
    close: Callable[[], None] = lambda: None


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
    parser.add_argument("--dia", action="store_true", help="the dia preset (codec LM, 1.3B) on generated codes, "
                        "bf16, compiled, on a GPU")
    parser.add_argument("--reference", action="store_true", help="also time a plain GPT-2 of the same shape written "
                        "here (loss inside its compiled forward), alternating with ours; print our ratio to it")
    parser.add_argument("--no-dense-reference", action="store_true",
                        help="MoE presets: do not also time the dense model of the same width and active FLOPs")
    parser.add_argument("--ab-against", default="", metavar="SRC",
                        help="A/B: run this benchmark in subprocesses alternating PYTHONPATH=SRC (e.g. a worktree "
                        "of the previous commit's src) and this checkout's src; print the tokens/s ratio")
    parser.add_argument("--rounds", type=int, default=3, help="--ab-against: repeats of --steps (default: 3)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # a side of --ab-against
    parser.add_argument("--ce", default="", metavar="ROWSxDxVOCAB",
                        help="only time the output layer + cross-entropy (forward and backward) at this size, e.g. "
                        "2048x768x50304: eager, compiled (the trainer's path) and torch's chunked "
                        "linear_cross_entropy")
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
    elif args.dia:
        args.preset = "dia"
        args.precisions = precisions or ["bf16"]
        args.overrides = [*DIA, *args.overrides]
    return args


def bench_config(preset: str, overrides: list[str]) -> Config:
    """The preset plus overrides, with model.vocab_size filled (there is no data to take it from).

    No evals, demos or checkpoints in the timed steps; log rows are written (to nowhere) every
    ``train.log_every`` steps, as in a run."""
    cfg = load_config(preset, [*NO_SAVE, *overrides])
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
    if cfg.model.family != "lm":
        cfg = bench_task(cfg)[0]  # the data fills the model config (codebooks, ...)
    with torch.device("meta"):  # only to count parameters and FLOPs
        model = build_model(cfg.model)
    codes_per_frame = cfg.model.codec.n_codebooks if cfg.model.family == "codec_lm" else None
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
        "unit": "tokens" if cfg.model.family == "lm" else "frames",  # codec: one frame = K codes
        "codes_per_frame": codes_per_frame,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- training steps (the trainer's own)


class NullMetrics:
    """The trainer's metrics logger, writing nowhere (log rows are still built, as in a run)."""

    def log(self, row: dict) -> None: ...
    def log_config(self, config: dict) -> None: ...
    def log_finding(self, finding: Any) -> None: ...
    def close(self, status: str = "finished") -> None: ...


class RandomTokens(Task):
    """The lm family's task on random tokens: batches of the shapes the data layer gives, no corpus.

    Only what ``Trainer.train_step`` calls; the loss is the lm family's own (``LMTask.loss``).
    """

    family = "lm"

    def configure(self, cfg: Config) -> Config:
        return cfg

    @property
    def tokens_per_sample(self) -> int:
        return self.cfg.train.seq_len

    def data_summary(self) -> str:
        return f"random tokens, vocab {self.cfg.model.vocab_size}"

    def write_assets(self, run: Any) -> None: ...

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        return {"val_loss": math.nan}

    def train_batch(self, batch_size: int, generator: torch.Generator, rows: slice | None = None) -> dict:
        t = self.cfg.train
        tokens = torch.randint(0, self.cfg.model.vocab_size, (batch_size, t.seq_len + 1), generator=generator)
        tokens = tokens if rows is None else tokens[rows]
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def loss(self, model: nn.Module, batch: dict, precision: str = "fp32"):
        return LMTask.loss(self, model, batch, precision)

    def val_batch(self, index: int) -> dict:  # the timed steps run no eval; a fixed batch for completeness
        return self.train_batch(self.cfg.eval.batch_size, torch.Generator().manual_seed(index))


def bench_task(cfg: Config) -> tuple[Config, Task]:
    """The lm family trains on random tokens; other families on their own task (codec: synthetic codes)."""
    if cfg.model.family == "lm":
        return cfg, RandomTokens(cfg)
    return build_task(cfg)


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


def trainer_session(cfg: Config, precision: str) -> Session:
    """A Trainer of ``cfg`` at ``precision``: the model, optimizer, compiled loss and data path of a run."""
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})})
    cfg, task = bench_task(cfg)
    trainer = Trainer(cfg, None, task, Reporter(Console(file=open(os.devnull, "w")), "lines"))  # noqa: SIM115
    metrics, skipped = NullMetrics(), []

    def step() -> None:
        if trainer.train_step(metrics) is False:  # known on the trainer's check steps
            skipped.append(1)

    batches = getattr(trainer, "batches", None)  # the prefetcher (absent before issue 14)
    return Session(precision, step, lambda: len(skipped), getattr(batches, "close", lambda: None))


def time_block(session: Session, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` back-to-back steps (the device synchronised at both ends only)."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        session.step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def time_training(sessions: list[Session], device: torch.device, steps: int, warmup: int) -> dict[str, StepTimes]:
    """Blocks of BLOCK_STEPS steps alternate between the sessions (other load slows all alike); keep the timed ones."""
    times = {session.label: StepTimes() for session in sessions}
    for session in sessions:
        for _ in range(warmup):  # compiles (train.compile), creates the optimizer state
            session.step()
    done = 0
    while done < steps:
        block = min(BLOCK_STEPS, steps - done)
        for session in sessions:
            times[session.label].seconds.append(time_block(session, block, device))
        done += block
    for session in sessions:
        times[session.label].nonfinite = session.nonfinite()
        session.close()
    return times


# ---------------------------------------------------------------- the reference: a plain GPT-2, written here


class ReferenceBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    """nanoGPT's GPT-2 (learned positions, LayerNorm, GELU MLP, tied head), the loss inside its forward."""

    def __init__(self, vocab: int, seq_len: int, layers: int, d: int, heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(ReferenceBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


class ReferenceSession:
    """The reference's training step, as nanoGPT's train.py runs it (no host read on a step)."""

    def __init__(self, cfg: Config, device: torch.device, precision: str) -> None:
        t, m = cfg.train, cfg.model
        torch.manual_seed(t.seed)
        self.model = ReferenceGPT(m.vocab_size, t.seq_len, m.n_layers, m.d_model, m.n_heads).to(device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=device.type in ("cuda", "cpu"))
        compiled = t.compile and compiler_missing(device) is None
        self.forward = torch.compile(self.model) if compiled else self.model
        self.cfg, self.device, self.precision = cfg, device, precision
        self.generator = torch.Generator().manual_seed(t.seed)
        self.clip = cfg.train.clip.max_norm

    def step(self) -> None:
        t = self.cfg.train
        for _ in range(t.grad_accum):
            tokens = torch.randint(0, self.cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=self.generator)
            tokens = tokens.to(self.device, non_blocking=True)
            with autocast(self.device, self.precision):
                loss = self.forward(tokens[:, :-1], tokens[:, 1:])
            (loss / t.grad_accum).backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops_per_token(self) -> float:
        m, t = self.cfg.model, self.cfg.train
        n = sum(p.numel() for p in self.model.parameters()) - self.model.wpe.weight.numel()
        return 6 * n + 12 * m.n_layers * m.d_model * t.seq_len




# ---------------------------------------------------------------- the output layer and its loss alone


def time_cross_entropy(spec: str, device: torch.device, precision: str, reps: int = 5) -> dict[str, float]:
    """Seconds (median of ``reps``) of hidden @ W.T + cross-entropy, forward and backward, three ways."""
    from scratchlab.loss import linear_token_loss, token_loss

    rows, d, vocab = (int(x) for x in spec.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, d, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * 0.02).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)

    def plain(h, w, y):
        with autocast(device, precision):
            logits = h @ w.T
        return token_loss(logits, y)

    def chunked(h, w, y):
        with autocast(device, precision):
            return linear_token_loss(h, w, y)

    variants = {"eager": plain, "compiled": torch.compile(plain), "chunked linear_cross_entropy": chunked}
    out: dict[str, float] = {}
    for name, fn in variants.items():
        seconds = []
        for i in range(reps + 1):  # the first call compiles / warms up
            hidden.grad = weight.grad = None
            synchronize(device)
            started = time.perf_counter()
            fn(hidden, weight, labels).backward()
            synchronize(device)
            if i:
                seconds.append(time.perf_counter() - started)
        out[name] = statistics.median(seconds)
    return out


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
    unit = model.get("unit", "tokens")
    console.print(f"[bold]device[/] {env['device']} ({env.get('gpu', env['cpu'])})")
    console.print(f"[bold]torch[/] {env['torch']}, {env['threads']} threads "
                  f"({bench['cores_used']:.2f} cores of CPU time while training)", end="")
    console.print(f", host CPU {env['cpu']}" if "gpu" in env else "")
    console.print(
        f"[bold]model[/] {report['preset']}: {model['params'] / 1e6:.2f}M params "
        f"({model['non_embedding_params'] / 1e6:.2f}M non-embedding), "
        + (f"vocab {model['vocab_size']}, " if unit == "tokens" else f"K={model['codes_per_frame']} codebooks, ")
        + f"{model['flops_per_token'] / 1e6:.1f} MFLOP/{unit[:-1]}"
    )
    console.print(
        f"[bold]batch[/] {model['batch_size']} x {model['seq_len']} {unit} x {model['grad_accum']} accum = "
        f"{model['tokens_per_step']:,} {unit}/step; {bench['warmup']} warmup + {bench['steps']} timed steps"
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


def dense_table(results: dict[str, PrecisionResult], dense: dict[str, PrecisionResult]) -> Table:
    table = Table(title="MoE vs the dense model of the same width and active FLOPs (same run, alternating blocks)")
    for column in ("precision", "MoE tokens/s", "dense tokens/s", "MoE / dense", "MoE MFU", "dense MFU"):
        table.add_column(column, justify="right")
    for p, d in dense.items():
        r = results[p]
        table.add_row(p, f"{r.tokens_per_s:,.0f}", f"{d.tokens_per_s:,.0f}", f"{r.tokens_per_s / d.tokens_per_s:.2f}x",
                      f"{r.mfu:.1%}" if r.mfu is not None else "-", f"{d.mfu:.1%}" if d.mfu is not None else "-")
    return table


def print_report(console: Console, report: dict[str, Any], results: dict[str, PrecisionResult]) -> None:
    print_header(console, report)
    console.print(results_table(results, report["bench"]["matmul_size"]))
    ratio = report["bf16_over_fp32"]
    if ratio is not None:
        console.print(f"[bold]bf16 / fp32 speed[/]: training {ratio['train']:.2f}x, matmuls {ratio['matmul']:.2f}x")
    ref = report.get("reference")
    if ref is not None:
        r, p = ref["result"], ref["precision"]
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        console.print(f"[bold]reference GPT-2[/] (plain PyTorch, same shape, loss in its compiled forward), {p}: "
                      f"{r['tokens_per_s']:,.0f} tokens/s{mfu}; [bold]ours / reference: "
                      f"{ref['ours_over_reference']:.2f}x[/]")
    dense = report.get("dense_reference")
    if dense is not None:
        m = dense["model"]
        console.print(f"[bold]dense reference[/]: {m['params'] / 1e6:.2f}M params, {m['flops_per_token'] / 1e6:.1f} "
                      f"MFLOP/token (MoE: {report['model']['flops_per_token'] / 1e6:.1f})")
        console.print(dense_table(results, {p: PrecisionResult(**r) for p, r in dense["results"].items()}))
    if report["model"].get("unit") == "frames":
        k = report["model"].get("codes_per_frame")
        for name, r in results.items():
            console.print(f"{name}: {r.tokens_per_s:,.0f} frames/s" + (f" = {r.tokens_per_s * k:,.0f} codes/s" if k else ""))
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
    sessions = [trainer_session(cfg, p) for p in precisions]
    reference = None
    if args.reference:
        if cfg.model.family != "lm":
            raise UserError("--reference is a GPT-2 of the lm family's shape: use it with --gpu-124m or an lm preset")
        reference = ReferenceSession(cfg, device, precisions[0])
        sessions.append(Session("reference", reference.step))
    dense_cfg = None if args.no_dense_reference else dense_reference(cfg)
    if dense_cfg is not None:  # the same trainer step, in the same alternating blocks
        sessions += [replace(trainer_session(dense_cfg, p), label=f"dense-{p}") for p in precisions]

    alternating = " (alternating blocks)" if len(sessions) > 1 else ""
    progress.print(f"training {', '.join(s.label for s in sessions)}{alternating}: {args.warmup} warmup + "
                   f"{args.steps} timed steps")
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    times = time_training(sessions, device, args.steps, args.warmup)
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
    ref = None
    if reference is not None:
        ref_result = summarize(precisions[0], times["reference"], summary["tokens_per_step"],
                               reference.flops_per_token(), matmul[precisions[0]], peak[1] if peak else None)
        ref = {"precision": precisions[0], "result": asdict(ref_result),
               "ours_over_reference": results[precisions[0]].tokens_per_s / ref_result.tokens_per_s}
    dense = None
    if dense_cfg is not None:
        dense_summary = model_summary(dense_cfg)
        dense_results = {p: summarize(p, times[f"dense-{p}"], dense_summary["tokens_per_step"],
                                      dense_summary["flops_per_token"], matmul[p], peak[1] if peak else None)
                         for p in precisions}
        dense = {"model": dense_summary, "results": {p: asdict(r) for p, r in dense_results.items()},
                 "moe_over_dense_tokens_per_s": {p: results[p].tokens_per_s / dense_results[p].tokens_per_s
                                                 for p in precisions}}
    for r in results.values():
        if r.nonfinite_steps:
            notes.append(f"{r.precision}: {r.nonfinite_steps} timed steps had non-finite loss or gradients "
                         "and skipped the optimizer update")
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
        "reference": ref,
        "dense_reference": dense,
        "notes": notes,
    }
    return report, results


def serve(args: argparse.Namespace) -> int:
    """--serve (for --ab-against): build the first precision's trainer, warm it up, then time blocks on request.

    Reads ``N`` lines on stdin; for each, runs N steps back to back and prints the seconds per step.
    """
    cfg = bench_config(args.preset, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    session = trainer_session(cfg, args.precisions[0])
    for _ in range(args.warmup):
        session.step()
    print("ready", flush=True)
    for line in sys.stdin:
        print(time_block(session, int(line), device), flush=True)
    session.close()
    return 0


def ab_compare(args: argparse.Namespace, argv: list[str], progress: Console) -> dict[str, Any]:
    """This benchmark's trainer step in two processes, PYTHONPATH=SRC and this checkout's src, alternating blocks.

    Both processes live side by side (only one runs at a time) and time blocks of BLOCK_STEPS steps in
    turn, ``--rounds`` x ``--steps`` steps each: other load on the machine slows both alike. Both time
    the trainer's own step through the same benchmark code (only the library differs).
    """
    ours = str(Path(__file__).resolve().parents[1] / "src")
    theirs = str(Path(args.ab_against).resolve())
    skip = {"--ab-against", "--rounds"}
    child, i = [], 0
    while i < len(argv):  # the same arguments, less the A/B ones
        if argv[i] in skip:
            i += 2
            continue
        if argv[i].split("=")[0] in skip:
            i += 1
            continue
        child.append(argv[i])
        i += 1
    child += ["--serve", "--precisions", args.precisions[0]]
    sides = {"before": theirs, "after": ours}
    procs = {}
    for side, src in sides.items():
        progress.print(f"{side}: PYTHONPATH={src}: building and warming up")
        procs[side] = subprocess.Popen([sys.executable, __file__, *child], env={**os.environ, "PYTHONPATH": src},
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    try:
        for side, proc in procs.items():
            if proc.stdout.readline().strip() != "ready":
                raise UserError(f"the {side} process (PYTHONPATH={sides[side]}) failed to start; run it alone to see why")
        blocks = args.rounds * max(1, args.steps // BLOCK_STEPS)
        for b in range(blocks):
            for side, proc in procs.items():
                proc.stdin.write(f"{BLOCK_STEPS}\n")
                proc.stdin.flush()
                seconds[side].append(float(proc.stdout.readline()))
            progress.print(f"block {b + 1}/{blocks}: after/before {seconds['before'][-1] / seconds['after'][-1]:.3f}")
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=120)
    cfg = bench_config(args.preset, args.overrides)
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len
    speed = {side: [tokens / s for s in values] for side, values in seconds.items()}
    ratios_ = [a / b for a, b in zip(speed["after"], speed["before"])]
    return {"before_src": theirs, "after_src": ours, "tokens_per_s": speed,
            "median_tokens_per_s": {side: statistics.median(v) for side, v in speed.items()},
            "ratios": ratios_, "median_ratio": statistics.median(ratios_)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    progress = Console(stderr=True, style="dim")
    if args.serve:
        return serve(args)
    if args.ce:
        cfg = bench_config(args.preset, args.overrides)
        device, precision = resolve_device(cfg.train.device), args.precisions[0]
        seconds = time_cross_entropy(args.ce, device, precision)
        base = seconds["compiled"]
        print(f"output layer + cross-entropy {args.ce} ({precision}, {device}), forward + backward:")
        for name, value in seconds.items():
            print(f"  {name:30} {value * 1e3:9,.1f} ms  ({base / value:.2f}x the compiled path's speed)")
        return 0
    if args.ab_against:
        try:
            result = ab_compare(args, argv, progress)
        except UserError as exc:
            progress.print(f"error: {exc}", style="red")
            return 2
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for side in ("before", "after"):
                print(f"{side:6} tokens/s: median {result['median_tokens_per_s'][side]:,.0f} over "
                      f"{len(result['tokens_per_s'][side])} blocks  ({result[side + '_src']})")
            print(f"after / before, block by block: {', '.join(f'{r:.2f}' for r in result['ratios'])}; "
                  f"median {result['median_ratio']:.3f}x")
        return 0
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
