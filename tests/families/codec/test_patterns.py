"""Delay patterns: the stream layout, its inverse, special ids, EOS placement, and the sampler's helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlab.families.codec.patterns import (
    IGNORE_INDEX,
    DelayPattern,
    SpecialIds,
    codes_window,
    codes_windows,
    training_pair,
)

SPECIAL = SpecialIds.for_codebook(100)
B, P, E = 100, 101, 102  # BOS, PAD, EOS for a codebook of 100 entries
X = IGNORE_INDEX

# dia, K=9, T=3: codes[t, k] = 10 * k + t. Written out by hand from the layout rule
# (delays 0, 8, 9, ..., 15; EOS at frame T=3, i.e. step 3 + d_k; stream length 3 + 1 + 15 = 19).
DIA_K9_T3 = np.array([
    # cb0 cb1 cb2 cb3 cb4 cb5 cb6 cb7 cb8
    [0,  B,  B,  B,  B,  B,  B,  B,  B],   # t=0
    [1,  B,  B,  B,  B,  B,  B,  B,  B],   # t=1
    [2,  B,  B,  B,  B,  B,  B,  B,  B],   # t=2
    [E,  B,  B,  B,  B,  B,  B,  B,  B],   # t=3   EOS on codebook 0 at frame T
    [P,  B,  B,  B,  B,  B,  B,  B,  B],   # t=4
    [P,  B,  B,  B,  B,  B,  B,  B,  B],   # t=5
    [P,  B,  B,  B,  B,  B,  B,  B,  B],   # t=6
    [P,  B,  B,  B,  B,  B,  B,  B,  B],   # t=7
    [P, 10,  B,  B,  B,  B,  B,  B,  B],   # t=8   codebook 1 starts (delay 8)
    [P, 11, 20,  B,  B,  B,  B,  B,  B],   # t=9
    [P, 12, 21, 30,  B,  B,  B,  B,  B],   # t=10
    [P,  E, 22, 31, 40,  B,  B,  B,  B],   # t=11
    [P,  P,  E, 32, 41, 50,  B,  B,  B],   # t=12
    [P,  P,  P,  E, 42, 51, 60,  B,  B],   # t=13
    [P,  P,  P,  P,  E, 52, 61, 70,  B],   # t=14
    [P,  P,  P,  P,  P,  E, 62, 71, 80],   # t=15
    [P,  P,  P,  P,  P,  P,  E, 72, 81],   # t=16
    [P,  P,  P,  P,  P,  P,  P,  E, 82],   # t=17
    [P,  P,  P,  P,  P,  P,  P,  P,  E],   # t=18  the last codebook's EOS ends the stream
])


def dia_codes() -> np.ndarray:
    return 10 * np.arange(9)[None, :] + np.arange(3)[:, None]


def test_presets():
    assert DelayPattern.preset("parallel", 4).delays == (0, 0, 0, 0)
    assert DelayPattern.preset("musicgen", 4).delays == (0, 1, 2, 3)
    assert DelayPattern.preset("dia", 9).delays == (0, 8, 9, 10, 11, 12, 13, 14, 15)
    assert DelayPattern.preset("dia", 1).delays == (0,)
    assert DelayPattern([3, 0, 1]).max_delay == 3 and DelayPattern([3, 0, 1]).eos_codebook == 1
    with pytest.raises(ValueError, match="unknown delay pattern"):
        DelayPattern.preset("musicgenn", 4)
    with pytest.raises(ValueError, match=">= 0"):
        DelayPattern([0, -1])


def test_special_ids_sit_above_the_codebook():
    s = SpecialIds.for_codebook(1024)
    assert (s.bos, s.pad, s.eos, s.n_classes) == (1024, 1025, 1026, 1027)


def test_dia_k9_stream_by_hand():
    pattern = DelayPattern.preset("dia", 9)
    stream = pattern.apply(dia_codes(), SPECIAL)
    np.testing.assert_array_equal(stream, DIA_K9_T3)
    np.testing.assert_array_equal(pattern.revert(stream), dia_codes())
    # Batched and torch in, torch out: the same rows.
    batched = pattern.apply(torch.from_numpy(np.stack([dia_codes(), dia_codes() + 3])), SPECIAL)
    assert isinstance(batched, torch.Tensor) and batched.shape == (2, 19, 9)
    np.testing.assert_array_equal(batched[0].numpy(), DIA_K9_T3)


def test_dia_k9_training_pair_by_hand():
    pattern = DelayPattern.preset("dia", 9)
    input_ids, labels = training_pair(DIA_K9_T3, SPECIAL, pattern, n_frames=3, eos=True)
    expected_labels = np.where(np.isin(DIA_K9_T3, [B, P]), X, DIA_K9_T3)
    np.testing.assert_array_equal(labels, expected_labels)
    assert (labels == E).sum() == 9  # every codebook's EOS is a target, BOS/PAD never are
    np.testing.assert_array_equal(input_ids[0], [B] * 9)
    np.testing.assert_array_equal(input_ids[1:], DIA_K9_T3[:-1])


def test_crop_without_eos_has_no_eos_and_pads_the_tail():
    pattern = DelayPattern.preset("musicgen", 3)
    codes = np.array([[1, 2, 3], [4, 5, 6]])
    stream = pattern.apply(codes, SPECIAL, eos=False)
    np.testing.assert_array_equal(stream, [[1, B, B], [4, 2, B], [P, 5, 3], [P, P, 6]])
    np.testing.assert_array_equal(pattern.revert(stream, eos=False), codes)
    _, labels = training_pair(stream, SPECIAL, pattern, n_frames=2, eos=False)
    np.testing.assert_array_equal(labels, [[1, X, X], [4, 2, X], [X, 5, 3], [X, X, 6]])


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    k=st.integers(1, 9),
    t=st.integers(0, 20),
    batch=st.sampled_from([None, 1, 3]),
    eos=st.booleans(),
)
def test_apply_revert_are_exact_inverses(data, k, t, batch, eos):
    delays = data.draw(st.lists(st.integers(0, 16), min_size=k, max_size=k))
    pattern = DelayPattern(delays)
    shape = (t, k) if batch is None else (batch, t, k)
    codes = np.random.default_rng(t * 31 + k).integers(0, 100, shape)
    stream = pattern.apply(codes, SPECIAL, eos=eos)
    assert stream.shape[-2] == t + max(delays) + (1 if eos else 0)
    np.testing.assert_array_equal(pattern.revert(stream, eos=eos), codes)
    nb = 1 if batch is None else batch
    flat = stream.reshape(nb, stream.shape[-2], k)
    for j, d in enumerate(delays):
        col = flat[:, :, j]
        assert (col[:, :d] == B).all()  # BOS exactly before the codebook's delay
        assert (col == B).sum() == d * len(flat)
        np.testing.assert_array_equal(col[:, d : d + t], codes.reshape(nb, t, k)[:, :, j])
        if eos:
            assert (col[:, d + t] == E).all() and (col == E).sum() == len(flat)
            assert (col[:, d + t + 1 :] == P).all()
        else:
            assert (col == E).sum() == 0 and (col[:, d + t :] == P).all()


def _window_by_definition(codes, start, window, pattern):
    """One training window from the definitions: the delayed stream of the crop's context (``apply``, EOS
    when the context reaches the clip's end), cut or PAD-ed to the fixed length, then ``training_pair``."""
    seq_len = window + 1 + pattern.max_delay
    n_frames = min(window, len(codes) - start)
    context = codes[start : start + window + pattern.max_delay]
    stream = pattern.apply(context, SPECIAL, eos=start + len(context) == len(codes))[:seq_len]
    stream = np.concatenate([stream, np.full((seq_len - len(stream), pattern.n_codebooks), P)])
    return training_pair(stream, SPECIAL, pattern, n_frames, eos=start + n_frames == len(codes))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), k=st.integers(1, 9), window=st.integers(1, 24), batch=st.integers(1, 5))
