"""Codebook delay patterns and the special ids of codec-token streams (pure data, no model code).

A clip of codec codes is ``[T, K]`` (frames x codebooks). A *delay pattern* shifts codebook
``k`` right by ``d_k`` steps so that one transformer step predicts all K codebooks while
codebook k still sees codebooks with smaller delays of the same frame (MusicGen, Dia).

The delayed stream ``S`` of a clip (``eos=True``) has ``T + 1 + max_delay`` steps::

    S[t, k] = codes[t - d_k, k]   if 0 <= t - d_k < T      (a real code)
            = BOS                 if t - d_k < 0           (before the codebook starts)
            = EOS                 if t - d_k == T          (frame T: EOS, staggered per codebook)
            = PAD                 if t - d_k > T           (after the codebook's EOS)

With ``eos=False`` (a crop that stops before the clip ends) there is no EOS frame: the stream
has ``T + max_delay`` steps and everything after a codebook's last frame is PAD.

Training and sampling agree because both go through this module: the data layer makes the
training windows with ``codes_windows`` (a batched form of ``training_pair(apply(crop))``, held equal
to it by a property test), and the sampler (families/codec/sampler.py)
asks ``forced_ids`` / ``allowed_mask`` (batched over the samples) what the pattern dictates at
each step and ``revert`` for the codes. ``forced_tokens`` / ``allowed_classes`` are the same rule
for one stream.

Special ids live above the codebook entries (``SpecialIds``): BOS = codebook_size,
PAD = codebook_size + 1, EOS = codebook_size + 2; heads predict ``codebook_size + 3`` classes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from scratchlab.config import CodecConfig
from scratchlab.errors import UserError
from scratchlab.loss import IGNORE_INDEX  # labels the loss skips (one home: loss.py)


PRESETS = ("parallel", "musicgen", "dia")
FREE = -1  # forced_ids: the model samples this position
NOT_ENDED = -1  # eos_frame of a stream whose EOS has not been sampled yet

Array = TypeVar("Array", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class SpecialIds:
    """BOS / PAD / EOS ids just above a codebook of ``codebook_size`` entries."""

    codebook_size: int

    @classmethod
    def for_codebook(cls, codebook_size: int) -> SpecialIds:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        return cls(int(codebook_size))

    @property
    def bos(self) -> int:
        return self.codebook_size

    @property
    def pad(self) -> int:
        return self.codebook_size + 1

    @property
    def eos(self) -> int:
        return self.codebook_size + 2

    @property
    def n_classes(self) -> int:
        """Rows of each codebook's embedding table and classes of each output head."""
        return self.codebook_size + 3


