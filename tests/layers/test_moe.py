"""Mixture-of-experts FFN: dense equivalence, routing gradients, load, capacity, balancing, training."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlab.config import ModelConfig, MoEConfig
from scratchlab.families.registry import build_model
from scratchlab.layers.blocks import GeluFFN
from scratchlab.layers import moe as moe_module
from scratchlab.layers.moe import MoEFFN
from scratchlab.runs.metrics import read_metrics
from scratchlab.families.lm.sampler import generate

from conftest import run_tiny


def moe(**kw) -> MoEFFN:
    torch.manual_seed(0)
    return MoEFFN(16, MoEConfig(**{"n_routed_experts": 4, "top_k": 2, **kw}), bias=False)


def test_one_expert_top1_equals_the_dense_ffn():
    layer = moe(n_routed_experts=1, top_k=1)
    dense = GeluFFN(16, layer.experts.hidden, bias=False)
    dense.load_state_dict({"up.weight": layer.experts.w_in[0], "down.weight": layer.experts.w_out[0]})
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), dense(x))


def reference_moe(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """The MoE written the slow, obvious way: a loop over tokens and their k experts."""
    cfg, ex = layer.cfg, layer.experts
    E, k = cfg.n_routed_experts, cfg.top_k
    flat = x.reshape(-1, x.shape[-1])
    logits = layer.router(flat)
    scores = logits.softmax(-1) if cfg.score == "softmax" else logits.sigmoid()
    top = (scores + layer.balance_bias if cfg.balance == "bias" else scores).topk(k, -1).indices
    weights = scores.gather(-1, top)
    weights = weights / weights.sum(-1, keepdim=True)
    capacity = math.ceil(cfg.capacity_factor * len(flat) * k / E) if cfg.capacity_factor else len(flat) * k
    b_in = ex.b_in.view(E, -1) if ex.b_in is not None else torch.zeros(E, ex.w_in.shape[1])
    b_out = ex.b_out.view(E, -1) if ex.b_out is not None else torch.zeros(E, ex.w_out.shape[1])
    used, rows = [0] * E, []
    for n in range(len(flat)):
        row = layer.shared(flat[n]) if layer.shared is not None else torch.zeros_like(flat[n])
        for j in range(k):
            e = int(top[n, j])
            used[e] += 1
            if used[e] > capacity:  # the first `capacity` assignments in token order are kept
                continue
            h = ex.w_in[e] @ flat[n] + b_in[e]
            if ex.swiglu:
                gate, up = h.chunk(2)
                h = torch.nn.functional.silu(gate) * up
            else:
                h = torch.nn.functional.gelu(h)
            row = row + weights[n, j] * (ex.w_out[e] @ h + b_out[e])
        rows.append(row)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("kw", [
    {}, {"capacity_factor": 0.5}, {"top_k": 3, "capacity_factor": 1.0}, {"expert_ffn": "swiglu", "n_shared_experts": 1},
    {"score": "sigmoid", "balance": "bias"},
])
@pytest.mark.parametrize("bias", [False, True])
def test_sorted_dispatch_equals_the_per_token_loop_with_gradients(kw, bias):
    torch.manual_seed(0)
    layer = MoEFFN(16, MoEConfig(**{"n_routed_experts": 4, "top_k": 2, **kw}), bias=bias)
    with torch.no_grad():
        if kw.get("balance") == "bias":
            layer.balance_bias.normal_(std=0.1)  # shifts the choice only
        for b in (layer.experts.b_in, layer.experts.b_out):
            if b is not None:
                b.normal_()
    x = torch.randn(2, 9, 16, requires_grad=True)
    out, expected = layer(x), reference_moe(layer, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if kw.get("capacity_factor"):
        assert layer.last_dropped > 0
    grad = torch.randn_like(out)
    inputs = [x, *layer.parameters()]
    got = torch.autograd.grad((out * grad).sum(), inputs)
    want = torch.autograd.grad((expected * grad).sum(), inputs)
    for name, a, b in zip(["x", *dict(layer.named_parameters())], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_grouped_matmul_equals_the_loop_over_experts(monkeypatch):
    layer = moe(n_routed_experts=8, capacity_factor=0.75)
    x = torch.randn(4, 16, 16, requires_grad=True)
    out = layer(x)
    (grad_grouped,) = torch.autograd.grad(out.sum(), x)
    monkeypatch.setattr(moe_module, "_grouped_mm_supports", lambda dtype: False)  # the per-group loop (float64's path)
    looped = layer(x)
    (grad_looped,) = torch.autograd.grad(looped.sum(), x)
    torch.testing.assert_close(looped, out)
    torch.testing.assert_close(grad_looped, grad_grouped)


def test_bf16_autocast_runs_experts_in_bf16_close_to_fp32():
    layer = moe(n_shared_experts=1)
    x = torch.randn(4, 32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), atol=3e-2, rtol=3e-2)


def test_expert_biases_are_vectors_so_they_get_no_weight_decay():
    layer = moe(n_routed_experts=3)
    layer_b = MoEFFN(16, MoEConfig(n_routed_experts=3, top_k=2), bias=True)
    assert layer.experts.b_in is None
    assert layer_b.experts.b_in.shape == (3 * 16,) and layer_b.experts.b_out.shape == (3 * 16,)
    assert layer_b.experts.w_in.shape == (3, 16, 16) and layer_b.experts.w_out.shape == (3, 16, 16)


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
    router, up, down = layer.router.weight, layer.experts.w_in, layer.experts.w_out  # [E, out, in]
    if init == "xavier":  # fans per expert (64 + 64), not over the stacked [E * out] rows
        assert router.abs().max() <= math.sqrt(6 / sum(router.shape)) + 1e-7
        bound = math.sqrt(6 / (64 + 64))
        assert up.abs().max() <= bound and up.abs().max() > 0.9 * bound
    else:
        assert router.std().item() == pytest.approx(0.02, rel=0.3)
        assert up.std().item() == pytest.approx(0.02 if init != "truncated_normal" else 0.0176, rel=0.1)
    if init == "truncated_normal":
        assert up.abs().max() <= 0.04 and down.abs().max() <= 0.04
    if init == "depth_scaled":
        assert down.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    for e in range(4):  # every expert is initialised, not only the first
        assert down[e].std().item() > 0.004


def test_moe_trains_and_logs(data_dir, tmp_path):
    run = run_tiny(data_dir, tmp_path, model__moe__n_routed_experts=4, model__moe__top_k=2,
                   model__moe__n_shared_experts=1).run_dir
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for r in rows:
        assert r["moe_aux_loss"] > 0 and r["moe_max_load_ratio"] >= 1.0 and r["moe_dropped"] == 0
        assert len(r["moe_load"]) == 2 and all(sum(layer) == pytest.approx(1.0, abs=1e-3) for layer in r["moe_load"])


def test_flops_per_token_counts_active_experts_only():
    d, T, L, V = 64, 32, 2, 50
    cfg = ModelConfig(n_layers=L, d_model=d, n_heads=4, vocab_size=V, max_seq_len=T, tie_embeddings=False,
                      moe=MoEConfig(n_routed_experts=8, top_k=2, n_shared_experts=1, expert_mult=2.0))
    model = build_model(cfg)
    hidden = 2 * d  # expert_mult 2, GELU experts: up d x h and down h x d, no biases
    attn = 4 * d * d  # qkv + out projection
    norms = 2 * d  # two RMSNorms per block
    active_ffn = d * 8 + 2 * (2 * d * hidden) + 1 * (2 * d * hidden)  # router + top-2 routed + 1 shared
    active = L * (attn + norms + active_ffn) + d + V * d  # + final norm + untied head
    assert model.flops_per_token(T) == 6 * active + 12 * L * d * T
    # 8 routed experts are in the parameters, 2 in the FLOPs:
    assert model.num_params(exclude_embeddings=True) - active == L * 6 * 2 * d * hidden


def test_group_sizes_are_bucketed_so_matmul_shapes_stay_few():
    counts = torch.arange(0, 8193)
    padded = moe_module._bucket(counts)
    assert padded[0] == 0 and torch.all(padded >= counts)
    assert torch.all(padded[1:] - counts[1:] < torch.maximum(counts[1:] / 8, torch.tensor(16)))  # < 1/8 extra
    assert len(padded.unique()) <= 80  # vs 8,193 distinct sizes unbucketed: oneDNN keeps a kernel per shape


def test_experts_see_only_bucketed_groups_and_padding_changes_nothing(monkeypatch):
    layer = moe(n_routed_experts=4)
    seen, groups = [], []
    original = moe_module.grouped_mm
    monkeypatch.setattr(moe_module, "grouped_mm",
                        lambda x, w, ends: seen.append(len(x)) or groups.append(ends.diff(prepend=ends.new_zeros(1)))
                        or original(x, w, ends))
    x = torch.randn(1, 37, 16, requires_grad=True)
    out = layer(x)
    assert seen and all(n % 16 == 0 for n in seen) and seen[0] > 37 * 2  # padded beyond the 74 assignments
    assert all(bool((g % 16 == 0).all()) and int(g.sum()) >= 37 * 2 for g in groups)  # each group a multiple of 16
    torch.testing.assert_close(out, reference_moe(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 0.5, "expert_ffn": "swiglu"}])
def test_float64_runs_the_per_group_loop_and_equals_the_reference(kw):
    """The doctor re-measures leaks on a float64 copy: grouped_mm has no float64 kernel, the op loops over groups."""
    torch.manual_seed(0)
    layer = MoEFFN(16, MoEConfig(**{"n_routed_experts": 4, "top_k": 2, **kw}), bias=True).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_moe(layer, x), atol=1e-12, rtol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(reference_moe(layer, x).sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=1e-12)


def test_load_statistics_stay_on_the_device_and_come_back_in_one_copy(monkeypatch):
    from scratchlab.doctor.probes import moe_load_stats

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=50, max_seq_len=64,
                                    moe=MoEConfig(n_routed_experts=4, top_k=2, capacity_factor=0.5)))
    model(torch.randint(0, 50, (2, 16)))
    layers = model.moe_layers()
    assert all(torch.is_tensor(layer.last_dropped) and torch.is_tensor(layer.last_load) for layer in layers)
    copies = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: copies.append(1) or original(self))
    for name in ("item", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a: pytest.fail(f"a second host copy ({name})"))
    stats = moe_load_stats(model)
    assert copies == [1]
    assert stats["moe_dropped"] == sum(int(original(layer.last_dropped)) for layer in layers) > 0
    assert len(stats["moe_load"]) == 2 and all(sum(load) == pytest.approx(1.0, abs=1e-3) for load in stats["moe_load"])
    assert 0 < stats["moe_router_entropy"] <= math.log(4) + 1e-6 and stats["moe_max_load_ratio"] >= 1.0
