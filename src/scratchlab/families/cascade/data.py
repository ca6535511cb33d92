"""Continuous-signal data for the cascade family: clips of frames [T, F], windows and (input, target) pairs.

Two sources, chosen by ``data.path``:

- a packed feature folder (`pack_frames_dir`, ``scratchlab data frames DIR --pack OUT``): one
  memory-mapped file plus an index (data/packed.py), opened without reading any clip;
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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchlab.data.manifest import MANIFEST, ManifestRow, read_manifest, split_of
from scratchlab.data.packed import ClipView, PackedClips, is_packed, pack_writer, split_key
from scratchlab.data.windows import WindowMode, clip_window_starts
from scratchlab.errors import UserError

SYNTHETIC = "synthetic"

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

    train: Sequence[np.ndarray]  # a list, or a `ClipView` into a packed dataset
    val: Sequence[np.ndarray]
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
    return split_of(name, val_fraction, "sha256") == "val"


def _read_manifest(root: Path) -> list[ManifestRow]:
    """The manifest's rows; any line that is not a usable row refuses the data (cascade folders are all-or-nothing)."""
    rows, bad = read_manifest(root, "frames", '{"frames": "clip.npy"}')
    if bad:
        raise UserError(f"data.path {root}: {MANIFEST}: " + "; ".join(f"{b.file}: {b.reason}" for b in bad[:5])
                        + f"; fix {MANIFEST} (one {{\"frames\": \"clip.npy\"}} object a line)")
    if not rows:
        raise UserError(f"{root / MANIFEST} lists no clips; add {{\"frames\": \"clip.npy\"}} lines")
    return rows


def _frames_problem(array: np.ndarray) -> str | None:
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        return f"dtype {getattr(array, 'dtype', type(array).__name__)}, expected float"
    if array.ndim != 2:
        return f"shape {array.shape}, expected [frames, features]"
    if array.shape[0] == 0 or array.shape[1] == 0:
        return f"empty (shape {array.shape})"
    return None


