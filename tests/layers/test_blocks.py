"""Optional blocks of the lm family: QK-norm, attention/output soft-capping, learned-affine GELU, z-loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_tiny

from scratchlab.config import ModelConfig
from scratchlab.loss import IGNORE_INDEX, z_loss
from scratchlab.families.registry import build_model
from scratchlab.runs.metrics import read_metrics
from scratchlab.families.lm.sampler import generate

BASE = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=64)


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**BASE, **kw}))


def is_causal(model, T: int = 16, t: int = 7) -> bool:
    ids = torch.randint(0, 50, (2, T))
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 50
    with torch.no_grad():
        return torch.allclose(model(ids)[:, : t + 1], model(changed)[:, : t + 1], atol=1e-6)


@pytest.mark.parametrize("kw", [{"qk_norm": True}, {"attn_softcap": 2.0}, {"qk_norm": True, "attn_softcap": 5.0}])
def test_attention_variants_are_causal_and_cache_exactly(kw):
    model = tiny(**kw).eval()
    assert is_causal(model)
    ids = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        steps = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(4, 10)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    assert generate(model, [1, 2, 3], 12, temperature=0) == generate(model, [1, 2, 3], 12, temperature=0, use_cache=False)


def test_qk_norm_normalises_each_head():
    model = tiny(qk_norm=True)
    attn = model.blocks[0].attn
    assert attn.q_norm.weight.shape == (attn.head_dim,) and torch.equal(attn.q_norm.weight, torch.ones(attn.head_dim))
    # With QK-norm, scaling the q/k projections no longer changes the output (the norm removes the scale).
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        before = model(ids)
        q_and_k = attn.head_dim * (attn.n_heads + attn.n_kv_heads)
        for block in model.blocks:
            block.attn.qkv.weight[:q_and_k].mul_(7.0)
        after = model(ids)
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)


def test_attention_softcap_bounds_logits_and_is_identity_when_wide():
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        plain, wide, tight = tiny()(ids), tiny(attn_softcap=1e4)(ids), tiny(attn_softcap=0.01)(ids)
    torch.testing.assert_close(wide, plain, atol=1e-5, rtol=1e-5)  # a cap far above the logits changes nothing
    assert (tight - plain).abs().max() > 1e-4
    # A cap of 0.01 makes attention almost uniform over the visible keys: a different model, still causal.
    assert is_causal(tiny(attn_softcap=0.01).eval())


def test_output_softcap():
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        base = tiny(logits_scale=200.0)(ids)
        capped = tiny(logits_scale=200.0, logit_softcap=3.0)(ids)
    assert base.abs().max() > 3.0 and capped.abs().max() <= 3.0
    torch.testing.assert_close(capped, 3.0 * torch.tanh(base / 3.0))


def test_gelu_affine_starts_as_gelu_and_learns_its_affine():
    gelu, affine = tiny(ffn="gelu"), tiny(ffn="gelu_affine")
    missing, unexpected = affine.load_state_dict(gelu.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"blocks.{i}.ffn.{n}" for i in range(2) for n in ("act_scale", "act_shift"))
    assert not unexpected
    ids = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(affine(ids), gelu(ids))
    affine(ids).logsumexp(-1).mean().backward()
    ffn = affine.blocks[0].ffn
    assert ffn.act_scale.grad.abs().sum() > 0 and ffn.act_shift.grad.abs().sum() > 0


@pytest.mark.parametrize("init", ["normal", "xavier", "depth_scaled", "truncated_normal"])
def test_every_init_scheme_covers_the_new_weights(init):
    model = tiny(init=init, qk_norm=True, ffn="gelu_affine")
    attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
    assert torch.equal(attn.q_norm.weight, torch.ones(attn.head_dim)) and torch.equal(attn.k_norm.weight, torch.ones(attn.head_dim))
    assert torch.equal(ffn.act_scale, torch.ones_like(ffn.act_scale)) and torch.equal(ffn.act_shift, torch.zeros_like(ffn.act_shift))
    assert 0.005 < ffn.up.weight.std() < 0.5


def test_z_loss_value():
    logits = torch.randn(2, 5, 7) * 3
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 0] = IGNORE_INDEX
    lse = logits.logsumexp(-1)
    expected = torch.cat([lse[0, 1:], lse[1]]).pow(2).mean()
    assert z_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_z_loss_is_trained_and_logged(data_dir, tmp_path):
    plain = run_tiny(data_dir, tmp_path / "plain").run_dir
    assert not any("z_loss" in r for r in read_metrics(plain / "metrics.jsonl"))
    run = run_tiny(data_dir, tmp_path / "z", train__z_loss=1e-2).run_dir
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert all(r["z_loss"] > 0 and math.isfinite(r["z_loss"]) for r in rows)
    # The reported loss stays the cross-entropy: comparable across runs with and without z-loss.
    assert rows[0]["loss"] == pytest.approx([r for r in read_metrics(plain / "metrics.jsonl") if "loss" in r][0]["loss"])


def test_flops_per_token_uses_the_mla_head_dims():
    from scratchlab.config import MLAConfig

    mla = MLAConfig(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=10)
    model = tiny(attention="mla", mla=mla, tie_embeddings=True)
    n = model.num_params(exclude_embeddings=True) + model.head.weight.numel()  # the tied head still computes
    T, L, H = 16, 2, 4
    assert model.flops_per_token(T) == 6 * n + 6 * L * T * H * (12 + 4 + 10)
    # Standard attention keeps PaLM's 12 L d T (q.k and v widths are both d):
    mha = tiny(tie_embeddings=False)
    assert mha.flops_per_token(T) == 6 * mha.num_params(exclude_embeddings=True) + 12 * L * 32 * T