def test_batched_windows_equal_the_stream_definition(data, k, window, batch):
    """`codes_windows` builds a batch by index arithmetic; each row must equal apply + training_pair of its crop
    (mid-clip crops, crops reaching the end, clips shorter than the window, empty clips)."""
    pattern = DelayPattern(data.draw(st.lists(st.integers(0, 12), min_size=k, max_size=k)))
    rng = np.random.default_rng(window * 7 + k)
    clips, starts = [], []
    for _ in range(batch):
        length = data.draw(st.integers(0, 3 * window + 20))
        clips.append(rng.integers(0, 100, (length, k)).astype(np.int16))
        starts.append(data.draw(st.integers(0, max(length - window, 0))))
    input_ids, labels = codes_windows(clips, starts, window, pattern, SPECIAL)
    assert input_ids.shape == labels.shape == (batch, window + 1 + pattern.max_delay, k)
    assert input_ids.dtype == labels.dtype == torch.long and input_ids.is_contiguous()
    for b in range(batch):
        want_x, want_y = _window_by_definition(clips[b], starts[b], window, pattern)
        np.testing.assert_array_equal(input_ids[b].numpy(), want_x)
        np.testing.assert_array_equal(labels[b].numpy(), want_y)
        one_x, one_y = codes_window(clips[b], starts[b], window, pattern, SPECIAL)
        assert torch.equal(one_x, input_ids[b]) and torch.equal(one_y, labels[b])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 6), t=st.integers(0, 12))
