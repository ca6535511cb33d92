"""The codec_lm model, its loss and its delay-aware sampler (no data needed: codes are made here)."""

from __future__ import annotations

import pytest
import torch

from scratchlab.config import load_config
from scratchlab.families.codec.conditioning import collate_conditions, condition_ids
from scratchlab.loss import IGNORE_INDEX, codebook_loss, token_loss
from scratchlab.families.registry import build_model
from scratchlab.families.codec.patterns import DelayPattern, SpecialIds
from scratchlab.families.codec.sampler import codebook_coverage, generate_codes

CB = 16


def tiny_codec(conditioning: str = "text", **extra):
    overrides = [
        "model.family=codec_lm", "model.codec.n_codebooks=4", f"model.codec.codebook_size={CB}",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.max_seq_len=64",
        "model.codec.text_d_model=32", "model.codec.text_heads=2", "model.codec.max_text_bytes=16",
        f"model.codec.conditioning={conditioning}", "train.seq_len=32",
        # random (untrained) blocks, so that the condition moves the samples (the default preset's QK-norm and
        # zero-init out-projections leave the condition's effect on an untrained model too small to change them)
        "model.zero_init_out=false", "model.qk_norm=false",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    torch.manual_seed(0)
    return build_model(load_config(None, overrides).model)


def conditions(*texts):
    return collate_conditions([condition_ids(t, (), 16) for t in texts])


@pytest.mark.parametrize("conditioning", ["text", "none"])
def test_cached_forward_equals_full_forward(conditioning):
    model = tiny_codec(conditioning).eval()
    codes = torch.randint(0, CB + 3, (2, 12, 4))
    ids, mask = conditions("rock, loud", "")
    with torch.no_grad():
        full = model(codes, ids, mask)
        cache = model.new_cache(2, 12)
        parts = [model(codes[:, :5], ids, mask, cache=cache)]
        parts += [model(codes[:, t : t + 1], ids, mask, cache=cache) for t in range(5, 12)]
    assert full.shape == (2, 12, 4, CB + 3)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_decoder_is_causal_over_time_and_sees_the_condition():
    model = tiny_codec().eval()
    codes = torch.randint(0, CB, (1, 10, 4))
    ids, mask = conditions("jazz")
    other = codes.clone()
    other[:, 6] = (other[:, 6] + 1) % CB
    with torch.no_grad():
        a, b = model(codes, ids, mask), model(other, ids, mask)
        c = model(codes, *conditions("metal"))
    torch.testing.assert_close(a[:, :6], b[:, :6])  # the past never sees frame 6
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4
    assert (a - c).abs().max() > 1e-4  # the condition reaches the decoder


def test_codebook_loss_is_the_weighted_mean_of_per_codebook_token_losses():
    logits = torch.randn(2, 5, 3, 7)
    labels = torch.randint(0, 7, (2, 5, 3))
    labels[0, :2, 1] = IGNORE_INDEX
    labels[..., 2] = IGNORE_INDEX  # a codebook with no target adds nothing (and no NaN)
    loss, per_cb = codebook_loss(logits, labels, [4.0, 1.0, 1.0])
    expected = [token_loss(logits[..., k, :], labels[..., k]) for k in range(2)]
    torch.testing.assert_close(per_cb[0], expected[0])
    torch.testing.assert_close(per_cb[1], expected[1])
    assert float(per_cb[2]) == 0.0
    torch.testing.assert_close(loss, (4 * expected[0] + expected[1]) / 5)


@pytest.mark.parametrize("pattern", ["parallel", "musicgen", "dia"])
def test_sampled_stream_follows_the_pattern(pattern):
    model = tiny_codec(**{"model.max_seq_len": 64})
    delays = list(DelayPattern.preset(pattern, 4).delays)
    special = SpecialIds.for_codebook(CB)
    codes, stream = generate_codes(model, delays, 20, n=3, temperature=1.0, generator=torch.Generator().manual_seed(1))
    for clip, s in zip(codes, stream):
        T = clip.shape[0]
        assert clip.max() < CB and clip.min() >= 0  # only real codes come back
        # The stream is exactly the pattern applied to the reverted codes (EOS staggered, PAD after).
        expected = DelayPattern(delays).apply(clip, special, eos=True)
        assert torch.equal(s[: expected.shape[0]], expected)
        assert (s[expected.shape[0]:] == special.pad).all()
        assert T <= 20


def test_cfg_at_scale_one_equals_the_conditional_path_and_cache_equals_no_cache():
    model = tiny_codec()
    ids, mask = conditions("piano")
    delays = [0, 1, 2, 3]

    def run(**kw):
        return generate_codes(model, delays, 12, cond_ids=ids, cond_mask=mask, temperature=1.0,
                              generator=torch.Generator().manual_seed(3), **kw)[1]

    plain = run()
    assert torch.equal(run(cfg_scale=1.0, guidance=True), plain)  # uncond + 1 * (cond - uncond) == cond
    assert torch.equal(run(cfg_scale=3.0, use_cache=False), run(cfg_scale=3.0))
    assert not torch.equal(run(cfg_scale=3.0), plain)  # guidance changes what is sampled


def test_codebook_coverage():
    clips = [torch.tensor([[0, 1], [2, 1]]), torch.tensor([[0, 3], [0, 1]])]
    assert codebook_coverage(clips, 4) == [0.5, 0.5]
