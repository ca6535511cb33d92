"""Where and in which precision a run computes: device choice, bf16 detection, autocast."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

import torch

from scratchlab.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu or install a CUDA torch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available; use train.device=cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 on CPUs with AMX or AVX512-BF16 (Linux flags; elsewhere assume not)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot work on ``device`` here, or None.

    Inductor builds C++ kernels on the CPU (it needs a compiler: $CXX, g++, clang++ or c++) and
    Triton kernels on CUDA; MPS and other devices are left eager.
    """
    if device.type == "cpu":
        candidates = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
        if not any(c and shutil.which(c) for c in candidates):
            return "no C++ compiler was found (torch.compile on the CPU needs g++ or clang++)"
        return None
    if device.type == "cuda":
        return None
    return f"torch.compile is not used on {device.type}"


# ---------------------------------------------------------------- the stop flag
# Set by the trainer's SIGINT/SIGTERM handler. Long loops that run between two training steps
# (evaluation batches, sampled tokens) poll it so Ctrl-C is answered within a batch or a token:
# `check_stop()` raises StopRequested, which the trainer catches, saves and exits.

_STOP = threading.Event()


class StopRequested(BaseException):
    """A stop (Ctrl-C, SIGTERM) was requested while an eval or a demo ran.

    A BaseException, like KeyboardInterrupt, so a broad ``except Exception`` in a demo does not swallow it.
    """


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


def check_stop() -> None:
    """Raise StopRequested if a stop was requested: the one-line poll for eval and sampling loops."""
    if _STOP.is_set():
        raise StopRequested
