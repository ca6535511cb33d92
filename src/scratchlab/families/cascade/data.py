"""Continuous-signal data for the cascade family: clips of frames [T, F], windows and (input, target) pairs.

Two sources, chosen by ``data.path``:

- a folder of ``.npy`` float arrays shaped [T, F] (frames x features: mel bins, codec latents, ...)
  listed in ``manifest.jsonl``, one ``{"frames": "clip.npy", ...}`` object a line (other keys are
  kept but unused). Every file is validated; bad ones are listed by name and the data is refused,
  never silently used. Clips go to train or val by a hash of their file name (``data.val_fraction``),
  so the split is deterministic and stable when clips are added.
- ``synthetic``: a built-in signal (sums of sinusoids whose frequencies drift, mixed into F features,
  plus noise), generated deterministically in memory.

Windows come from the one windowing module (`clip_window_starts`: ``random`` for training, ``fixed``
for eval). The (input, target, context) triple is made HERE ONLY, by `make_pairs`, from one window of
``seq_len + horizon`` frames:

    inputs[t]  = frame[t]                  t = 0 .. T-1
    targets[t] = frame[t + horizon]        horizon = 1 (next_frame) or segment_len (next_segment)
    context[t] = targets[t - horizon]      the targets already known at time t (teacher forcing,
                 (zeros for t < horizon)   shifted); context[t] = targets[t] would be a leak

With one stream (inputs and targets cut from the same frames) the context equals the inputs with its
first ``horizon`` frames zeroed; the model still takes it as a separate path, as the cascade is defined.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchlab.data.windows import WindowMode, clip_window_starts
from scratchlab.errors import UserError

SYNTHETIC = "synthetic"
MANIFEST = "manifest.jsonl"

# The synthetic signal: clips x frames, features mixed from a few drifting sinusoids.
SYNTH_FEATURES = 8
SYNTH_SOURCES = 4
SYNTH_TRAIN_CLIPS, SYNTH_VAL_CLIPS, SYNTH_FRAMES = 96, 12, 512
SYNTH_PERIODS = (8.0, 40.0)  # frames per cycle of the sources
SYNTH_DRIFT = 0.15  # relative frequency drift (a slow sinusoid over the clip)
SYNTH_NOISE = 0.05  # std of white noise added to every feature
SYNTH_SEED = 20240601
SYNTH_FRAME_RATE = 25.0  # nominal: only turns `scratchlab sample --seconds` into frames


@dataclass
class SignalData:
    """Train and val clips (float32 arrays [T, F]) and where they came from."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    n_features: int
    source: str  # "synthetic" or the folder's absolute path
    train_names: list[str] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)
    frame_rate: float | None = None  # frames per second: the manifest's "frame_rate", if its lines agree

    def summary(self) -> dict:
        def stats(clips: list[np.ndarray]) -> dict:
            lens = [len(c) for c in clips]
            return {"clips": len(clips), "frames": int(sum(lens)), "min_len": min(lens, default=0),
                    "max_len": max(lens, default=0)}

        return {"source": self.source, "n_features": self.n_features, "frame_rate": self.frame_rate,
                "train": stats(self.train), "val": stats(self.val)}


# ---------------------------------------------------------------- sources


def synthetic_clip(rng: np.random.Generator, n_frames: int = SYNTH_FRAMES, n_features: int = SYNTH_FEATURES) -> np.ndarray:
    """One clip: SYNTH_SOURCES sinusoids with slowly drifting frequency, mixed into n_features, plus noise."""
    t = np.arange(n_frames, dtype=np.float64)
    periods = np.exp(rng.uniform(np.log(SYNTH_PERIODS[0]), np.log(SYNTH_PERIODS[1]), SYNTH_SOURCES))
    drift_period = rng.uniform(0.5, 2.0, SYNTH_SOURCES) * n_frames
    drift_phase = rng.uniform(0, 2 * np.pi, SYNTH_SOURCES)
    # Instantaneous frequency f(t) = f0 (1 + drift sin(...)); the phase is its running sum.
    freq = (1 / periods)[:, None] * (1 + SYNTH_DRIFT * np.sin(2 * np.pi * t[None, :] / drift_period[:, None]
                                                                + drift_phase[:, None]))
    phase = 2 * np.pi * np.cumsum(freq, axis=1) + rng.uniform(0, 2 * np.pi, SYNTH_SOURCES)[:, None]
    sources = np.sin(phase)  # [S, T]
    mix = rng.normal(0, 1 / np.sqrt(SYNTH_SOURCES), (n_features, SYNTH_SOURCES))
    frames = (mix @ sources).T + rng.normal(0, SYNTH_NOISE, (n_frames, n_features))
    return frames.astype(np.float32)


