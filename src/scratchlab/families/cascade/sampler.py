"""Continuation of continuous frames by a cascade run: autoregressive rollout, .npy + PNG against the truth.

`rollout` feeds the model its own predictions: each call sees the last ``context_len`` frames
(the training window length), cut into (inputs, context) by the same `signals.make_pairs` as
training, and its outputs at the last ``horizon`` positions are the next ``horizon`` frames
(next_frame: one frame per call; next_segment: a segment per call). No KV cache: the running RMS
scaling depends on the whole window, and these models are small.

`sample_cascade_run(RUN)` continues a validation clip of the run's data (the synthetic signal is
regenerated; a feature folder is read from the path in the run's data.json) and writes
``RUN/samples/continuation_<clip>.npy`` (predicted frames [N, F]) and ``.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scratchlab.families.cascade.data import SYNTH_FRAME_RATE, load_signals, make_pairs
from scratchlab.errors import UserError
from scratchlab.families.base import LoadedRun, SampleRequest
from scratchlab.runtime import autocast

PLOT_FEATURES = 3  # features drawn in the PNG


@torch.no_grad()
def rollout(
    model: nn.Module,
    prompt: torch.Tensor,
    n_frames: int,
    horizon: int,
    context_len: int,
    precision: str = "fp32",
) -> torch.Tensor:
    """``n_frames`` predicted frames [n, F] after ``prompt`` [P, F] (P >= 1), each fed back as input."""
    frames = prompt.float()
    device = next(model.parameters()).device
    while frames.shape[0] < prompt.shape[0] + n_frames:
        window = frames[-context_len:].to(device)
        # make_pairs needs the targets' frames too; their last `horizon` are not used by the context.
        padded = torch.cat([window, window.new_zeros(horizon, window.shape[1])])[None]
        pairs = make_pairs(padded, horizon)
        with autocast(device, precision):
            out = model(pairs["inputs"], pairs["context"])
        new = out[0, -horizon:].float().cpu()
        frames = torch.cat([frames, new])
    return frames[prompt.shape[0] : prompt.shape[0] + n_frames]


def plot_continuation(path: Path, prompt: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, title: str) -> bool:
    """PNG of the first features: prompt, prediction and truth; False if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # the Agg canvas, no pyplot state
    except ImportError:
        return False
    n = min(PLOT_FEATURES, pred.shape[1])
    fig = Figure(figsize=(8, 1.8 * n + 0.6))
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    p = len(prompt)
    for f, ax in enumerate(axes):
        ax.plot(np.arange(p), prompt[:, f], color="0.5", lw=1, label="prompt")
        if truth is not None:
            ax.plot(np.arange(p, p + len(truth)), truth[:, f], color="C0", lw=1, label="truth")
        ax.plot(np.arange(p, p + len(pred)), pred[:, f], color="C3", lw=1, ls="--", label="prediction")
        ax.axvline(p - 0.5, color="0.7", lw=0.8)
        ax.set_ylabel(f"feature {f}")
    axes[0].set_title(title)
    axes[0].legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    return True


def continue_clip(
    model: nn.Module,
    clip: np.ndarray,
    n_prompt: int,
    n_new: int,
    horizon: int,
    context_len: int,
    device: torch.device | str,
    precision: str,
    stem: Path,
    title: str = "",
) -> dict:
    """Roll out ``n_new`` frames after the first ``n_prompt`` of ``clip``; write ``stem``.npy and .png.

    Returns the paths and the rollout MSE against the clip's true frames (where it has them) next to
    the MSE of holding the last prompt frame (the copy baseline of a rollout).
    """
    was_training = model.training
    model.eval()
    try:
        prompt = torch.from_numpy(np.ascontiguousarray(clip[:n_prompt]))
        pred = rollout(model, prompt, n_new, horizon, context_len, precision).numpy()
    finally:
        model.train(was_training)
    truth = clip[n_prompt : n_prompt + n_new]
    stem.parent.mkdir(parents=True, exist_ok=True)
    npy = stem.with_suffix(".npy")
    np.save(npy, pred.astype(np.float32))
    png = stem.with_suffix(".png")
    drawn = plot_continuation(png, clip[:n_prompt], pred, truth if len(truth) else None, title)
    result: dict = {"npy": npy, "png": png if drawn else None, "frames": len(pred)}
    if len(truth):
        k = len(truth)
        result["rollout_mse"] = float(np.mean((pred[:k] - truth) ** 2))
        result["hold_mse"] = float(np.mean((clip[n_prompt - 1][None] - truth) ** 2))
    return result


def sample_frames(
    loaded: LoadedRun,
    *,
    seconds: float | None = None,
    frames: int | None = None,
    clip: int = 0,
    prompt_frames: int | None = None,
    out: str | Path | None = None,
) -> list[Path]:
    """Continue validation clip ``clip`` of a cascade run; returns the written paths (.npy, .png).

    Length: ``frames``, else ``seconds`` x the data's frame rate (the manifest's ``frame_rate``; the
    synthetic signal's nominal 25 frames/s when unknown). The prompt is ``prompt_frames`` (default
    train.seq_len) true frames. The rollout is deterministic (no seed).
    """
    run, cfg, model = loaded.run, loaded.cfg, loaded.model
    device = next(model.parameters()).device
    info = json.loads((run.path / "data.json").read_text()) if (run.path / "data.json").is_file() else {}
    data = load_signals(str(info.get("path", cfg.data.path)), cfg.data.val_fraction)
    if not 0 <= clip < len(data.val):
        raise UserError(f"--clip {clip}: the run's data has {len(data.val)} validation clips (0..{len(data.val) - 1})")
    c = cfg.model.cascade
    horizon = c.segment_len if c.target == "next_segment" else 1
    rate = data.frame_rate or SYNTH_FRAME_RATE
    n_new = frames if frames is not None else max(1, round((seconds if seconds is not None else 5.0) * rate))
    if n_new < 1:
        raise UserError(f"frames ({n_new}) must be at least 1")
    series = data.val[clip]
    n_prompt = prompt_frames if prompt_frames is not None else min(cfg.train.seq_len, len(series) - 1)
    if not 1 <= n_prompt <= len(series):
        raise UserError(f"prompt_frames ({n_prompt}) must be between 1 and the clip's {len(series)} frames")
    out_dir = Path(out) if out is not None else run.path / "samples"
    name = data.val_names[clip] if clip < len(data.val_names) else f"clip{clip}"
    stem = out_dir / f"continuation_{Path(name).stem}"
    result = continue_clip(model, series, n_prompt, n_new, horizon, cfg.train.seq_len, device, "fp32", stem,
                           title=f"{run.path.name}: {name}, {n_prompt} prompt frames")
    return [p for p in (result["npy"], result["png"]) if p is not None]


def sample(loaded: LoadedRun, request: SampleRequest) -> list[str]:
    """The cascade family's `scratchlab sample`: continue the first validation clip (.npy and .png)."""
    return [f"wrote {path}" for path in sample_frames(loaded, seconds=request.seconds, out=request.out)]
