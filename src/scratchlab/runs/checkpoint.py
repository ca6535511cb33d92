"""Checkpoints: atomic, never non-finite, loadable without unpickling arbitrary objects.

Layout of one checkpoint (a directory under ``RUN/checkpoints/``)::

    step_000500/
      model.safetensors   weights (safetensors: no code execution on load)
      trainer.pt          optimizer state and RNG states, loaded with weights_only=True
      state.json          step, tokens, clip history, best val loss ... (written last)

A checkpoint is written into a hidden temporary directory, every file fsynced, then
renamed into place in one step, so a kill during a save leaves the previous
checkpoints intact and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from scratchlab.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{6,})$")
BEST = "best"


class NonFiniteModelError(RuntimeError):
    """Raised instead of saving weights that contain NaN or Inf."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nonfinite_parameters(model: nn.Module | dict[str, torch.Tensor]) -> list[str]:
    named = model.items() if isinstance(model, dict) else model.named_parameters()
    return [name for name, p in named if p.is_floating_point() and not torch.isfinite(p).all()]


def save_weights(model: nn.Module | dict[str, torch.Tensor], file: Path, tied: dict[str, str] | None = None) -> None:
    """model.safetensors from a module, or from a full state dict (gathered from FSDP shards).

    A gathered state dict holds tied weights twice, as separate tensors; ``tied`` ({dropped:
    kept}, the names ``save_model`` would drop) stores them once with the same keys and metadata,
    so the file is the same whichever way the weights were held.
    """
    if isinstance(model, nn.Module):
        save_model(model, str(file))
        return
    tied = tied or {}
    tensors = {k: v.contiguous() for k, v in model.items() if k not in tied}
    save_file(tensors, str(file), metadata={k: v for k, v in tied.items() if k in model} or None)


def save_checkpoint(
    folder: Path,
    name: str,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict | None,
    rng: dict[str, torch.Tensor] | None,
    state: dict,
    tied: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``folder/name`` atomically; refuses non-finite weights.

    ``model`` and ``optimizer`` may be full state dicts already (FSDP gathers them to rank 0);
    ``tied`` then names the tied weights to store once (see ``save_weights``). Without an
    optimizer it is weights-only (the ``best`` checkpoint): it can be sampled from but not resumed.
    """
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteModelError(f"refusing to save non-finite weights (first: {bad[0]}, {len(bad)} tensors)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors", tied)
    if optimizer is not None:
        optim_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save({"optimizer": optim_state, "rng": rng or {}}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    final = folder / name
    if final.exists():  # replacing (e.g. "best"): move the old one aside first, delete after the swap
        old = folder / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(folder)
    return final


def step_checkpoints(folder: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = step_checkpoints(folder)
    return found[-1] if found else None


def resolve_checkpoint(checkpoints: Path, name: str | None = None, *, purpose: str = "load") -> Path:
    """The checkpoint a reader means: ``name`` (a folder under ``checkpoints`` or a path), else ``best``,
    else the latest step. One rule for sample, export and load_run; a missing one is a UserError."""
    if name is not None:
        path: Path | None = Path(name) if Path(name).is_dir() else checkpoints / name
    elif (checkpoints / BEST).is_dir():
        path = checkpoints / BEST
    else:
        path = latest_checkpoint(checkpoints)
    if path is None or not path.is_dir():
        raise UserError(f"run {checkpoints.parent} has no checkpoint{' ' + name if name else ''} to {purpose}")
    return path


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    for old in step_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {ckpt} has no readable state.json ({exc}); resume from another checkpoint") from exc


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load safetensors weights into ``model``; a corrupt file or shape mismatch is a UserError."""
    file = ckpt / "model.safetensors"
    if not file.is_file():
        raise UserError(f"checkpoint {ckpt} has no model.safetensors; pick a complete checkpoint")
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except SafetensorError as exc:
        raise UserError(
            f"checkpoint file {file} is corrupt or truncated ({exc}); delete {ckpt} to fall back to an earlier "
            "checkpoint (or sample another one with --checkpoint step_N)"
        ) from exc
    except RuntimeError as exc:
        detail = str(exc).splitlines()[-1].strip() if str(exc) else "shape mismatch"
        raise UserError(
            f"checkpoint {file} does not match the model ({detail}); the model config or tokenizer/vocab differs "
            "from the run that wrote it"
        ) from exc
    if missing or unexpected:
        raise UserError(
            f"checkpoint {file} does not match the model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); the model config differs from the run that wrote it"
        )


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    file = ckpt / "trainer.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise UserError(f"checkpoint {ckpt} has no trainer.pt; it cannot be resumed (weights-only)") from exc
    except Exception as exc:  # torch raises several types for a corrupt archive
        raise UserError(
            f"checkpoint file {file} is corrupt or truncated ({type(exc).__name__}); delete {ckpt} to resume from "
            "an earlier checkpoint"
        ) from exc


def is_finite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