def synthetic_data() -> SignalData:
    """The built-in signal: the same clips on every call (fixed seeds; train and val from different seeds)."""
    train_rng, val_rng = np.random.default_rng(SYNTH_SEED), np.random.default_rng(SYNTH_SEED + 1)
    train = [synthetic_clip(train_rng) for _ in range(SYNTH_TRAIN_CLIPS)]
    val = [synthetic_clip(val_rng) for _ in range(SYNTH_VAL_CLIPS)]
    return SignalData(train, val, SYNTH_FEATURES, SYNTHETIC, [f"synthetic_{i:03d}" for i in range(len(train))],
                      [f"synthetic_val_{i:03d}" for i in range(len(val))], SYNTH_FRAME_RATE)


def is_val_clip(name: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of the file name: stable across machines and when clips are added."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _read_manifest(root: Path) -> list[dict]:
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise UserError(f"data.path {root}: no {MANIFEST}; write one line {{\"frames\": \"clip.npy\"}} per clip "
                        "(or use data.path=synthetic)")
    names = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{manifest}:{n}: invalid JSON ({exc.msg}); one object a line") from exc
        if not isinstance(entry, dict) or not isinstance(entry.get("frames"), str):
            raise UserError(f"{manifest}:{n}: each line needs a \"frames\" file name (got {line[:80]!r})")
        names.append(entry)
    if not names:
        raise UserError(f"{manifest} lists no clips; add {{\"frames\": \"clip.npy\"}} lines")
    return names


def _load_clip(root: Path, name: str) -> tuple[np.ndarray | None, str | None]:
    """(frames as float32, None) or (None, why the file is bad)."""
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        return None, "outside the data folder"
    if not path.is_file():
        return None, "missing"
    try:
        array = np.load(path, allow_pickle=False)  # no pickle: a data file must not run code
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported by name
        return None, f"unreadable ({type(exc).__name__})"
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        return None, f"dtype {getattr(array, 'dtype', type(array).__name__)}, expected float"
    if array.ndim != 2:
        return None, f"shape {array.shape}, expected [frames, features]"
    if array.shape[0] == 0 or array.shape[1] == 0:
        return None, f"empty (shape {array.shape})"
    if not np.isfinite(array).all():
        return None, "contains NaN/Inf"
    return array.astype(np.float32, copy=False), None


def load_feature_folder(root: str | Path, val_fraction: float = 0.1) -> SignalData:
    """Read and validate a feature folder; any bad file refuses the data with every bad file named."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.path {root} is not a folder; give a folder of .npy frames with {MANIFEST}, "
                        "or data.path=synthetic")
    entries = _read_manifest(root)
    names = [e["frames"] for e in entries]
    rates = {e.get("frame_rate") for e in entries}
    rate = rates.pop() if len(rates) == 1 else None
    frame_rate = float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0 else None
    clips: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for name in names:
        array, why = _load_clip(root, name)
        if why is not None:
            bad.append(f"{name} ({why})")
        else:
            clips[name] = array
    widths = sorted({a.shape[1] for a in clips.values()})
    if len(widths) > 1:  # the most common width is taken as right; the others are named
        common = max(widths, key=lambda w: sum(a.shape[1] == w for a in clips.values()))
        bad += [f"{n} ({a.shape[1]} features, most clips have {common})" for n, a in clips.items() if a.shape[1] != common]
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UserError(f"data.path {root}: {len(bad)} bad file(s): {shown}; fix or remove them from {MANIFEST}")
    train_names = [n for n in clips if not is_val_clip(n, val_fraction)]
    val_names = [n for n in clips if is_val_clip(n, val_fraction)]
    # A tiny folder can leave a split empty: move the clip with the smallest hash across (deterministic).
    if len(clips) < 2:
        raise UserError(f"data.path {root}: {len(clips)} clip(s); at least 2 are needed (train and validation)")
    key = lambda n: hashlib.sha256(n.encode()).digest()  # noqa: E731
    if not val_names:
        val_names = [min(train_names, key=key)]
        train_names.remove(val_names[0])
    if not train_names:
        train_names = [min(val_names, key=key)]
        val_names.remove(train_names[0])
    return SignalData([clips[n] for n in train_names], [clips[n] for n in val_names], widths[0],
                      str(root.resolve()), train_names, val_names, frame_rate)


def load_signals(path: str, val_fraction: float = 0.1) -> SignalData:
    """``data.path``: ``synthetic`` or a feature folder."""
    if path == SYNTHETIC:
        return synthetic_data()
    if path == "stdlib":
        raise UserError("model.family=cascade needs continuous frames: set data.path to a folder of .npy [T, F] "
                        f"arrays with {MANIFEST}, or data.path=synthetic")
    return load_feature_folder(path, val_fraction)


# ---------------------------------------------------------------- windows and pairs


def horizon_of(target: str, segment_len: int) -> int:
    """Frames between an input and its target: 1 (next_frame) or segment_len (next_segment)."""
    if target == "next_frame":
        return 1
    if target == "next_segment":
        return segment_len
    raise ValueError(f"unknown model.cascade.target {target!r}")


def make_pairs(window: torch.Tensor, horizon: int) -> dict[str, torch.Tensor]:
    """THE (inputs, targets, context) of windows [B, T + horizon, F]; see the module docstring."""
    T = window.shape[1] - horizon
    if T < 1:
        raise ValueError(f"a window of {window.shape[1]} frames has no pair at horizon {horizon}")
    inputs, targets = window[:, :T], window[:, horizon:]
    context = torch.zeros_like(targets)
    context[:, horizon:] = targets[:, : T - horizon]  # context[t] = targets[t - horizon]: the past only
    return {"inputs": inputs, "targets": targets, "context": context}


def window_of(batch: dict[str, torch.Tensor], horizon: int) -> torch.Tensor:
    """The frames a batch was cut from, [B, T + horizon, F] (inverse of `make_pairs`)."""
    return torch.cat([batch["inputs"], batch["targets"][:, -horizon:]], dim=1)


def get_windows(
    clips: list[np.ndarray],
    window: int,
    batch_size: int,
    mode: WindowMode,
    *,
    generator: torch.Generator | None = None,
    batch_index: int = 0,
    count: int | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """One batch of windows [B, window, F] from the one windowing module (no window crosses clips).

    ``rows``: cut only these rows of the batch (every row's window is still drawn: same data position)."""
    lens = [len(c) for c in clips]
    clip_idx, starts = clip_window_starts(lens, window, batch_size, mode, generator=generator,
                                          batch_index=batch_index, count=count)
    if rows is not None:
        clip_idx, starts = clip_idx[rows], starts[rows]
    return torch.from_numpy(np.stack([clips[c][s : s + window] for c, s in zip(clip_idx, starts)]))


def get_pairs(
    clips: list[np.ndarray],
    seq_len: int,
    horizon: int,
    batch_size: int,
    mode: WindowMode,
    *,
    generator: torch.Generator | None = None,
    batch_index: int = 0,
    count: int | None = None,
    rows: slice | None = None,
) -> dict[str, torch.Tensor]:
    """A batch of (inputs, targets, context), each [B, seq_len, F] (only ``rows`` of it, if given)."""
    frames = get_windows(clips, seq_len + horizon, batch_size, mode, generator=generator,
                         batch_index=batch_index, count=count, rows=rows)
    return make_pairs(frames, horizon)


def usable_clips(clips: list[np.ndarray], window: int) -> int:
    return sum(len(c) >= window for c in clips)
