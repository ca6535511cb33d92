"""train.compile (torch.compile, with an eager fallback) and train.activation_checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_tiny

import scratchlab.runtime as device_mod
from scratchlab.config import load_config
from scratchlab.families.codec.conditioning import collate_conditions, condition_ids
from scratchlab.loss import codebook_loss, token_loss
from scratchlab.families.registry import build_model
from scratchlab.runs.metrics import read_metrics
from scratchlab.runtime import compiler_missing


def losses(run_dir, keys=("loss", "grad_norm", "val_loss")):
    return [(r["step"], k, r[k]) for r in read_metrics(run_dir / "metrics.jsonl") for k in keys if k in r]


def assert_close_sequences(got, want, rel):
    assert [g[:2] for g in got] == [w[:2] for w in want]
    bad = [(g, w) for g, w in zip(got, want) if not math.isclose(g[2], w[2], rel_tol=rel)]
    assert not bad, f"{len(bad)} values differ, first: {bad[0]}"


# ---------------------------------------------------------------- activation checkpointing


def _lm_and_batch():
    cfg = load_config("tiny-lm", ["model.n_layers=3", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                                  "model.max_seq_len=32", "train.seq_len=16"])
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    return cfg, lambda m: token_loss(m(ids[:, :-1]), ids[:, 1:])


def _codec_and_batch():
    cfg = load_config(None, [
        "model.family=codec_lm", "model.codec.n_codebooks=4", "model.codec.codebook_size=16", "model.n_layers=2",
        "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32", "model.codec.text_d_model=32",
        "model.codec.text_heads=2", "model.codec.max_text_bytes=16", "model.codec.conditioning=text", "train.seq_len=16",
    ])
    codes = torch.randint(0, 16, (2, 17, 4), generator=torch.Generator().manual_seed(1))
    cond_ids, cond_mask = collate_conditions([condition_ids(t, (), 16) for t in ("rain", "a slow waltz")])
    return cfg, lambda m: codebook_loss(m(codes[:, :-1], cond_ids, cond_mask), codes[:, 1:])[0]


@pytest.mark.parametrize("make", [_lm_and_batch, _codec_and_batch], ids=["lm", "codec_lm"])
def test_activation_checkpointing_recomputes_blocks_and_changes_no_number(make):
    cfg, loss_of = make()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        model.activation_checkpointing = checkpointing
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))  # recompute may stop early
        loss = loss_of(model)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert (calls0, calls1) == (1, 2)  # checkpointed: the block ran again in backward
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-8, msg=name)
    # Not under no_grad (eval, sampling): nothing is kept for a backward, so nothing is recomputed.
    with torch.no_grad():
        calls.clear()
        loss_of(model)
    assert len(calls) == 1


def test_activation_checkpointing_in_training(data_dir, tmp_path):
    plain = run_tiny(data_dir, tmp_path / "plain", train__max_steps=4)
    checkpointed = run_tiny(data_dir, tmp_path / "ac", train__max_steps=4, train__activation_checkpointing=True)
    assert_close_sequences(losses(checkpointed.run_dir), losses(plain.run_dir), rel=1e-6)
    assert "activation checkpointing" in (checkpointed.run_dir / "train.log").read_text()


# ---------------------------------------------------------------- torch.compile


def test_compiler_missing_is_reported(monkeypatch):
    monkeypatch.setattr(device_mod.shutil, "which", lambda name: None)
    assert "no C++ compiler" in compiler_missing(torch.device("cpu"))
    assert compiler_missing(torch.device("cuda")) is None


def test_a_compile_failure_falls_back_to_eager_with_one_warning(data_dir, tmp_path, monkeypatch):
    """torch.compile fails lazily, at the first call: the first step is redone eagerly, on the same batch."""
    calls = []

    def broken_compile(module, **kwargs):
        def fails(*args, **kw):
            calls.append(1)
            raise RuntimeError("simulated inductor failure\nC++ compile error: ...")

        return fails

    plain = run_tiny(data_dir, tmp_path / "plain", train__max_steps=3)
    monkeypatch.setattr(torch, "compile", broken_compile)
    fell_back = run_tiny(data_dir, tmp_path / "compiled", train__max_steps=3, train__compile=True)
    assert calls == [1] and fell_back.status == "finished"
    assert losses(fell_back.run_dir) == losses(plain.run_dir)  # same batches, same numbers
    warnings = [line for line in (fell_back.run_dir / "train.log").read_text().splitlines() if "torch.compile" in line]
    assert len(warnings) == 2  # the model line names it, then the one-line warning
    assert "torch.compile failed (RuntimeError: simulated inductor failure); training eagerly" in warnings[1]


def test_no_compiler_trains_eagerly(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(device_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called without a compiler"))
    result = run_tiny(data_dir, tmp_path, train__max_steps=2, train__compile=True)
    assert result.status == "finished"
    assert "no C++ compiler was found" in (result.run_dir / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing(torch.device("cpu")) is not None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_matches_eager(data_dir, tmp_path):
    """A real inductor compile of the tiny model (~30-45 s on 2 cores, cold cache)."""
    small = dict(model__n_layers=1, train__max_steps=3, eval__every=3, demo__every=100)
    eager = run_tiny(data_dir, tmp_path / "eager", **small)
    compiled = run_tiny(data_dir, tmp_path / "compiled", train__compile=True, **small)
    log = (compiled.run_dir / "train.log").read_text()
    assert "torch.compile failed" not in log and "precision fp32, torch.compile" in log
    assert_close_sequences(losses(compiled.run_dir), losses(eager.run_dir), rel=1e-5)


# ---------------------------------------------------------------- the GPU benchmark (configuration and MFU arithmetic)


def _benchmark():
    from conftest import load_benchmark

    return load_benchmark("train_throughput")


def test_gpu_124m_benchmark_is_a_124m_model_at_seq_1024_bf16_compiled(monkeypatch):
    bench = _benchmark()
    args = bench.parse_args(["--gpu-124m", "train.batch_size=8"])
    cfg = bench.bench_config(args.preset, args.overrides)
    assert args.precisions == ["bf16"] and cfg.train.batch_size == 8  # user overrides win
    assert (cfg.train.seq_len, cfg.train.precision, cfg.train.compile, cfg.train.device) == (1024, "bf16", True, "cuda")
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert 123e6 < model.num_params() < 125e6
    # MFU = flops_per_token x tokens/s / peak: 855 MFLOP/token at 400k tokens/s on an H100 is 34.6 %.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    name, peak = bench.gpu_peak(torch.device("cuda"))
    assert name == "h100" and peak == 989.4e12
    times = bench.StepTimes(seconds=[16 * 1024 / 400_000] * 3)
    result = bench.summarize("bf16", times, 16 * 1024, model.flops_per_token(1024), 5e14, peak)
    assert result.tokens_per_s == pytest.approx(400_000)
    assert result.mfu == pytest.approx(model.flops_per_token(1024) * 400_000 / 989.4e12)
    assert 0.34 < result.mfu < 0.35
    assert bench.summarize("fp32", times, 16 * 1024, 1.0, 1.0, peak).mfu is None  # the peak is a bf16 figure


@pytest.mark.parametrize("device_name, key", [
    ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A10", "a10"), ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
])
def test_gpu_peak_is_recognised_from_the_device_name(monkeypatch, device_name, key):
    bench = _benchmark()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert bench.gpu_peak(torch.device("cuda"))[0] == key
    assert bench.gpu_peak(torch.device("cpu")) is None
    assert bench.gpu_peak(torch.device("cpu"), "a100")[0] == "a100"


# ---------------------------------------------------------------- every family compiles whole, the loss inside


def _family_configs():
    import test_host_syncs as configs

    return [configs.lm_config, configs.codec_config, configs.cascade_config]


def _compiled_trainer(make_config, data_dir, tmp_path):
    from conftest import quiet

    from scratchlab.families.registry import build_task
    from scratchlab.train.loop import Reporter, Trainer

    cfg = make_config(data_dir, tmp_path)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})})
    cfg, task = build_task(cfg)
    return Trainer(cfg, None, task, Reporter(quiet(), "lines"))


def _train_two_steps(trainer):
    from scratchlab.train.loop import _NullMetrics

    try:
        for _ in range(2):
            trainer.train_step(_NullMetrics())
    finally:
        trainer.batches.close()


@pytest.mark.parametrize("family", [0, 1, 2], ids=["lm", "codec_lm (dia-tiny)", "cascade"])
def test_the_loss_function_of_every_family_traces_as_one_graph(family, data_dir, tmp_path, monkeypatch):
    """Dynamo's tracing alone (backend=eager: no inductor, seconds): fullgraph=True raises at any graph break."""
    import torch._dynamo

    compiled = []
    real_compile = torch.compile

    def traced(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="eager", fullgraph=True)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", traced)
    trainer = _compiled_trainer(_family_configs()[family], data_dir, tmp_path)
    assert compiled == [trainer._eager_loss]  # the function batch -> loss is compiled, not only the model
    _train_two_steps(trainer)
    assert trainer.forward_model is not trainer.wrapped  # no eager fallback
    assert trainer.step == 2 and math.isfinite(trainer.last_loss)


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing(torch.device("cpu")) is not None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("family", [0, 1, 2], ids=["lm", "codec_lm (dia-tiny)", "cascade"])
def test_every_family_compiles_whole_with_inductor(family, data_dir, tmp_path):
    """The real compile (inductor, 30-70 s each on 2 busy cores): zero graph breaks, one graph, no fallback."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = _compiled_trainer(_family_configs()[family], data_dir, tmp_path)
    _train_two_steps(trainer)
    assert trainer.forward_model is not trainer.wrapped
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # model and loss in one graph (its backward is compiled with it)
    assert trainer.step == 2 and math.isfinite(trainer.last_loss)


# ---------------------------------------------------------------- the loss functions stay exact


def test_codebook_loss_equals_per_codebook_token_losses_with_weights_and_an_empty_codebook():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 4, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7, 4), generator=g)
    labels[0, :2, 1] = -100
    labels[..., 3] = -100  # no target in codebook 3: no weight, loss 0, never NaN
    weights = [4.0, 1.0, 2.0, 5.0]
    total, per_cb = codebook_loss(logits, labels, weights)
    want = [token_loss(logits[..., k, :], labels[..., k]) for k in range(3)]
    for k in range(3):
        torch.testing.assert_close(per_cb[k], want[k], rtol=1e-6, atol=1e-7)
    assert float(per_cb[3]) == 0.0
    torch.testing.assert_close(total, sum(w * l for w, l in zip(weights, want)) / 7.0, rtol=1e-6, atol=1e-7)


def test_z_loss_is_the_mean_over_kept_targets():
    from scratchlab.loss import z_loss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=g) * 3
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[1, 3:] = -100
    kept = labels.reshape(-1) != -100
    want = logits.reshape(-1, 9).logsumexp(-1)[kept].pow(2).mean()
    torch.testing.assert_close(z_loss(logits, labels), want, rtol=1e-6, atol=1e-7)


def test_linear_token_loss_equals_the_plain_path():
    from scratchlab.loss import linear_token_loss

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[0, 0] = -100
    fused = linear_token_loss(hidden, weight, labels)
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = token_loss(hidden @ weight.T, labels)
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing(torch.device("cpu")) is not None, reason="torch.compile on CPU needs a C++ compiler")
def test_the_compiled_loss_holds_no_fp32_copy_of_bf16_logits():
    """token_loss's .float() is fused into the cross-entropy kernels: forward and backward allocate no fp32 [N, V]."""
    import re

    from torch._inductor.utils import run_and_get_code

    N, D, V = 64, 32, 1000
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (N,))

    def loss_of(hidden, weight, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = hidden @ weight.T
        return token_loss(logits, labels)

    def step():
        loss = torch.compile(loss_of)(hidden, weight, labels)
        loss.backward()
        return loss

    loss, codes = run_and_get_code(step)
    big = [buf for code in codes for buf in
           re.findall(r"empty_strided_cpu\(\((\d+), (\d+)\), \(\d+, \d+\), torch\.(\w+)\)", code)
           if int(buf[0]) * int(buf[1]) >= N * V]
    assert big and all(dtype == "bfloat16" for _, _, dtype in big), big  # the bf16 logits only
    assert math.isfinite(float(loss.detach())) and weight.grad is not None


def test_the_reference_gpt2_has_gpt2_smalls_shape_and_trains_with_its_loss_inside():
    bench = _benchmark()
    with torch.device("meta"):
        ref = bench.ReferenceGPT(50304, 1024, 12, 768, 12)
    assert 124.0e6 < sum(p.numel() for p in ref.parameters()) < 124.8e6  # GPT-2 small, vocab 50304, tied head
    cfg = bench.bench_config("tiny-lm", ["model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                                         "train.seq_len=16", "train.batch_size=2", "train.compile=false"])
    session = bench.ReferenceSession(cfg, torch.device("cpu"), "fp32")
    before = session.model.head.weight.detach().clone()
    session.step()
    assert not torch.equal(before, session.model.head.weight)  # one AdamW step through the loss in its forward


def test_moe_benchmark_compares_with_the_dense_model_of_equal_width_and_active_flops():
    bench = _benchmark()
    cfg = bench.bench_config("lm-mla-moe-tiny", [])
    dense = bench.dense_reference(cfg)
    assert dense is not None and dense.model.moe.n_routed_experts == 0 and dense.model.d_model == cfg.model.d_model
    with torch.device("meta"):
        moe_model, dense_model = build_model(cfg.model), build_model(dense.model)
    seq = cfg.train.seq_len
    # Same active FLOPs per token up to the router (d x E per layer, < 1 % here); fewer parameters.
    assert dense_model.flops_per_token(seq) == pytest.approx(moe_model.flops_per_token(seq), rel=0.01)
    assert dense_model.num_params() < moe_model.num_params()
    assert bench.dense_reference(bench.bench_config("tiny-lm", [])) is None  # dense presets: nothing to compare
    assert bench.parse_args(["--preset", "lm-mla-moe", "--no-dense-reference"]).no_dense_reference
