"""The ONE windowing function: token stream -> (input_ids, labels) batches.

Field note: a boolean "sliding window" flag was inverted and every sample was the
first 10 s of its clip. Here the mode is named for what it does:

- ``random``: window starts drawn uniformly from the whole stream (training).
  The draw uses a caller-owned ``torch.Generator``, whose state is the data position
  saved in checkpoints.
- ``fixed``: ``count`` windows spread evenly over the stream; batch ``i`` is the same
  on every call (evaluation).

Labels are made here and only here, from the same slice as the inputs, shifted by
one: ``labels[:, :-1] == input_ids[:, 1:]``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from scratchlab.errors import UserError

WindowMode = Literal["random", "fixed"]


def window_starts(
    n_tokens: int,
    seq_len: int,
    batch_size: int,
    mode: WindowMode,
    *,
    generator: torch.Generator | None = None,
    batch_index: int = 0,
    count: int | None = None,
) -> np.ndarray:
    """Start offsets of one batch of windows of ``seq_len + 1`` tokens."""
    last_start = n_tokens - (seq_len + 1)
    if last_start < 0:
        raise UserError(
            f"the token stream has {n_tokens} tokens, fewer than train.seq_len+1 ({seq_len + 1}); "
            "lower train.seq_len or add data"
        )
    if mode == "random":
        if generator is None:
            raise ValueError("random windows need a torch.Generator (its state is the data position)")
        return torch.randint(0, last_start + 1, (batch_size,), generator=generator).numpy()
    if mode == "fixed":
        total = count if count is not None else batch_size
        grid = np.linspace(0, last_start, num=total).round().astype(np.int64)
        return grid[(batch_index * batch_size + np.arange(batch_size)) % total]
    raise ValueError(f"unknown window mode {mode!r}; use 'random' or 'fixed'")


def make_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
    """Slice windows at ``starts``; inputs and labels come from the same slice, offset by one."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}


def get_batch(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    mode: WindowMode,
    *,
    generator: torch.Generator | None = None,
    batch_index: int = 0,
    count: int | None = None,
) -> dict[str, torch.Tensor]:
    """One batch of windows from a token stream; see the module docstring for the modes."""
    starts = window_starts(
        len(tokens), seq_len, batch_size, mode, generator=generator, batch_index=batch_index, count=count
    )
    return make_windows(tokens, starts, seq_len)


class WindowDataset(torch.utils.data.Dataset):
    """A token stream's windows as a map-style Dataset (one sample per item, for the doctor and DataLoaders).

    ``random`` mode draws a fresh start on every access (a random crop); ``fixed`` maps index i to
    the i-th non-overlapping window. Items carry ``window_start`` and ``clip_len`` so that checks
    can tell a random crop from a constant one.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, mode: WindowMode, seed: int = 0) -> None:
        self.tokens, self.seq_len, self.mode = tokens, seq_len, mode
        self.generator = torch.Generator().manual_seed(seed)
        window_starts(len(tokens), seq_len, 1, "fixed")  # fails clearly if the stream is too short

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.mode == "random":
            starts = window_starts(len(self.tokens), self.seq_len, 1, "random", generator=self.generator)
        else:
            starts = np.array([index * self.seq_len])
        window = make_windows(self.tokens, starts, self.seq_len)
        return {"input_ids": window["input_ids"][0], "labels": window["labels"][0],
                "window_start": int(starts[0]), "clip_len": len(self.tokens)}


def clip_window_starts(
    clip_lens: np.ndarray | list[int],
    window: int,
    batch_size: int,
    mode: WindowMode,
    *,
    generator: torch.Generator | None = None,
    batch_index: int = 0,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(clip index, start) of one batch of windows of ``window`` frames over several clips.

    A window never crosses a clip boundary. Every valid (clip, start) pair is one position of a
    virtual stream, drawn by `window_starts` with the same two modes: ``random`` uniform over all
    positions (so a long clip is drawn in proportion to its windows), ``fixed`` evenly spread.
    Clips shorter than ``window`` hold no position.
    """
    room = np.maximum(np.asarray(clip_lens, dtype=np.int64) - window + 1, 0)  # valid starts per clip
    total = int(room.sum())
    if total == 0:
        raise UserError(
            f"no clip holds a window of {window} frames (longest clip: {int(max(clip_lens, default=0))}); "
            "lower train.seq_len or add longer clips"
        )
    # A stream of total + window - 1 items with windows of window-1 (+1) items has exactly `total` starts.
    flat = window_starts(total + window - 1, window - 1, batch_size, mode,
                         generator=generator, batch_index=batch_index, count=count)
    ends = np.cumsum(room)
    clip = np.searchsorted(ends, flat, side="right")
    start = flat - (ends[clip] - room[clip])
    return clip.astype(np.int64), start.astype(np.int64)


# -- clips (codec codes, cascade frames): one crop per clip; the codec family then applies its delay pattern


def clip_window_start(
    length: int, window: int, mode: WindowMode, *, generator: torch.Generator | None = None, index: int = 0
) -> int:
    """First frame of a ``window``-frame crop of a clip of ``length`` frames.

    ``random`` (training): uniform over every start, drawn from ``generator``. ``fixed`` (eval):
    sample ``index`` takes the clip's start, middle or end in turn (index mod 3), so evaluation
    covers openings, middles and EOS endings and is the same on every call. A clip no longer than
    the window starts at 0 (it is padded, not dropped).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    last_start = max(length - window, 0)
    if mode == "random":
        if generator is None:
            raise ValueError("random windows need a torch.Generator (its state is the data position)")
        return int(torch.randint(0, last_start + 1, (1,), generator=generator))
    if mode == "fixed":
        return last_start * (index % 3) // 2
    raise ValueError(f"unknown window mode {mode!r}; use 'random' or 'fixed'")
