"""The codec sampler is driven by the pattern: what it generates is what training lays out.

A stub model emits random codes (and tempting BOS/PAD/EOS logits everywhere) and EOS on the EOS
codebook at a chosen frame per row; the sampled stream must be ``apply(revert(stream))`` with EOS
staggered exactly as ``training_pair`` places it, and the model must have been fed training's inputs.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from scratchlab.config import load_config
from scratchlab.families.codec.conditioning import collate_conditions, condition_ids
from scratchlab.families.codec.patterns import IGNORE_INDEX, DelayPattern, SpecialIds, training_pair
from scratchlab.families.codec.sampler import generate_codes
from scratchlab.families.registry import build_model

CB = 12


class StubCodecModel(nn.Module):
    """Random logits over every class (specials boosted: only the pattern's mask keeps them out), and on
    codebook 0 EOS at frame ``eos_at[row]`` (strongly), never before. Records what it was fed."""

    def __init__(self, pattern: DelayPattern, eos_at: list[int], max_seq_len: int, seed: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(codec=SimpleNamespace(codebook_size=CB), max_seq_len=max_seq_len)
        self.n_codebooks, self.conditioned = pattern.n_codebooks, False
        self.pattern, self.eos_at = pattern, torch.tensor(eos_at)
        self.anchor = nn.Parameter(torch.zeros(1))  # the sampler reads the device from the parameters
        self.generator = torch.Generator().manual_seed(seed)
        self.fed: list[torch.Tensor] = []

    def new_cache(self, batch: int, max_len: int) -> SimpleNamespace:
        return SimpleNamespace(length=0)

    def forward(self, codes, cond_ids=None, cond_mask=None, cache=None):
        step = cache.length
        cache.length += codes.shape[1]
        self.fed.append(codes[:, -1].clone())
        special = SpecialIds.for_codebook(CB)
        B, K = codes.shape[0], self.n_codebooks
        logits = 3 * torch.randn(B, 1, K, special.n_classes, generator=self.generator)
        logits[..., CB:] += 20.0  # BOS, PAD, EOS everywhere look likely
        frame = step - self.pattern.delays[0]
        logits[:, 0, 0, special.eos] = torch.where(frame == self.eos_at, 100.0, -100.0)
        return logits


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 6), max_frames=st.integers(1, 12), batch=st.integers(1, 4))
def test_sampled_stream_is_the_training_stream_of_its_codes(data, k, max_frames, batch):
    first = data.draw(st.integers(0, 3), label="delay of codebook 0")
    delays = [first] + data.draw(st.lists(st.integers(first, first + 8), min_size=k - 1, max_size=k - 1))
    pattern, special = DelayPattern(delays), SpecialIds.for_codebook(CB)
    eos_at = data.draw(st.lists(st.integers(0, max_frames + 3), min_size=batch, max_size=batch), label="EOS frame")
    temperatures = data.draw(st.lists(st.sampled_from([0.0, 0.7, 1.0]), min_size=batch, max_size=batch))
    model = StubCodecModel(pattern, eos_at, pattern.stream_length(max_frames), seed=len(delays) + max_frames)
    codes, stream = generate_codes(model, pattern, max_frames, n=batch, temperature=temperatures,
                                   generator=torch.Generator().manual_seed(0))
    fed = torch.stack(model.fed, dim=1)  # [batch, steps the model ran, K]
    assert len(codes) == batch and stream.shape[0] == batch
    for i in range(batch):
        frames = min(eos_at[i], max_frames)  # EOS where the model put it, or forced when out of room
        assert codes[i].shape == (frames, k)
        assert ((0 <= codes[i]) & (codes[i] < CB)).all()  # only real codes come back
        length = pattern.stream_length(frames)
        own = stream[i, :length]
        assert torch.equal(own, pattern.apply(pattern.revert(own, n_frames=frames), special, eos=True))
        assert torch.equal(own, pattern.apply(codes[i], special, eos=True))
        assert (stream[i, length:] == special.pad).all()
        # Training's view of the same clip: inputs are what the model was fed, labels are the stream with
        # every codebook's EOS at frame `frames` (staggered by the delays) and no BOS/PAD target.
        input_ids, labels = training_pair(own, special, pattern, frames, eos=True)
        assert torch.equal(fed[i, :length], input_ids)
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], own[kept])
        eos_at_rows = sorted(zip(*np.nonzero(labels.numpy() == special.eos)))
        assert eos_at_rows == sorted((frames + d, j) for j, d in enumerate(delays))
        assert not ((own == special.eos) & ~kept).any()


def tiny_codec():
    overrides = [
        "model.family=codec_lm", "model.codec.n_codebooks=4", "model.codec.codebook_size=16",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.max_seq_len=64",
        "model.codec.text_d_model=32", "model.codec.text_heads=2", "model.codec.max_text_bytes=16",
        "model.codec.conditioning=text", "train.seq_len=32",
    ]
    torch.manual_seed(0)
    model = build_model(load_config(None, overrides).model)
    # A few noisy steps so the logits are not near-uniform (greedy ties would make the comparison weak).
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, mask = collate_conditions([condition_ids(t, (), 16) for t in ("rock", "calm piano")])
    for _ in range(3):
        model(torch.randint(0, 19, (2, 16, 4)), ids, mask).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("pattern_name", ["musicgen", "dia"])
def test_one_batched_generation_equals_each_row_alone(pattern_name):
    """Conditions x temperatures x CFG scales in one call (twins only for guided rows): greedy rows
    equal the same row generated alone."""
    model = tiny_codec()
    pattern = DelayPattern.preset(pattern_name, 4)
    texts = ["rock", "calm piano", "rock"]
    scales = [1.0, 3.0, 2.0]
    ids, mask = collate_conditions([condition_ids(t, (), 16) for t in texts])
    codes, stream = generate_codes(model, pattern, 30, cond_ids=ids, cond_mask=mask, temperature=0.0,
                                   cfg_scale=scales)
    for i, (text, scale) in enumerate(zip(texts, scales)):
        one_ids, one_mask = collate_conditions([condition_ids(text, (), 16)])
        alone, alone_stream = generate_codes(model, pattern, 30, cond_ids=one_ids, cond_mask=one_mask,
                                             temperature=0.0, cfg_scale=scale)
        assert torch.equal(codes[i], alone[0]), (i, text, scale)
        assert torch.equal(stream[i, : alone_stream.shape[1]], alone_stream[0])
    assert not torch.equal(codes[0], codes[2])  # guidance changed row 2 (same condition as row 0)


def test_per_row_temperature_zero_rows_are_greedy_among_sampled_rows():
    model = tiny_codec()
    pattern = DelayPattern.preset("musicgen", 4)
    greedy, _ = generate_codes(model, pattern, 20, temperature=0.0)
    mixed, _ = generate_codes(model, pattern, 20, n=3, temperature=[1.5, 0.0, 1.5],
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed[1], greedy[0])
    assert not torch.equal(mixed[0], mixed[2])  # the sampled rows draw their own tokens
    with pytest.raises(ValueError, match="2 temperature"):
        generate_codes(model, pattern, 5, n=3, temperature=[1.0, 0.0])