class DelayPattern:
    """Per-codebook delays ``d_k >= 0``; see the module docstring for the stream layout."""

    def __init__(self, delays: list[int] | tuple[int, ...]) -> None:
        delays = tuple(int(d) for d in delays)
        if not delays:
            raise ValueError("a delay pattern needs at least one codebook")
        if min(delays) < 0:
            raise ValueError(f"delays must be >= 0, got {list(delays)}")
        self.delays = delays
        self._delay_tensors: dict[torch.device, torch.Tensor] = {}  # per device, made once (sampling asks every step)

    @classmethod
    def preset(cls, name: str, n_codebooks: int) -> DelayPattern:
        """``parallel`` (all 0), ``musicgen`` (0, 1, ..., K-1) or ``dia`` (0, 8, 9, ..., 8+K-2)."""
        if n_codebooks < 1:
            raise ValueError(f"n_codebooks must be >= 1, got {n_codebooks}")
        if name == "parallel":
            return cls([0] * n_codebooks)
        if name == "musicgen":
            return cls(list(range(n_codebooks)))
        if name == "dia":
            return cls([0] + [8 + i for i in range(n_codebooks - 1)])
        raise ValueError(f"unknown delay pattern {name!r}; known: {', '.join(PRESETS)} (or a list of delays)")

    def __repr__(self) -> str:
        return f"DelayPattern({list(self.delays)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DelayPattern) and other.delays == self.delays

    def __hash__(self) -> int:
        return hash(self.delays)

    @property
    def n_codebooks(self) -> int:
        return len(self.delays)

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def eos_codebook(self) -> int:
        """The codebook whose EOS comes first (the smallest delay; codebook 0 in every preset)."""
        return int(np.argmin(self.delays))

    def stream_length(self, n_frames: int, eos: bool = True) -> int:
        """Steps of the delayed stream of ``n_frames`` frames."""
        return n_frames + self.max_delay + (1 if eos else 0)

    def frames_in_stream(self, length: int, eos: bool = True) -> int:
        """Frames of a stream of ``length`` steps (the inverse of ``stream_length``)."""
        n = length - self.max_delay - (1 if eos else 0)
        if n < 0:
            raise ValueError(f"a stream of {length} steps is shorter than this pattern's tail ({self.max_delay}, eos={eos})")
        return n

    def frame_index(self, length: int) -> np.ndarray:
        """``[length, K]`` int64: the frame ``t - d_k`` each stream position holds (negative before the start)."""
        return np.arange(length, dtype=np.int64)[:, None] - np.asarray(self.delays, dtype=np.int64)[None, :]

    # -- the stream

    def apply(self, codes: Array, special: SpecialIds, eos: bool = True) -> Array:
        """Delayed stream of ``codes`` ``[T, K]`` or ``[B, T, K]`` (int64; numpy in, numpy out)."""
        is_numpy = isinstance(codes, np.ndarray)
        x = torch.from_numpy(np.asarray(codes, dtype=np.int64)) if is_numpy else codes.long()
        self._check_k(x)
        n_frames = x.shape[-2]
        length = self.stream_length(n_frames, eos)
        frame = torch.from_numpy(self.frame_index(length)).to(x.device)  # [L, K]
        out = torch.full((*x.shape[:-2], length, self.n_codebooks), special.pad, dtype=torch.long, device=x.device)
        real = (frame >= 0) & (frame < n_frames)
        if n_frames > 0:
            cols = torch.arange(self.n_codebooks, device=x.device).expand(length, -1)
            gathered = x[..., frame.clamp(0, n_frames - 1), cols]  # [..., L, K]
            out = torch.where(real, gathered, out)
        out[..., frame < 0] = special.bos
        if eos:
            out[..., frame == n_frames] = special.eos
        return out.numpy() if is_numpy else out

    def revert(self, stream: Array, n_frames: int | None = None, eos: bool = True) -> Array:
        """Codes ``[..., T, K]`` back from a delayed stream; ``T`` is ``n_frames`` or read from its length.

        ``revert(apply(codes, s, eos), eos=eos)`` equals ``codes`` exactly. For a sampled stream,
        pass ``n_frames`` = the EOS frame (``forced_ids``' ``eos_frame``).
        """
        is_numpy = isinstance(stream, np.ndarray)
        x = torch.from_numpy(np.asarray(stream, dtype=np.int64)) if is_numpy else stream.long()
        self._check_k(x)
        length = x.shape[-2]
        if n_frames is None:
            n_frames = self.frames_in_stream(length, eos)
        if n_frames + self.max_delay > length:
            raise ValueError(f"a stream of {length} steps holds at most {length - self.max_delay} frames, not {n_frames}")
        rows = torch.arange(n_frames, device=x.device)[:, None] + torch.tensor(self.delays, device=x.device)[None, :]
        cols = torch.arange(self.n_codebooks, device=x.device).expand(n_frames, -1)
        out = x[..., rows, cols]
        return out.numpy() if is_numpy else out

    # -- what the sampler needs (batched tensors: one row per sample; the scalar forms below wrap them)

    def forced_ids(self, step: int, special: SpecialIds, eos_frame: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` long: the token the pattern dictates at stream ``step``, or ``FREE`` (-1) where the model samples.

        ``eos_frame`` is ``[B]`` long: per row, the frame at which ``eos_codebook`` drew EOS, or
        ``NOT_ENDED`` (-1). BOS while ``step < d_k``; after the end, EOS at ``eos_frame + d_k`` and
        PAD after it (the staggered EOS ``apply`` lays out in training).

        One sampling step is two phases: sample where this is FREE (masked by ``allowed_mask``),
        then set ``eos_frame`` where ``eos_codebook`` drew EOS (``eos_frame_at(step)``) and call
        this again for the same step: codebooks sharing the EOS codebook's delay get EOS in that step.
        """
        eos_frame = eos_frame.long()
        frame = step - self._delays_on(eos_frame.device)  # [K]: the frame each codebook is at
        end = eos_frame[:, None]  # [B, 1]
        ended = end >= 0
        forced = torch.full((len(eos_frame), self.n_codebooks), FREE, dtype=torch.long, device=eos_frame.device)
        forced = torch.where(ended & (frame > end), special.pad, forced)
        forced = torch.where(ended & (frame == end), special.eos, forced)
        return torch.where(frame < 0, special.bos, forced)  # before a codebook starts: BOS, whatever the end

    def allowed_mask(
        self, step: int, special: SpecialIds, eos_frame: torch.Tensor, max_frames: int | None = None
    ) -> torch.Tensor:
        """``[B, K, n_classes]`` bool: which classes each codebook may take at ``step`` (mask the rest to -inf).

        A forced position allows only its token. Elsewhere the codebook entries are allowed, plus
        EOS on ``eos_codebook`` only (the other codebooks' EOS is forced, staggered): the same
        positions where the training labels hold codes or EOS. With ``max_frames``, a stream that
        reached that many frames must end: ``eos_codebook`` may only draw EOS at frame ``max_frames``.
        """
        forced = self.forced_ids(step, special, eos_frame)  # [B, K]
        free = forced == FREE
        allowed = torch.zeros(*forced.shape, special.n_classes, dtype=torch.bool, device=forced.device)
        allowed[..., : special.codebook_size] = free[..., None]
        k = self.eos_codebook
        allowed[:, k, special.eos] = free[:, k]
        if max_frames is not None and step - self.delays[k] >= max_frames:
            allowed[:, k, : special.codebook_size] = False  # out of room: the clip ends here
        one_hot = torch.nn.functional.one_hot(forced.clamp(min=0), special.n_classes).bool()
        return allowed | (one_hot & ~free[..., None])

    def eos_frame_at(self, step: int) -> int:
        """The EOS frame when ``eos_codebook`` samples EOS at stream ``step``."""
        return step - self.delays[self.eos_codebook]

    def complete(self, step: int, eos_frame: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: stream ``step`` was the row's last (every codebook has emitted its EOS)."""
        return (eos_frame >= 0) & (step >= eos_frame + self.max_delay)

    # scalar forms, for one stream (tests and people reading the rule)

    def forced_tokens(self, step: int, special: SpecialIds, eos_frame: int | None = None) -> list[int | None]:
        """Per codebook, the token the pattern dictates at stream ``step``, or ``None`` where the model samples
        (``forced_ids`` for one stream; ``eos_frame`` None = not ended)."""
        row = self.forced_ids(step, special, _one_end(eos_frame))[0].tolist()
        return [None if token == FREE else token for token in row]

    def allowed_classes(self, step: int, special: SpecialIds, eos_frame: int | None = None) -> torch.Tensor:
        """``[K, n_classes]`` bool: ``allowed_mask`` for one stream."""
        return self.allowed_mask(step, special, _one_end(eos_frame))[0]

    def is_complete(self, step: int, eos_frame: int | None) -> bool:
        """True once stream ``step`` was the stream's last (every codebook has emitted its EOS)."""
        return bool(self.complete(step, _one_end(eos_frame))[0])

    def _delays_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._delay_tensors:
            self._delay_tensors[device] = torch.tensor(self.delays, dtype=torch.long, device=device)
        return self._delay_tensors[device]

    def _check_k(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or x.shape[-1] != self.n_codebooks:
            raise ValueError(f"expected [..., T, {self.n_codebooks}] codes for {self!r}, got shape {tuple(x.shape)}")


def _one_end(eos_frame: int | None) -> torch.Tensor:
    return torch.tensor([NOT_ENDED if eos_frame is None else int(eos_frame)], dtype=torch.long)


def pattern_for(codec: CodecConfig, n_codebooks: int) -> DelayPattern:
    """The delay pattern ``model.codec`` asks for, for ``n_codebooks`` codebooks."""
    c = codec
    if c.pattern == "custom":
        if len(c.delays) != n_codebooks:
            raise UserError(f"model.codec.delays has {len(c.delays)} entries for {n_codebooks} codebooks; give one per codebook")
        pattern = DelayPattern(c.delays)
    else:
        pattern = DelayPattern.preset(c.pattern, n_codebooks)
    if pattern.delays[0] != min(pattern.delays):
        raise UserError(f"model.codec.delays {list(pattern.delays)}: codebook 0 must have the smallest delay (it carries EOS)")
    return pattern


def training_pair(
    stream: Array, special: SpecialIds, pattern: DelayPattern, n_frames: int, eos: bool
) -> tuple[Array, Array]:
    """``(input_ids, labels)`` from a delayed stream ``[L, K]`` (or ``[B, L, K]``): THE loss-mask rule.

    ``input_ids = [BOS row] + stream[:-1]`` (so step 0 sees BOS everywhere, as in sampling) and
    ``labels = stream`` where the position holds one of the ``n_frames`` target frames of its
    codebook, or that codebook's EOS when ``eos``; every other position (BOS, PAD, and codes
    beyond the target frames that are there only as context) is ``IGNORE_INDEX``.
    """
    is_numpy = isinstance(stream, np.ndarray)
    x = torch.from_numpy(np.asarray(stream, dtype=np.int64)) if is_numpy else stream.long()
    length = x.shape[-2]
    frame = torch.from_numpy(pattern.frame_index(length))
    target = (frame >= 0) & (frame < n_frames)
    if eos:
        target |= frame == n_frames
    bos_row = torch.full_like(x[..., :1, :], special.bos)
    input_ids = torch.cat([bos_row, x[..., :-1, :]], dim=-2)
    labels = torch.where(target.to(x.device), x, torch.full_like(x, IGNORE_INDEX))
    if is_numpy:
        return input_ids.numpy(), labels.numpy()
    return input_ids, labels


def codes_window(
    codes: np.ndarray, start: int, window: int, pattern: DelayPattern, special: SpecialIds
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, each ``[window + 1 + max_delay, K]`` int64, for the crop at ``start``.

    The targets are the crop's frames (at most ``window``) and, when the crop reaches the clip's
    end, the staggered EOS. Frames after a mid-clip crop stay in the stream as context only
    (labels -100), so the inputs look as they will when sampling a longer piece; a shorter stream
    (short clip, or a crop near the end) is padded with PAD (labels -100) to the fixed length.
    One window of `codes_windows` (the batched form training uses).
    """
    input_ids, labels = codes_windows([codes], [start], window, pattern, special)
    return input_ids[0], labels[0]


def codes_windows(
    clips: Sequence[np.ndarray], starts: Sequence[int], window: int, pattern: DelayPattern, special: SpecialIds
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` ``[B, window + 1 + max_delay, K]`` int64: the crop of ``clips[b]`` at ``starts[b]``.

    The same stream as ``training_pair(apply(context), ...)`` per window (tests hold them equal), built
    for the whole batch at once: each crop is read once into a row of frames (BOS, its frames, EOS
    when the crop reaches the clip's end, then PAD) and a row of targets (IGNORE, the crop's target
    frames and EOS, then IGNORE); every stream position is one fixed index into those rows (codebook
    ``k`` shifted by its delay), so the batch is two ``index_select`` calls. ``clips`` may be
    memory-map views: only the crop is read.
    """
    batch, n_codebooks = len(clips), pattern.n_codebooks
    context = window + pattern.max_delay  # frames a window's stream can show
    width = context + 2  # row slots: BOS / IGNORE, the context frames, EOS
    frames = np.full((batch, width, n_codebooks), special.pad, dtype=np.int64)
    targets = np.full((batch, width, n_codebooks), IGNORE_INDEX, dtype=np.int64)
    frames[:, 0] = special.bos
    for b, (codes, start) in enumerate(zip(clips, starts)):
        length, start = int(codes.shape[0]), int(start)
        n_frames = min(window, length - start)
        if n_frames < 0 or start < 0:
            raise ValueError(f"crop start {start} outside a clip of {length} frames")
        if codes.shape[1] != n_codebooks:
            raise ValueError(f"a clip has {codes.shape[1]} codebooks, the pattern {n_codebooks}")
        crop = codes[start : start + context]
        frames[b, 1 : 1 + len(crop)] = crop
        targets[b, 1 : 1 + n_frames] = frames[b, 1 : 1 + n_frames]
        if start + len(crop) == length:  # the stream shows the clip's end: EOS follows its last frame
            frames[b, 1 + len(crop)] = special.eos
        if start + n_frames == length:  # ...and it is a target when the crop itself reaches the end
            targets[b, 1 + n_frames] = special.eos
    input_index, label_index = _window_index(window, pattern.delays)
    flat_frames = torch.from_numpy(frames).view(batch, -1)
    flat_targets = torch.from_numpy(targets).view(batch, -1)
    seq_len = window + 1 + pattern.max_delay
    return (flat_frames.index_select(1, input_index).view(batch, seq_len, n_codebooks),
            flat_targets.index_select(1, label_index).view(batch, seq_len, n_codebooks))


@functools.lru_cache(maxsize=16)
def _window_index(window: int, delays: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into `codes_windows`' rows (slot ``s``, codebook ``k`` -> ``s * K + k``).

    The stream at step ``t`` shows frame ``t - d_k`` (slot ``t - d_k + 1``; slot 0 before the start);
    inputs are the stream one step late (slot ``t - d_k``), labels the stream itself.
    """
    seq_len = window + 1 + max(delays)
    k = np.arange(len(delays))
    slot = np.arange(seq_len)[:, None] - np.asarray(delays)[None, :]  # [L, K]: t - d_k
    inputs = np.maximum(slot, 0) * len(delays) + k
    labels = np.maximum(slot + 1, 0) * len(delays) + k
    return torch.from_numpy(inputs.reshape(-1)), torch.from_numpy(labels.reshape(-1))
