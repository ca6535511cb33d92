"""The lm family: causality, memorisation, GQA, init schemes, FLOP count."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlab.config import ModelConfig
from scratchlab.loss import token_loss
from scratchlab.families.registry import build_model
from scratchlab.layers.blocks import RMSNorm


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=50, max_seq_len=64)
    return build_model(ModelConfig(**{**base, **kw}))


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"ffn": "gelu", "bias": True}, {"tie_embeddings": False}])
def test_output_at_t_ignores_tokens_after_t(kw):
    model = tiny(**kw).eval()
    ids = torch.randint(0, 50, (2, 20))
    t = 11
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(0, 50, (2, 20 - t - 1))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-4  # the later positions do see the change


def test_memorises_one_batch():
    model = tiny()
    ids = torch.randint(0, 50, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = token_loss(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_initial_loss_is_near_uniform():
    model = tiny(vocab_size=1000)
    ids = torch.randint(0, 1000, (4, 32))
    with torch.no_grad():
        loss = token_loss(model(ids[:, :-1]), ids[:, 1:]).item()
    assert abs(loss - math.log(1000)) < 0.1


def test_rmsnorm_is_standard():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)


def test_init_schemes():
    n_layers, std = 8, 0.02
    model = tiny(n_layers=n_layers, d_model=256, n_heads=4, init="depth_scaled", vocab_size=4000)
    proj = model.blocks[0].attn.proj.weight.std().item()
    qkv = model.blocks[0].attn.qkv.weight.std().item()
    assert proj == pytest.approx(std / math.sqrt(2 * n_layers), rel=0.05)
    assert qkv == pytest.approx(std, rel=0.05)
    normal = tiny(n_layers=n_layers, d_model=256, n_heads=4, init="normal", vocab_size=4000)
    assert normal.blocks[0].attn.proj.weight.std().item() == pytest.approx(std, rel=0.05)
    trunc = tiny(d_model=256, n_heads=4, init="truncated_normal", vocab_size=4000)
    assert trunc.blocks[0].ffn.gate_up.weight.abs().max().item() <= 2 * std + 1e-7
    xavier = tiny(d_model=256, n_heads=4, init="xavier", vocab_size=4000)
    w = xavier.blocks[0].attn.proj.weight
    assert w.abs().max().item() <= math.sqrt(6 / (w.shape[0] + w.shape[1])) + 1e-7


def test_logits_scale_multiplies_logits():
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        base = tiny()(ids)
        scaled = tiny(logits_scale=0.1)(ids)
    torch.testing.assert_close(scaled, base * 0.1)


def test_tied_and_untied_heads():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 50 * 32


def test_flops_per_token_formula():
    model = tiny(tie_embeddings=False)
    n = model.num_params() - model.tok_emb.weight.numel()
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16


def test_gqa_uses_fewer_kv_parameters():
    assert tiny(n_kv_heads=1).num_params() < tiny().num_params()


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny(max_seq_len=8)(torch.zeros(1, 9, dtype=torch.long))


def test_attention_logit_probe_reads_pre_softmax_logits():
    model = tiny(n_kv_heads=2).eval()
    ids = torch.randint(0, 50, (2, 16))
    base = model.attention_logit_max(ids)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(2.0)  # q and k double, so q.k quadruples in the first layer
    first_layer = model.blocks[0].attn
    model.attention_logit_max(ids)
    assert not first_layer.probe_logit_max  # the probe switches itself off
    doubled = model.attention_logit_max(ids)
    assert doubled > base and first_layer.last_logit_max > 0
    # The probe changes nothing in the forward pass itself.
    with torch.no_grad():
        plain = model(ids)
        first_layer.probe_logit_max = True
        probed = model(ids)
    torch.testing.assert_close(plain, probed)


def test_attention_logit_probe_matches_an_explicit_computation():
    model = tiny().eval()
    ids = torch.randint(0, 50, (1, 12))
    attn = model.blocks[0].attn
    captured = {}
    attn.register_forward_pre_hook(lambda mod, args: captured.update(x=args[0]))  # returns None: args unchanged
    model.attention_logit_max(ids)
    with torch.no_grad():
        from scratchlab.layers.blocks import apply_rope

        x = captured["x"]
        q, k, _ = attn.qkv(x).split([32, 32, 32], dim=-1)
        q = apply_rope(q.view(1, 12, 4, 8).transpose(1, 2), model.rope_cos[:12], model.rope_sin[:12])
        k = apply_rope(k.view(1, 12, 4, 8).transpose(1, 2), model.rope_cos[:12], model.rope_sin[:12])
        scores = (q @ k.transpose(-2, -1)) / 8**0.5
        expected = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf")).amax()
    assert attn.last_logit_max == pytest.approx(float(expected), rel=1e-5)
