"""Pre-encoded codec-token datasets: validate a folder, pack it, split it, and make training batches.

A dataset is a folder of ``.npy`` integer arrays ``[T, K]`` (frames x codebooks) and a
``manifest.jsonl`` with one line per clip::

    {"codes": "clip_0001.npy", "text": "a slow calm loop", "tags": ["calm", "slow"], "duration_s": 4.0}

Every listed file is checked before anything trains on it (readable without pickle, integer
dtype, 2-D, non-empty, the dataset's K, codes in ``[0, codebook_size)``); a bad file is listed
by name with its reason and skipped or refused (``on_bad``), never silently used. The codebook
size is the caller's, else the data's declared one (``codec.json`` from `data encode`, or a
``summary.json`` written with ``--codebook-size``), else inferred.

A folder can be packed once (`pack_codes_dir`, ``scratchlab data codes DIR --pack OUT``) into one
memory-mapped codes file plus an index (data/packed.py); `open_codes_data` opens either form and
serves the same windows. See docs/codec-data.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from scratchlab.data.console import say
from scratchlab.data.manifest import MANIFEST, BadFile, read_manifest, split_of as _split_of
from scratchlab.data.packed import PackedClips, is_packed, pack_writer
from scratchlab.data.windows import WindowMode, clip_window_start
from scratchlab.errors import UserError
from scratchlab.families.codec.conditioning import (
    DEFAULT_MAX_TEXT_BYTES,
    collate_conditions,
    condition_ids,
    condition_text,
    unconditional_ids,
)
from scratchlab.families.codec.patterns import DelayPattern, SpecialIds, codes_window, codes_windows

SUMMARY = "summary.json"
CODEC_INFO = "codec.json"
Split = Literal["train", "val"]
OnBad = Literal["skip", "refuse"]
# (phase, done, total): a progress bar over the clips
ScanProgress = Callable[[str, int, int], None]

__all__ = ["MANIFEST", "BadFile", "CodesSummary", "CodeClip", "CodesData", "open_codes_data", "validate_codes_dir",
           "pack_codes_dir", "split_of", "write_synthetic_codes", "synthetic_clip", "render_summary"]


@dataclass
class CodesSummary:
    """What ``validate_codes_dir`` found (written as summary.json)."""

    path: str
    clips: int
    n_codebooks: int | None
    codebook_size: int | None
    codebook_size_inferred: bool
    max_code: int | None
    frames_total: int  # tokens per codebook
    frames_min: int
    frames_mean: float
    frames_max: int
    hours: float  # sum of duration_s over the clips that give it
    clips_without_duration: int
    tag_coverage: float  # fraction of clips with at least one tag
    top_tags: list[tuple[str, int]]
    codebook_usage: list[float]  # per codebook: fraction of its entries that occur
    bad: list[BadFile] = field(default_factory=list)
    unlisted_npy: int = 0  # .npy files in the folder that the manifest does not list (not used)
    codebook_size_from: str = "inferred"  # "given", "codec.json", "summary.json" or "inferred"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CodesSummary:
        d = dict(d)
        d["bad"] = [BadFile(**b) for b in d.get("bad", [])]
        d["top_tags"] = [tuple(t) for t in d.get("top_tags", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CodeClip:
    """One clip: codes ``[T, K]`` and its conditioning."""

    name: str
    codes: np.ndarray
    text: str
    tags: tuple[str, ...]
    duration_s: float | None


@dataclass
class _Entry:
    name: str
    path: Path
    text: str
    tags: tuple[str, ...]
    duration_s: float | None


def _row_problem(row: dict) -> str | None:
    text, tags, duration = row.get("text", ""), row.get("tags", []), row.get("duration_s")
    if text is not None and not isinstance(text, str):
        return '"text" is not a string'
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        return '"tags" is not a list of strings'
    if duration is not None and (not isinstance(duration, (int, float)) or isinstance(duration, bool)
                                 or not math.isfinite(duration) or duration < 0):
        return '"duration_s" is not a non-negative number'
    return None


def _read_manifest(root: Path) -> tuple[list[_Entry], list[BadFile]]:
    example = '{"codes": "file.npy", "text": ..., "tags": [...]}'
    rows, bad = read_manifest(root, "codes", example, check=_row_problem)
    entries = []
    for r in rows:
        duration = r.row.get("duration_s")
        entries.append(_Entry(r.name, r.path, r.row.get("text") or "", tuple(r.row.get("tags") or ()),
                              None if duration is None else float(duration)))
    return entries, bad


def declared_codebook(root: Path) -> tuple[int | None, int | None, str]:
    """(codebook size, K, where from) that the data declares: codec.json (`data encode`), else a
    summary.json written with an explicit ``--codebook-size``; (None, None, "inferred") when neither."""
    for name in (CODEC_INFO, SUMMARY):
        try:
            info = json.loads((root / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict):
            continue
        size = info.get("codebook_size")
        if name == SUMMARY and info.get("codebook_size_inferred", True):
            continue  # an inferred size is a guess, not a declaration
        k = info.get("n_codebooks")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
            return size, (k if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else None), name
    return None, None, "inferred"


def _load(path: Path, mmap: bool) -> np.ndarray:
    # allow_pickle=False: a .npy holding Python objects is refused instead of unpickled.
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def _shape_problem(arr: np.ndarray) -> str | None:
    if arr.dtype.kind not in "iu":
        return f"dtype {arr.dtype}, expected integer codes"
    if arr.ndim != 2:
        return f"shape {tuple(arr.shape)}, expected [T, K] (2-D)"
    if arr.shape[0] == 0:
        return "empty (0 frames)"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class _Scan:
    entries: list[_Entry]
    arrays: list[np.ndarray | None]
    summary: CodesSummary


def _scan(root: Path, codebook_size: int | None, n_codebooks: int | None, keep: bool,
          sink: Callable[[_Entry, np.ndarray], None] | None = None, progress: ScanProgress | None = None) -> _Scan:
    """Validate every clip, one file at a time (``keep``: hold the arrays; ``sink``: hand each kept clip on)."""
    if codebook_size is not None and codebook_size < 1:
        raise UserError(f"--codebook-size must be >= 1, got {codebook_size}")
    entries, bad = _read_manifest(root)
    size_from = "given"
    if codebook_size is None:
        codebook_size, declared_k, size_from = declared_codebook(root)
        n_codebooks = n_codebooks if n_codebooks is not None else declared_k
    # Pass 1: headers only (mmap), to find the dataset's K before judging any file by it.
    shapes: dict[str, tuple[int, ...]] = {}
    ok: list[_Entry] = []
    for n, e in enumerate(entries):
        if progress and n % 512 == 0:
            progress("checking headers", n, len(entries))
        if not e.path.is_file():
            bad.append(BadFile(e.name, "missing"))
            continue
        try:
            arr = _load(e.path, mmap=True)
        except Exception:  # noqa: BLE001 - numpy cannot mmap empty arrays; a full load tells the reason
            try:
                arr = _load(e.path, mmap=False)
            except Exception as exc:  # noqa: BLE001 - any failure to read is the file's problem
                bad.append(BadFile(e.name, f"unreadable ({type(exc).__name__}: {exc})"))
                continue
        problem = _shape_problem(arr)
        shapes[e.name] = tuple(arr.shape)
        del arr
        if problem:
            bad.append(BadFile(e.name, problem))
            continue
        ok.append(e)
    if progress:
        progress("checking headers", len(entries), len(entries))
    if n_codebooks is None and ok:
        n_codebooks = Counter(shapes[e.name][1] for e in ok).most_common(1)[0][0]
    # Pass 2: the values.
    kept: list[_Entry] = []
    arrays: list[np.ndarray | None] = []
    counts: list[np.ndarray] = []
    max_code = -1
    for n, e in enumerate(ok):
        if progress and n % 256 == 0:
            progress("checking codes", n, len(ok))
        if shapes[e.name][1] != n_codebooks:
            bad.append(BadFile(e.name, f"K={shapes[e.name][1]} codebooks, expected {n_codebooks}"))
            continue
        try:
            arr = _load(e.path, mmap=False)
        except Exception as exc:  # noqa: BLE001
            bad.append(BadFile(e.name, f"unreadable ({type(exc).__name__}: {exc})"))
            continue
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            bad.append(BadFile(e.name, f"negative code {lo}"))
            continue
        if codebook_size is not None and hi >= codebook_size:
            bad.append(BadFile(e.name, f"code {hi} >= codebook size {codebook_size}"
                                       + (f" (declared in {size_from})" if size_from not in ("given",) else "")))
            continue
        max_code = max(max_code, hi)
        for k in range(arr.shape[1]):
            c = np.bincount(arr[:, k].astype(np.int64), minlength=hi + 1)
            if k == len(counts):
                counts.append(np.zeros(0, dtype=np.int64))
            if len(c) > len(counts[k]):
                counts[k] = np.pad(counts[k], (0, len(c) - len(counts[k])))
            counts[k][: len(c)] += c
        kept.append(e)
        arrays.append(arr if keep else None)
        if sink is not None:
            sink(e, arr)
    if progress:
        progress("checking codes", len(ok), len(ok))
    inferred = codebook_size is None
    if inferred and kept:
        codebook_size = _next_pow2(max_code + 1)
    lengths = np.array([shapes[e.name][0] for e in kept], dtype=np.int64)
    tags = Counter(t for e in kept for t in e.tags)
    summary = CodesSummary(
        path=str(root),
        clips=len(kept),
        n_codebooks=n_codebooks if kept else None,
        codebook_size=codebook_size if kept else None,
        codebook_size_inferred=inferred,
        max_code=max_code if kept else None,
        frames_total=int(lengths.sum()),
        frames_min=int(lengths.min()) if kept else 0,
        frames_mean=round(float(lengths.mean()), 2) if kept else 0.0,
        frames_max=int(lengths.max()) if kept else 0,
        hours=round(sum(e.duration_s or 0.0 for e in kept) / 3600, 4),
        clips_without_duration=sum(e.duration_s is None for e in kept),
        tag_coverage=round(sum(bool(e.tags) for e in kept) / len(kept), 4) if kept else 0.0,
        top_tags=tags.most_common(20),
        codebook_usage=[round(float((c > 0).sum()) / codebook_size, 4) for c in counts] if kept else [],
        bad=bad,
        unlisted_npy=len({p.resolve() for p in root.glob("*.npy")} - {e.path for e in entries}),
        codebook_size_from=size_from if not inferred else "inferred",
    )
    return _Scan(kept, arrays, summary)


def _refuse(summary: CodesSummary) -> None:
    shown = "; ".join(f"{b.file}: {b.reason}" for b in summary.bad[:3])
    more = f" (+{len(summary.bad) - 3} more: `scratchlab data codes {summary.path}` lists them)" if len(summary.bad) > 3 else ""
    raise UserError(f"{len(summary.bad)} bad file(s) in {summary.path}: {shown}{more}; "
                    "fix or remove them, or let them be skipped (on_bad='skip', the CLI's default without --refuse-bad)")


def skipped_note(summary: CodesSummary, shown: int = 3) -> str:
    """One line naming the files a dataset skips (what training prints when it uses the rest)."""
    names = "; ".join(f"{b.file}: {b.reason}" for b in summary.bad[:shown])
    more = f" (+{len(summary.bad) - shown} more)" if len(summary.bad) > shown else ""
    return (f"skipping {len(summary.bad)} bad file(s) of {summary.path}: {names}{more}; all are listed by "
            f"`scratchlab data codes {summary.path}` and in the run's data.json")


def validate_codes_dir(
    path: str | Path,
    codebook_size: int | None = None,
    n_codebooks: int | None = None,
    on_bad: OnBad = "skip",
    write_summary: bool = False,
    progress: ScanProgress | None = None,
) -> CodesSummary:
    """Check every clip of a codes dataset and summarize it; bad files are listed with their reason.

    ``codebook_size`` is the data's declared one (`declared_codebook`) unless given, else inferred
    (largest code + 1, rounded up to a power of two); codes at or above a given or declared size
    make a file bad. ``n_codebooks`` is the most common K unless given or declared.
    ``on_bad="refuse"`` raises a UserError naming the bad files; ``write_summary`` writes
    summary.json in the folder first (so the full list is there either way).
    """
    if on_bad not in ("skip", "refuse"):
        raise ValueError(f"on_bad must be 'skip' or 'refuse', got {on_bad!r}")
    root = Path(path)
    summary = _scan(root, codebook_size, n_codebooks, keep=False, progress=progress).summary
    if write_summary:
        (root / SUMMARY).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    if on_bad == "refuse" and summary.bad:
        _refuse(summary)
    return summary


def pack_codes_dir(
    path: str | Path,
    out: str | Path,
    codebook_size: int | None = None,
    n_codebooks: int | None = None,
    on_bad: OnBad = "skip",
    write_summary: bool = False,
    progress: ScanProgress | None = None,
) -> CodesSummary:
    """Validate a codes folder once and write its good clips as one packed dataset (data/packed.py).

    Streaming: one clip in memory at a time. Training on ``out`` opens it without scanning any file.
    The checks and the summary are `validate_codes_dir`'s (``write_summary``: summary.json in the folder).
    """
    root = Path(path)
    with pack_writer(out, source=str(root)) as writer:
        def sink(e: _Entry, arr: np.ndarray) -> None:
            writer.add(e.name, arr, e.text, e.tags, e.duration_s)

        summary = _scan(root, codebook_size, n_codebooks, keep=False, sink=sink, progress=progress).summary
        if write_summary:
            (root / SUMMARY).write_text(json.dumps(summary.to_json(), indent=2) + "\n")
        if on_bad == "refuse" and summary.bad:
            _refuse(summary)
        if not summary.clips:
            raise UserError(f"no usable clips in {root} ({len(summary.bad)} bad); nothing to pack")
        writer.finish(summary=summary.to_json(), codebook_size=summary.codebook_size, n_codebooks=summary.n_codebooks)
    return summary


def split_of(name: str, val_fraction: float) -> Split:
    """``val`` for a ``val_fraction`` of clips by a hash of the file name: stable across runs and machines."""
    return _split_of(name, val_fraction, "sha256")


class _MemoryClips:
    """Clips held in memory (an unpacked folder): the same accessors as `PackedClips`."""

    def __init__(self, clips: list[CodeClip]) -> None:
        self._clips = clips
        self.lengths = np.array([len(c.codes) for c in clips], dtype=np.int64)
        self.durations = np.array([np.nan if c.duration_s is None else c.duration_s for c in clips])
        self.split_keys = np.array([int.from_bytes(hashlib.sha256(c.name.encode()).digest()[:8], "big")
                                    for c in clips], dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._clips)

    def codes(self, i: int) -> np.ndarray:
        return self._clips[i].codes

    def name(self, i: int) -> str:
        return self._clips[i].name

    def duration(self, i: int) -> float | None:
        return self._clips[i].duration_s

    def text_tags(self, i: int) -> tuple[str, tuple[str, ...]]:
        c = self._clips[i]
        return c.text, c.tags


class _ClipList(Sequence):
    """``data.clips``: every clip, built on access (a packed dataset holds no per-clip objects)."""

    def __init__(self, data: CodesData) -> None:
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._data.clip(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._data.clip(int(i) % len(self))


class CodesData:
    """A validated codes dataset (in memory, or packed and memory-mapped), split into train/val by clip.
    Build with ``open_codes_data``."""

    def __init__(self, clips: list[CodeClip] | _MemoryClips | PackedClips, summary: CodesSummary,
                 val_fraction: float) -> None:
        store = _MemoryClips(clips) if isinstance(clips, list) else clips
        if not len(store):
            raise UserError(f"no usable clips in {summary.path} ({len(summary.bad)} bad); "
                            "run `scratchlab data codes DIR` to see why")
        self.store = store
        self.clips = _ClipList(self)
        self.summary = summary
        self.n_codebooks = int(summary.n_codebooks)
        self.codebook_size = int(summary.codebook_size)
        self.special = SpecialIds.for_codebook(self.codebook_size)
        self.val_fraction = val_fraction
        # split_of(name) == "val"  <=>  sha256(name)[:8] / 2**64 < val_fraction (the keys are those 8 bytes)
        is_val = store.split_keys.astype(np.float64) / 2.0**64 < val_fraction
        val, train = np.flatnonzero(is_val).tolist(), np.flatnonzero(~is_val).tolist()
        keys = store.split_keys
        # Tiny datasets: keep both splits non-empty (the clip with the smallest hash moves), deterministically.
        if val_fraction > 0 and not val and len(train) > 1:
            first = min(train, key=lambda i: int(keys[i]))
            train.remove(first)
            val = [first]
        if not train and len(val) > 1:
            last = max(val, key=lambda i: int(keys[i]))
            val.remove(last)
            train = [last]
        self.splits: dict[str, list[int]] = {"train": train, "val": val}
        self.root = Path(getattr(store, "root", summary.path))
        rates = store.lengths / store.durations
        rates = rates[store.durations > 0]
        self.frame_rate = round(float(np.median(rates)), 4) if len(rates) else None

    @property
    def meta(self) -> dict:
        """What a run records about its data (data.json): the summary, the split, the frame rate."""
        meta = self.summary.to_json()
        meta["bad_count"] = len(meta["bad"])
        meta["bad"] = meta["bad"][:20]
        meta.update(frame_rate=self.frame_rate, val_fraction=self.val_fraction,
                    splits={k: {"clips": len(v), "frames": self.frames(k)} for k, v in self.splits.items()})
        if isinstance(self.store, PackedClips):
            meta["packed"] = str(self.store.root)
        return meta

    def condition_text(self, split: Split, i: int) -> str:
        """The ``i``-th ``split`` clip's condition as one string (text, then the tag line in manifest order);
        ``condition_ids(condition_text(...))`` gives the ids eval batches use."""
        text, tags = self.store.text_tags(self.splits[split][i])
        return "\n".join(part for part in condition_text(text, tags) if part)

    def __len__(self) -> int:
        return len(self.store)

    def n_clips(self, split: Split) -> int:
        return len(self.splits[split])

    def clip(self, i: int, split: Split | None = None) -> CodeClip:
        """Clip ``i`` of the whole dataset, or the ``i``-th clip of ``split``."""
        j = self.splits[split][i] if split else i
        text, tags = self.store.text_tags(j)
        return CodeClip(self.store.name(j), self.store.codes(j), text, tags, self.store.duration(j))

    def frames(self, split: Split) -> int:
        return int(self.store.lengths[self.splits[split]].sum()) if self.splits[split] else 0

    def window(self, i: int, start: int, window: int, pattern: DelayPattern) -> dict:
        """The crop of clip ``i`` at ``start`` (what a random or fixed window at that offset holds)."""
        x, y = codes_window(self.store.codes(i), start, window, pattern, self.special)
        return {"input_ids": x, "labels": y}

    def random_window(self, i: int, window: int, pattern: DelayPattern, generator: torch.Generator) -> dict:
        """A training crop of clip ``i``: ``input_ids``, ``labels``, and ``window_start`` / ``clip_len`` (so the
        doctor's deterministic_windows check can test the crop that training uses)."""
        length = int(self.store.lengths[i])
        start = clip_window_start(length, window, "random", generator=generator)
        x, y = codes_window(self.store.codes(i), start, window, pattern, self.special)
        return {"input_ids": x, "labels": y, "window_start": start, "clip_len": length}

    def batch(
        self,
        split: Split,
        batch_size: int,
        window: int,
        mode: WindowMode,
        generator: torch.Generator | None = None,
        batch_index: int = 0,
        *,
        pattern: DelayPattern,
        uncond_prob: float = 0.0,
        shuffle_tags: bool = True,
        max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
        rows: slice | None = None,
    ) -> dict[str, torch.Tensor]:
        """One batch: ``input_ids``/``labels`` Long ``[B, window + 1 + max_delay, K]``, ``cond_ids``/``cond_mask`` ``[B, C]``.

        ``random`` (training): clips uniformly with replacement, a random crop of each, tags shuffled
        per sample (``shuffle_tags``) and the condition dropped per sample with ``uncond_prob``, all
        drawn from ``generator`` (the data position). The draws do not depend on ``uncond_prob`` or
        ``shuffle_tags``, so runs that differ only in those see the same crops.
        ``fixed`` (eval): sample ``g = batch_index * B + i`` is clip ``g mod n`` at its start, middle or
        end in turn; tags in manifest order; never unconditional. Identical on every call.
        ``rows`` (random mode): build only these rows; every row's draws are still made, in the same
        order, so the generator ends where the whole batch leaves it (a data-parallel rank's block).
        """
        if pattern.n_codebooks != self.n_codebooks:
            raise UserError(f"the delay pattern has {pattern.n_codebooks} codebooks but the data has "
                            f"{self.n_codebooks}; set the model's delays / n_codebooks to {self.n_codebooks}")
        if not 0.0 <= uncond_prob <= 1.0:
            raise UserError(f"uncond_prob must be in [0, 1], got {uncond_prob}")
        ids = self.splits[split]
        if not ids:
            raise UserError(f"the {split} split of {self.summary.path} has no clips; "
                            "add clips or change the val fraction")
        n = len(ids)
        clips, starts, conds = [], [], []
        if mode == "random":
            if generator is None:
                raise ValueError("random batches need a torch.Generator (its state is the data position)")
            picks = torch.randint(0, n, (batch_size,), generator=generator).tolist()
            kept = range(batch_size)[rows] if rows is not None else range(batch_size)
            for row, p in enumerate(picks):
                text, clip_tags = self.store.text_tags(ids[p])
                start = clip_window_start(int(self.store.lengths[ids[p]]), window, "random", generator=generator)
                order = torch.randperm(len(clip_tags), generator=generator).tolist()
                if row not in kept:  # drawn (the data position), not built
                    continue
                clips.append(self.store.codes(ids[p]))
                starts.append(start)
                tags = [clip_tags[j] for j in order] if shuffle_tags else list(clip_tags)
                conds.append(condition_ids(text, tags, max_text_bytes))
            drop = (torch.rand(batch_size, generator=generator) < uncond_prob).tolist()
            conds = [unconditional_ids() if d else c for c, d in zip(conds, [drop[r] for r in kept])]
        elif mode == "fixed":
            for i in range(batch_size):
                g = batch_index * batch_size + i
                c = ids[g % n]
                clips.append(self.store.codes(c))
                starts.append(clip_window_start(int(self.store.lengths[c]), window, "fixed", index=g % n + g // n))
                text, tags = self.store.text_tags(c)
                conds.append(condition_ids(text, tags, max_text_bytes))
        else:
            raise ValueError(f"unknown window mode {mode!r}; use 'random' or 'fixed'")
        input_ids, labels = codes_windows(clips, starts, window, pattern, self.special)
        cond_ids, cond_mask = collate_conditions(conds)
        return {"input_ids": input_ids, "labels": labels, "cond_ids": cond_ids, "cond_mask": cond_mask}


def open_codes_data(
    path: str | Path,
    codebook_size: int | None = None,
    n_codebooks: int | None = None,
    on_bad: OnBad = "skip",
    val_fraction: float = 0.05,
    announce=None,
) -> CodesData:
    """Open a codes dataset: a packed one (memory-mapped, nothing scanned) or a folder (validated, in memory).

    Split by a hash of each file name. Bad files are refused (``on_bad="refuse"``) or skipped, and then
    named through ``announce`` (one line; a callable or the trainer's reporter) and in ``meta``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(path)
    if is_packed(root):
        store = PackedClips(root)
        summary = CodesSummary.from_json(store.summary)
        if n_codebooks is not None and n_codebooks != store.n_codebooks:
            raise UserError(f"{root} is packed with K={store.n_codebooks} codebooks, not {n_codebooks}")
        if codebook_size is not None:
            if summary.max_code is not None and summary.max_code >= codebook_size:
                raise UserError(f"{root} holds codes up to {summary.max_code} >= codebook size {codebook_size}; "
                                f"repack with `scratchlab data codes {summary.path} --codebook-size {codebook_size} "
                                f"--pack {root}`")
            summary.codebook_size, summary.codebook_size_inferred, summary.codebook_size_from = \
                codebook_size, False, "given"
    else:
        scan = _scan(root, codebook_size, n_codebooks, keep=True)
        summary = scan.summary
        store = [CodeClip(e.name, arr, e.text, e.tags, e.duration_s) for e, arr in zip(scan.entries, scan.arrays)]
    if on_bad == "refuse" and summary.bad:
        _refuse(summary)
    if summary.bad:
        say(announce, skipped_note(summary))
    return CodesData(store, summary, val_fraction)


# -- a learnable synthetic dataset (tests, tiny presets, docs)

SYNTH_MOODS = ("calm", "bright", "dark", "lively")
SYNTH_TEMPOS = ("slow", "fast")


def synthetic_clip(
    mood: int, tempo: int, n_frames: int, n_codebooks: int, codebook_size: int, rng: np.random.Generator,
    *, seed: int = 0, period: int = 8, noise: float = 0.05,
) -> np.ndarray:
    """``[T, K]`` codes: codebook 0 loops the mood's motif (each note held 2 frames when slow, from a
    random phase); codebook k is ``(2k+1) * c0 + 7k mod codebook_size``, replaced by a random code
    with probability ``noise``. So codebook 0 is predictable from context or text, the others from
    codebook 0 of the same frame."""
    motif = np.random.default_rng([seed, 1000 + mood]).integers(0, codebook_size, period)
    hold = 2 if tempo == 0 else 1
    phase = int(rng.integers(0, period * hold))
    c0 = motif[((np.arange(n_frames) + phase) // hold) % period]
    codes = np.empty((n_frames, n_codebooks), dtype=np.int64)
    codes[:, 0] = c0
    for k in range(1, n_codebooks):
        codes[:, k] = ((2 * k + 1) * c0 + 7 * k) % codebook_size
        flip = rng.random(n_frames) < noise
        codes[flip, k] = rng.integers(0, codebook_size, int(flip.sum()))
    return codes


def write_synthetic_codes(
    out_dir: str | Path,
    n_clips: int = 64,
    T: int = 200,
    K: int = 4,
    codebook_size: int = 64,
    seed: int = 0,
    *,
    min_T: int | None = None,
    frame_rate: float = 50.0,
    noise: float = 0.05,
    tagged_fraction: float = 0.8,
) -> Path:
    """Write a learnable synthetic codes dataset (``synthetic_clip``) with text and tags that match it.

    Clip i has mood ``i mod 4`` and a random tempo; its text is ``"a {tempo} {mood} loop"`` and its
    tags ``[mood, tempo]`` (for ``tagged_fraction`` of clips). Lengths are uniform in ``[min_T, T]``.
    """
    if codebook_size > 32768:
        raise UserError(f"codebook_size {codebook_size} does not fit the int16 files; use <= 32768")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_clips):
        mood, tempo = i % len(SYNTH_MOODS), int(rng.integers(0, 2))
        n_frames = int(rng.integers(min_T if min_T is not None else T, T + 1))
        codes = synthetic_clip(mood, tempo, n_frames, K, codebook_size, rng, seed=seed, noise=noise)
        name = f"clip_{i:05d}.npy"
        np.save(out / name, codes.astype(np.int16))
        tags = [SYNTH_MOODS[mood], SYNTH_TEMPOS[tempo]] if rng.random() < tagged_fraction else []
        lines.append(json.dumps({"codes": name, "text": f"a {SYNTH_TEMPOS[tempo]} {SYNTH_MOODS[mood]} loop",
                                 "tags": tags, "duration_s": round(n_frames / frame_rate, 4)}))
    (out / MANIFEST).write_text("\n".join(lines) + "\n")
    return out


def summary_rows(summary: CodesSummary) -> list[tuple[str, str]]:
    """(field, value) rows for printing a summary."""
    size = f"{summary.codebook_size}" + (" (inferred: pass --codebook-size to check)" if summary.codebook_size_inferred else "")
    usage = ", ".join(f"{u:.0%}" for u in summary.codebook_usage)
    return [
        ("clips", f"{summary.clips:,}"),
        ("hours", f"{summary.hours:.3f}" + (f" ({summary.clips_without_duration} clips without duration_s)"
                                             if summary.clips_without_duration else "")),
        ("codebooks (K)", str(summary.n_codebooks)),
        ("codebook size", size),
        ("frames min / mean / max", f"{summary.frames_min:,} / {summary.frames_mean:,.1f} / {summary.frames_max:,}"),
        ("tokens per codebook", f"{summary.frames_total:,}"),
        ("tag coverage", f"{summary.tag_coverage:.1%}"),
        ("top tags", ", ".join(f"{t} ({n})" for t, n in summary.top_tags[:8]) or "-"),
        ("codebook usage", usage or "-"),
        ("bad files", str(len(summary.bad))),
        ("unlisted .npy", str(summary.unlisted_npy)),
    ]


def bad_rows(bad: Sequence[BadFile]) -> list[tuple[str, str]]:
    return [(b.file, b.reason) for b in bad]


def render_summary(summary: CodesSummary, console) -> None:
    """Print a summary as rich tables (the dataset, then each bad file with its reason)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"codes dataset {escape(summary.path)}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, value in summary_rows(summary):
        table.add_row(name, escape(value))
    console.print(table)
    if summary.bad:
        bad = Table(title=f"{len(summary.bad)} bad file(s): not used", style="red")
        bad.add_column("file")
        bad.add_column("reason")
        for file, reason in bad_rows(summary.bad):
            bad.add_row(escape(file), escape(reason))
        console.print(bad)
