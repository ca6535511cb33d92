"""Mixture-of-experts FFN: dense equivalence, routing gradients, load, capacity, balancing, training."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlab.config import ModelConfig, MoEConfig
from scratchlab.models import build_model
from scratchlab.models.blocks import GeluFFN
from scratchlab.models.moe import MoEFFN
from scratchlab.runs.metrics import read_metrics
from scratchlab.sample import generate

from conftest import run_tiny


def moe(**kw) -> MoEFFN:
    torch.manual_seed(0)
    return MoEFFN(16, MoEConfig(**{"n_routed_experts": 4, "top_k": 2, **kw}), bias=False)


def test_one_expert_top1_equals_the_dense_ffn():
    layer = moe(n_routed_experts=1, top_k=1)
    dense = GeluFFN(16, layer.experts[0].up.out_features, bias=False)
    dense.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), dense(x))


def test_shared_experts_are_always_on():
    layer = moe(n_shared_experts=2)
    x = torch.randn(2, 4, 16)
    routed_only = moe()(x)  # same seed, same routed experts and router
    torch.testing.assert_close(layer(x) - layer.shared(x.reshape(-1, 16)).view_as(x), routed_only)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gradients_reach_the_router_and_load_sums_to_one(score):
    layer = moe(score=score)
    out = layer(torch.randn(4, 8, 16))
    (out.pow(2).mean() + layer.last_aux).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.last_load.shape == (4,) and layer.last_load.sum().item() == pytest.approx(1.0)
    assert 0 < layer.last_router_entropy <= math.log(4) + 1e-6


def test_aux_loss_is_switch_style():
    layer = moe()
    x = torch.randn(64, 16)
    layer(x)
    scores = layer.router(x).float().softmax(-1)
    expected = 4 * (layer.last_load * scores.mean(0)).sum()
    assert layer.last_aux.item() == pytest.approx(expected.item(), rel=1e-5)


def test_capacity_factor_drops_and_counts():
    layer = moe(n_routed_experts=2, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # route every token with a positive feature sum to expert 0
    x = torch.ones(1, 10, 16)
    out = layer(x)
    capacity = math.ceil(0.5 * 10 * 1 / 2)  # 3 per expert
    assert layer.last_dropped == 10 - capacity
    assert (out[0].abs().sum(-1) > 0).sum().item() == capacity  # dropped tokens get no routed output


def test_bias_balancing_moves_choice_not_weights():
    layer = moe(balance="bias", bias_update_rate=0.1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x = torch.rand(1, 32, 16)
    layer(x)
    load = layer.last_load.clone()
    assert layer.last_aux is None and load[0] == 0.5  # expert 0 is in every token's top 2
    before = layer(x).detach()
    layer.update_balance_bias()
    expected = 0.1 * torch.sign(load.mean() - load)  # over-loaded experts down, under-loaded up
    torch.testing.assert_close(layer.balance_bias, expected)
    # The bias changes which experts are chosen, but the weights still come from the router scores:
    layer.balance_bias.fill_(0.0)
    torch.testing.assert_close(layer(x), before)


def test_moe_lm_is_causal_caches_exactly_and_reports_load():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=50, max_seq_len=64,
                      moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2))
    model = build_model(cfg).eval()
    ids = torch.randint(0, 50, (2, 16))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])
    assert generate(model, [1, 2, 3], 10, temperature=0) == generate(model, [1, 2, 3], 10, temperature=0, use_cache=False)
    loads = model.moe_load()
    assert len(loads) == 2 and all(load.sum().item() == pytest.approx(1.0) for load in loads)
    assert model.aux_loss() is not None


@pytest.mark.parametrize("init", ["normal", "xavier", "depth_scaled", "truncated_normal"])
def test_init_covers_router_and_experts(init):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=4, d_model=64, n_heads=4, vocab_size=50, init=init,
                      moe=MoEConfig(n_routed_experts=4, top_k=2))
    layer = build_model(cfg).blocks[0].ffn
    router, down = layer.router.weight, layer.experts[0].down.weight
    if init == "xavier":
        assert router.abs().max() <= math.sqrt(6 / sum(router.shape)) + 1e-7
    else:
        assert router.std().item() == pytest.approx(0.02, rel=0.3)
    if init == "depth_scaled":
        assert down.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.2)


def test_moe_trains_and_logs(data_dir, tmp_path):
    run = run_tiny(data_dir, tmp_path, model__moe__n_routed_experts=4, model__moe__top_k=2,
                   model__moe__n_shared_experts=1).run_dir
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for r in rows:
        assert r["moe_aux_loss"] > 0 and r["moe_max_load_ratio"] >= 1.0 and r["moe_dropped"] == 0
        assert len(r["moe_load"]) == 2 and all(sum(layer) == pytest.approx(1.0, abs=1e-3) for layer in r["moe_load"])
