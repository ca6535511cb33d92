"""Checkpoints: atomic, never non-finite, loadable without unpickling arbitrary objects.

Layout of one checkpoint (a directory under ``RUN/checkpoints/``)::

    step_000500/
      model.safetensors   weights (safetensors: no code execution on load)
      trainer.pt          optimizer state and RNG states, loaded with weights_only=True
      state.json          step, tokens, clip history, best val loss ...
      manifest.json       sha256 and size of every file above (written last)

A checkpoint is written into a hidden temporary directory, every file fsynced, then
renamed into place in one step, so a kill during a save leaves the previous
checkpoints intact and never a half-written one under a real name. A save that fails
(disk full, read-only) removes its temporary directory and raises one line.

The manifest is checked on load (`verify_checkpoint`): flipped bytes in the weights or the
optimizer state are refused instead of trained on, and a resume falls back to the newest
checkpoint that verifies (`latest_verified_checkpoint`). Checkpoints written before manifests
existed load without verification.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from scratchlab.errors import UserError
from scratchlab.fileio import read_json_object, why

STEP_DIR = re.compile(r"^step_(\d{6,})$")
BEST = "best"
MANIFEST = "manifest.json"
CORRUPT_SUFFIX = ".corrupt"  # a corrupt checkpoint a resume moved out of the way (kept for inspection)
_CHUNK = 1 << 20


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, read-only, no permission); nothing partial is left."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))


def verify_checkpoint(ckpt: Path, names: tuple[str, ...] | None = None) -> tuple[str, str] | None:
    """(file, why) for the first file of ``ckpt`` (or of ``names``) that fails its manifest; None when it verifies.

    A checkpoint without a manifest (written by an older version) is not verified: None.
    """
    if not (ckpt / MANIFEST).exists():
        return None
    manifest = read_json_object(ckpt / MANIFEST, warn=False)
    files = manifest.get("files") if manifest else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return MANIFEST, "unreadable"
    for name in names if names is not None else tuple(files):
        entry = files.get(name)
        if entry is None:
            continue  # not part of this checkpoint (e.g. trainer.pt of a weights-only one)
        path = ckpt / name
        try:
            size = path.stat().st_size
            if size != entry.get("bytes"):
                return name, f"{size} bytes, its manifest says {entry.get('bytes')}"
            if file_sha256(path) != entry.get("sha256"):
                return name, f"sha256 differs from {MANIFEST}: flipped or overwritten bytes"
        except OSError as exc:
            return name, f"unreadable: {why(exc)}"
    return None


def corrupt_message(ckpt: Path, problem: tuple[str, str]) -> str:
    return f"checkpoint file {ckpt / problem[0]} is corrupt or truncated ({problem[1]})"


def _check(ckpt: Path, name: str) -> None:
    problem = verify_checkpoint(ckpt, (name,))
    if problem:
        raise UserError(f"{corrupt_message(ckpt, problem)}; resume falls back to an earlier checkpoint by itself, "
                        "sample and export take another with --checkpoint step_N")


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
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_weights(model, tmp / "model.safetensors", tied)
        if optimizer is not None:
            optim_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
            torch.save({"optimizer": optim_state, "rng": rng or {}}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        write_manifest(tmp)
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        final = folder / name
        if final.exists():  # replacing (e.g. "best"): move the old one aside first, delete after the swap
            old = folder / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a torn save must not keep the disk full
        raise CheckpointSaveError(f"could not save checkpoint {name} in {folder}: {why(exc)}; the previous "
                                  "checkpoints are intact (free space, then resume)") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def latest_verified_checkpoint(folder: Path, on_corrupt: Callable[[Path, tuple[str, str]], None] | None = None
                               ) -> Path | None:
    """The newest step checkpoint that verifies against its manifest; ``on_corrupt(path, (file, why))`` for each
    newer one."""
    for ckpt in reversed(step_checkpoints(folder)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        if on_corrupt is not None:
            on_corrupt(ckpt, problem)
    return None


def prune_checkpoints(folder: Path, keep_last: int, keep: Path | None = None) -> None:
    """Keep the ``keep_last`` newest step checkpoints and ``keep`` (the newest known-good one); drop the rest.

    Also removes the temporary dirs of killed saves: call it only while holding the run's lock.
    """
    for old in step_checkpoints(folder)[:-keep_last]:
        if keep is not None and old.resolve() == keep.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def read_state(ckpt: Path) -> dict[str, Any]:
    _check(ckpt, "state.json")
    state = read_json_object(ckpt / "state.json", warn=False)
    if state is None or not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        raise UserError(f"checkpoint {ckpt} has no readable state.json (a JSON object with an integer step); "
                        "resume from another checkpoint")
    return state


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load safetensors weights into ``model``; a corrupt file or shape mismatch is a UserError."""
    file = ckpt / "model.safetensors"
    if not file.is_file():
        raise UserError(f"checkpoint {ckpt} has no model.safetensors; pick a complete checkpoint")
    _check(ckpt, "model.safetensors")
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, ValueError) as exc:
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
    if file.is_file():
        _check(ckpt, "trainer.pt")
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