def test_forced_tokens_rebuild_the_training_stream(data, k, t):
    """A sampler that follows forced_tokens/allowed_classes and otherwise picks the true token
    produces exactly the training stream: inference and training agree on BOS, EOS and PAD."""
    delays = data.draw(st.lists(st.integers(0, 8), min_size=k, max_size=k))
    pattern = DelayPattern(delays)
    codes = np.random.default_rng(t + 7 * k).integers(0, 100, (t, k))
    truth = pattern.apply(codes, SPECIAL)
    rows, eos_frame, step = [], None, 0
    while True:
        # Phase 1: sample where nothing is forced (the oracle takes the truth, or any code where
        # the truth is an EOS that only phase 2 can know about).
        forced = pattern.forced_tokens(step, SPECIAL, eos_frame)
        allowed = pattern.allowed_classes(step, SPECIAL, eos_frame)
        row = []
        for j, f in enumerate(forced):
            token = f if f is not None else int(truth[step, j])
            if f is None and token == E and j != pattern.eos_codebook:
                token = 0
            assert allowed[j, token], (step, j, token)
            assert allowed[j].sum() == 1 if f is not None else allowed[j].sum() in (100, 101)
            row.append(token)
        # Phase 2: EOS sampled on the EOS codebook fixes the end; re-apply what is now forced.
        if eos_frame is None and row[pattern.eos_codebook] == E:
            eos_frame = pattern.eos_frame_at(step)
            row = [f if f is not None else token
                   for f, token in zip(pattern.forced_tokens(step, SPECIAL, eos_frame), row)]
        rows.append(row)
        if pattern.is_complete(step, eos_frame):
            break
        step += 1
    np.testing.assert_array_equal(np.array(rows), truth)
    assert eos_frame == t
    np.testing.assert_array_equal(pattern.revert(np.array(rows), n_frames=eos_frame), codes)


@pytest.mark.parametrize("name", ["parallel", "musicgen", "dia"])
def test_no_bos_or_pad_target_and_eos_where_the_pattern_puts_it(name):
    pattern = DelayPattern.preset(name, 5)
    codes = np.random.default_rng(0).integers(0, 100, (2, 7, 5))
    stream = pattern.apply(codes, SPECIAL)
    _, labels = training_pair(stream, SPECIAL, pattern, n_frames=7, eos=True)
    assert not np.isin(labels, [B, P]).any()
    eos_at = sorted(zip(*np.nonzero(labels[0] == E)))
    assert eos_at == [(7 + d, j) for j, d in enumerate(pattern.delays)]
    assert (labels != X).sum() == 2 * 5 * (7 + 1)  # every code and each codebook's EOS, nothing else


def test_wrong_codebook_count_is_refused():
    with pytest.raises(ValueError, match="expected"):
        DelayPattern.preset("musicgen", 4).apply(np.zeros((3, 5), dtype=np.int64), SPECIAL)
    with pytest.raises(ValueError, match="frames"):
        DelayPattern.preset("musicgen", 4).revert(np.zeros((5, 4), dtype=np.int64), n_frames=3)