def _load_clip(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(frames as float32, None) or (None, why the file is bad)."""
    if not path.is_file():
        return None, "missing"
    try:
        array = np.load(path, allow_pickle=False)  # no pickle: a data file must not run code
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported by name
        return None, f"unreadable ({type(exc).__name__})"
    if (why := _frames_problem(array)) is not None:
        return None, why
    if not np.isfinite(array).all():
        return None, "contains NaN/Inf"
    return array.astype(np.float32, copy=False), None


def _frame_rate(rows: list[ManifestRow]) -> float | None:
    rates = {r.row.get("frame_rate") for r in rows}
    rate = rates.pop() if len(rates) == 1 else None
    return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0 else None


def _scan_frames(root: Path, sink=None, keep: bool = True, progress=None) -> tuple[list[ManifestRow], dict, float | None]:
    """Validate every clip, one at a time; any bad file refuses the data with every bad file named.

    Pass 1 reads headers only, to find the features width most clips have; pass 2 loads each clip,
    checks it, and keeps it (``keep``) and/or hands it to ``sink`` (packing).
    """
    if not root.is_dir():
        raise UserError(f"data.path {root} is not a folder; give a folder of .npy frames with {MANIFEST}, "
                        "or data.path=synthetic")
    rows = _read_manifest(root)
    widths: dict[str, int] = {}
    for r in rows:
        try:
            header = np.load(r.path, allow_pickle=False, mmap_mode="r")
            if header.ndim == 2 and np.issubdtype(header.dtype, np.floating):
                widths[r.name] = int(header.shape[1])
        except Exception:  # noqa: BLE001 - pass 2 names the problem
            pass
    common = max(sorted(set(widths.values())), key=lambda w: sum(v == w for v in widths.values()), default=None)
    clips: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for n, r in enumerate(rows):
        if progress and n % 256 == 0:
            progress("checking frames", n, len(rows))
        array, why = _load_clip(r.path)
        if why is None and array.shape[1] != common:  # the most common width is taken as right
            why = f"{array.shape[1]} features, most clips have {common}"
        if why is not None:
            bad.append(f"{r.name} ({why})")
            continue
        if keep:
            clips[r.name] = array
        if sink is not None and not bad:
            sink(r.name, array)
    if progress:
        progress("checking frames", len(rows), len(rows))
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UserError(f"data.path {root}: {len(bad)} bad file(s): {shown}; fix or remove them from {MANIFEST}")
    if len(rows) < 2:
        raise UserError(f"data.path {root}: {len(rows)} clip(s); at least 2 are needed (train and validation)")
    return rows, clips, _frame_rate(rows)


def _split_names(names: list[str], keys: list[int], val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the train and val clips; a tiny folder that leaves a split empty moves the clip with the
    smallest hash across (deterministic)."""
    val = [i for i, k in enumerate(keys) if k / 2**64 < val_fraction]
    train = [i for i, k in enumerate(keys) if not k / 2**64 < val_fraction]
    if not val:
        val = [min(train, key=lambda i: keys[i])]
        train.remove(val[0])
    if not train:
        train = [min(val, key=lambda i: keys[i])]
        val.remove(train[0])
    return train, val


def load_feature_folder(root: str | Path, val_fraction: float = 0.1) -> SignalData:
    """Read and validate a feature folder; any bad file refuses the data with every bad file named."""
    root = Path(root)
    rows, clips, frame_rate = _scan_frames(root)
    names = [r.name for r in rows]
    train, val = _split_names(names, [split_key(n) for n in names], val_fraction)
    width = next(iter(clips.values())).shape[1]
    return SignalData([clips[names[i]] for i in train], [clips[names[i]] for i in val], width,
                      str(root.resolve()), [names[i] for i in train], [names[i] for i in val], frame_rate)


def pack_frames_dir(path: str | Path, out: str | Path, progress=None) -> Path:
    """Validate a feature folder once and write it as one memory-mapped dataset (data/packed.py)."""
    root = Path(path)
    with pack_writer(out, source=str(root.resolve()), kind="frames", dtype=np.float32) as writer:
        def sink(name: str, array: np.ndarray) -> None:
            writer.add(name, array)

        rows, _, frame_rate = _scan_frames(root, sink=sink, keep=False, progress=progress)
        writer.finish(frame_rate=frame_rate)
    return Path(out)


def open_packed_frames(path: str | Path, val_fraction: float = 0.1) -> SignalData:
    """A packed feature folder: clips are views into the memory map, nothing is scanned."""
    store = PackedClips(path, kind="frames")
    keys = [int(k) for k in store.split_keys]
    train, val = _split_names([store.name(i) for i in range(len(store))], keys, val_fraction)
    rate = store.meta.get("frame_rate")
    return SignalData(ClipView(store, train), ClipView(store, val), store.width, str(Path(path).resolve()),
                      [store.name(i) for i in train], [store.name(i) for i in val],
                      float(rate) if rate else None)


def load_signals(path: str, val_fraction: float = 0.1) -> SignalData:
    """``data.path``: ``synthetic``, a packed feature folder (`pack_frames_dir`) or a feature folder."""
    if path == SYNTHETIC:
        return synthetic_data()
    if path == "stdlib":
        raise UserError("model.family=cascade needs continuous frames: set data.path to a folder of .npy [T, F] "
                        f"arrays with {MANIFEST}, or data.path=synthetic")
    if is_packed(path):
        return open_packed_frames(path, val_fraction)
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
    lens = clips.lengths if isinstance(clips, ClipView) else [len(c) for c in clips]
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


def usable_clips(clips: Sequence[np.ndarray], window: int) -> int:
    lens = clips.lengths if isinstance(clips, ClipView) else [len(c) for c in clips]
    return int(sum(n >= window for n in lens))
