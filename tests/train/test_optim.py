"""Optimizers by parameter role (optim.name=adamw | muon), per-group LR schedules, and the recipe switches
(relu2 FFN, zero-initialised output projections, untied embeddings with their own LR, value embeddings)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import copy_cut_after, quiet, tiny_overrides
from safetensors.torch import load_file

from scratchlab.config import load_config
from scratchlab.doctor.findings import read_findings
from scratchlab.errors import UserError
from scratchlab.families.codec.data import write_synthetic_codes
from scratchlab.families.registry import build_model
from scratchlab.layers.blocks import ReLU2FFN
from scratchlab.runs.checkpoint import latest_checkpoint, load_trainer_state
from scratchlab.runs.metrics import read_metrics
from scratchlab.train import train
from scratchlab.train.optim import (
    RoleOptimizer,
    StackedMuon,
    build_optimizer,
    lr_at,
    muon_lr_scale,
    optimizer_roles,
)


def lm_config(data_dir, out, **extra):
    return load_config("tiny-lm", tiny_overrides(data_dir, out, **extra))


def losses(run, key="loss"):
    return [r[key] for r in read_metrics(run / "metrics.jsonl") if key in r]


# ---------------------------------------------------------------- roles


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = load_config("tiny-lm", ["model.vocab_size=64", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                                  "optim.name=muon", "model.qk_norm=false"])
    roles = optimizer_roles(build_model(cfg.model), cfg.optim)
    assert roles["muon"] == [f"blocks.{i}.{m}.weight" for i in range(2)
                             for m in ("attn.qkv", "attn.proj", "ffn.gate_up", "ffn.down")]
    # Tied: the head is the embedding (one parameter, AdamW).
    assert roles["adamw"] == ["tok_emb.weight", "blocks.0.attn_norm.weight", "blocks.0.ffn_norm.weight",
                              "blocks.1.attn_norm.weight", "blocks.1.ffn_norm.weight", "norm.weight"]
    untied = cfg.model.model_copy(update={"tie_embeddings": False, "bias": True, "value_embed": True, "qk_norm": True})
    roles = optimizer_roles(build_model(untied), cfg.optim)
    assert {"head.weight", "tok_emb.weight", "value_emb.weight", "blocks.0.attn.qkv.bias",
            "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= set(roles["adamw"])
    assert all(n.endswith(".weight") and ".blocks." not in n and "norm" not in n for n in roles["muon"])
    assert not set(roles["muon"]) & set(roles["adamw"])


def test_moe_experts_and_mla_projections_go_to_muon():
    cfg = load_config("lm-mla-moe-tiny", ["model.vocab_size=64", "optim.name=muon"])
    model = build_model(cfg.model)
    roles = optimizer_roles(model, cfg.optim)
    assert any(n.endswith("experts.w_in") for n in roles["muon"]) and any(n.endswith("experts.w_out") for n in roles["muon"])
    assert any(".attn.kv_down." in n for n in roles["muon"]) and any(".attn.kv_up." in n for n in roles["muon"])
    assert all(p.dim() >= 2 for n, p in model.named_parameters() if n in roles["muon"])
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, RoleOptimizer) and list(opt.parts) == ["muon", "adamw", "experts"]
    assert isinstance(opt.parts["experts"], StackedMuon)
    assert all(p.dim() == 3 for g in opt.parts["experts"].param_groups for p in g["params"])
    assert [g["name"] for g in opt.param_groups][:2] == ["matrices", "vectors"]  # the update-ratio probe's order


def test_codec_and_cascade_roles():
    cascade = load_config("cascade-tiny", ["model.cascade.n_features=8", "optim.name=muon",
                                           "model.cascade.rms_scaling=learnable"])
    roles = optimizer_roles(build_model(cascade.model), cascade.optim)
    assert {"stages.0.proj_in.weight", "stages.1.blocks.1.ffn.down.weight"} <= set(roles["muon"])
    assert {"stages.0.head.weight", "stages.1.rms_scale.log_gain"} <= set(roles["adamw"])
    codec = load_config("dia-tiny", ["model.codec.n_codebooks=3", "model.codec.codebook_size=16", "optim.name=muon"])
    roles = optimizer_roles(build_model(codec.model), codec.optim)
    assert {"embs.0.weight", "heads.weight", "text.emb.weight"} <= set(roles["adamw"])
    assert "blocks.0.cross.kv.weight" in roles["muon"] and "blocks.0.attn.qkv.weight" in roles["muon"]


def test_adamw_layout_is_unchanged_unless_roles_get_their_own_lr():
    cfg = load_config("tiny-lm", ["model.vocab_size=64", "model.tie_embeddings=false", "optim.name=adamw"])
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    assert type(opt) is torch.optim.AdamW and [g["name"] for g in opt.param_groups] == ["matrices", "vectors"]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters() if p.dim() >= 2]
    split = build_optimizer(model, cfg.optim.model_copy(update={"embed_lr": 0.01, "head_lr": 0.002, "scalar_lr": 1e-3}))
    assert [(g["name"], g["base_lr"]) for g in split.param_groups] == [
        ("matrices", 3e-3), ("vectors", 1e-3), ("embed", 0.01), ("head", 0.002)]
    assert split.param_groups[2]["params"] == [model.tok_emb.weight] and split.param_groups[3]["params"] == [model.head.weight]


def test_fsdp_sharded_matrices_are_refused_in_one_line():
    class DTensor(torch.nn.Parameter):  # what FSDP2's fully_shard makes of a parameter
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model[0].weight = DTensor(torch.zeros(4, 4))
    cfg = load_config("tiny-lm", ["optim.name=muon"]).optim
    with pytest.raises(UserError, match="optim.name=muon cannot run on FSDP-sharded matrices.*train.parallel=ddp"):
        build_optimizer(model, cfg)


# ---------------------------------------------------------------- the Muon update


@pytest.mark.parametrize("shape", [(3, 12, 20), (3, 20, 12)])  # wide and tall matrices
def test_stacked_muon_is_torch_muon_per_expert(shape):
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(shape) * 0.1)
    singles = [torch.nn.Parameter(stacked.detach()[e].clone()) for e in range(3)]
    kwargs = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=True, ns_steps=5, adjust_lr_fn="original")
    ours = StackedMuon([stacked], **kwargs)
    ref = torch.optim.Muon(singles, **kwargs)
    for _ in range(3):
        grad = torch.randn(shape)
        stacked.grad = grad.clone()
        for e, p in enumerate(singles):
            p.grad = grad[e].clone()
        ours.step()
        ref.step()
    for e, p in enumerate(singles):
        assert torch.equal(stacked.detach()[e], p.detach())  # the same bf16 ops, batched: bit for bit
    assert not torch.allclose(stacked.detach()[0], singles[1].detach())  # the experts did differ


def test_lr_scale_rules():
    assert muon_lr_scale("original", 768, 256) == pytest.approx(math.sqrt(3))
    assert muon_lr_scale("original", 256, 768) == 1.0
    assert muon_lr_scale("match_rms_adamw", 256, 768) == pytest.approx(0.2 * math.sqrt(768))


def test_every_group_follows_the_schedule_from_its_own_base_lr(data_dir, tmp_path):
    cfg = lm_config(data_dir, tmp_path, optim__name="muon", optim__muon_lr=0.05, optim__embed_lr=0.01,
                    train__max_steps=6, train__save_every=3)
    run = train(cfg, console=quiet()).run_dir
    state = load_trainer_state(latest_checkpoint(run / "checkpoints"))["optimizer"]
    step = 5  # the last optimizer step (0-based) set these
    muon_group = state["muon"]["param_groups"][0]
    assert muon_group["lr"] == lr_at(step, cfg.optim, 6, 0.05) and muon_group["base_lr"] == 0.05
    by_name = {g["name"]: g for g in state["adamw"]["param_groups"]}
    assert by_name["embed"]["lr"] == lr_at(step, cfg.optim, 6, 0.01)
    assert by_name["vectors"]["lr"] == lr_at(step, cfg.optim, 6)
    assert [r["lr"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r][-1] == lr_at(step, cfg.optim, 6)


# ---------------------------------------------------------------- training with muon, every family


def test_tiny_lm_trains_with_muon_and_resumes_bit_exactly(data_dir, tmp_path):
    straight = train(lm_config(data_dir, tmp_path / "a", optim__name="muon", train__max_steps=12,
                               train__keep_last=3), console=quiet()).run_dir
    loss = losses(straight)
    assert all(math.isfinite(x) for x in loss) and sum(loss[-3:]) < sum(loss[:3]) - 0.4  # measured: 17.94 -> 17.27
    cut = copy_cut_after(straight, tmp_path / "cut", "step_000004")
    assert train(resume=cut, console=quiet()).step == 12
    assert losses(cut) == losses(straight) and losses(cut, "val_loss") == losses(straight, "val_loss")
    a = load_file(straight / "checkpoints" / "step_000012" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step_000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A checkpoint of one optimizer does not load into the other: one clear line.
    with pytest.raises(UserError, match="does not match this model/optimizer.*another optim.name"):
        train(resume=cut, overrides=["optim.name=adamw", "train.max_steps=14"], console=quiet())


def test_config_given_at_resume_wins_over_the_checkpoint(data_dir, tmp_path):
    run = train(lm_config(data_dir, tmp_path, optim__name="muon"), console=quiet()).run_dir
    train(resume=run, overrides=["train.max_steps=10", "optim.muon_lr=0.005", "optim.schedule=constant"],
          console=quiet())
    state = load_trainer_state(latest_checkpoint(run / "checkpoints"))["optimizer"]
    assert state["muon"]["param_groups"][0]["base_lr"] == 0.005 and state["muon"]["param_groups"][0]["lr"] == 0.005


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
    return write_synthetic_codes(tmp_path_factory.mktemp("codes"), n_clips=24, T=80, K=4, codebook_size=32, seed=0)


def test_dia_like_codec_trains_with_muon(codes_dir, tmp_path):
    overrides = {
        "data.path": str(codes_dir), "data.val_fraction": 0.2, "model.n_layers": 2, "model.d_model": 64,
        "model.max_seq_len": 64, "model.codec.codebook_weights": "[4,1,1,1]", "train.seq_len": 32,
        "train.batch_size": 8, "train.max_steps": 12, "train.out_dir": str(tmp_path), "train.save_every": 6,
        "eval.every": 6, "eval.batches": 2, "eval.batch_size": 4, "demo.every": 12, "demo.seconds": 0.2,
        "log.progress": "lines", "train.threads": 1, "optim.name": "muon", "optim.warmup_steps": 3,
        "train.log_every": 1,
    }
    result = train(load_config("dia-tiny", [f"{k}={v}" for k, v in overrides.items()]), console=quiet())
    loss = losses(result.run_dir)
    assert result.status == "finished" and all(math.isfinite(x) for x in loss)
    assert loss[-1] < loss[0] - 0.3
    assert "muon" in load_trainer_state(latest_checkpoint(result.run_dir / "checkpoints"))["optimizer"]


def test_cascade_trains_with_muon(tmp_path):
    overrides = {"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "train.seq_len": 32,
                 "train.batch_size": 8, "train.max_steps": 40, "train.log_every": 5, "train.save_every": 40,
                 "eval.every": 20, "eval.batches": 2, "eval.batch_size": 8, "demo.every": 40,
                 "optim.warmup_steps": 5, "log.progress": "lines", "train.out_dir": str(tmp_path),
                 "optim.name": "muon", "model.cascade.rms_scaling": "learnable"}
    result = train(load_config("cascade-tiny", [f"{k}={v}" for k, v in overrides.items()]), console=quiet())
    val = losses(result.run_dir, "val_loss")
    assert result.status == "finished" and all(math.isfinite(x) for x in val) and val[-1] < val[0]


# ---------------------------------------------------------------- the doctor knows the optimizer


def update_ratio_findings(run):
    return [f for f in read_findings(run / "findings.jsonl") if f.code == "update_ratio"]


def test_doctor_is_silent_on_healthy_muon_and_flags_a_far_too_high_muon_lr(data_dir, tmp_path):
    common = dict(optim__name="muon", train__max_steps=30, train__save_every=30, eval__every=30, demo__every=30)
    healthy = train(lm_config(data_dir, tmp_path / "ok", **common), console=quiet())
    assert update_ratio_findings(healthy.run_dir) == []
    ratios = [r["update_ratio"] for r in read_metrics(healthy.run_dir / "metrics.jsonl") if "update_ratio" in r]
    assert max(ratios[2:]) < 0.3  # below the muon bound (doctor/monitors.py) after the warmup
    hot = train(lm_config(data_dir, tmp_path / "hot", **common, optim__muon_lr=0.6), console=quiet())
    found = update_ratio_findings(hot.run_dir)
    assert len(found) == 1 and found[0].evidence["direction"] == "high"
    assert "optim.muon_lr" in found[0].message


# ---------------------------------------------------------------- architecture switches


def tiny_model_config(**extra):
    base = ["model.vocab_size=64", "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.ffn=swiglu",
            "model.zero_init_out=false"]  # the switches under test start from the plain block, whatever the preset
    return load_config("tiny-lm", base + [f"model.{k}={v}" for k, v in extra.items()]).model


def test_relu2_computes_squared_relu():
    torch.manual_seed(0)
    ffn = build_model(tiny_model_config(ffn="relu2")).blocks[0].ffn
    assert isinstance(ffn, ReLU2FFN)
    x = torch.randn(2, 5, 32)
    h = x @ ffn.up.weight.T
    expected = (torch.clamp(h, min=0) ** 2) @ ffn.down.weight.T
    assert torch.allclose(ffn(x), expected, atol=1e-6)
    assert ffn.up.out_features == 128  # no 2/3 factor: two matrices, like gelu


def test_zero_init_makes_every_block_the_identity_at_first():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(zero_init_out=True))
    assert all(not b.attn.proj.weight.detach().any() and not b.ffn.down.weight.detach().any()
               for b in model.blocks)
    assert model.blocks[0].attn.qkv.weight.detach().all()
    ids = torch.randint(0, 64, (2, 8))
    expected = model.head(model.norm(model.tok_emb(ids)))  # the residual contributions are exactly 0
    assert torch.equal(model(ids), expected)
    moe = load_config("lm-mla-moe-tiny", ["model.vocab_size=64", "model.zero_init_out=true"]).model
    experts = [m for m in build_model(moe).modules() if hasattr(m, "w_out")]
    assert experts and all(not m.w_out.detach().any() for m in experts)
    assert all(not b.attn.proj.weight.detach().any() for b in build_model(moe).blocks)


def test_value_embeddings_change_outputs_and_train():
    torch.manual_seed(0)
    plain = build_model(tiny_model_config())
    torch.manual_seed(0)
    model = build_model(tiny_model_config(value_embed=True))
    assert model.value_emb.weight.shape == (64, 32)
    missing = set(model.state_dict()) - set(plain.state_dict())
    assert missing == {"value_emb.weight"}
    model.load_state_dict({**plain.state_dict(), "value_emb.weight": model.value_emb.weight}, strict=True)
    ids = torch.randint(0, 64, (2, 8))
    assert not torch.allclose(model(ids), plain(ids))
    with torch.no_grad():
        model.value_emb.weight.zero_()
    assert torch.allclose(model(ids), plain(ids), atol=1e-6)  # they enter through the values only
    loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert float(model.value_emb.weight.grad.abs().sum()) > 0
    # Cached generation sees the same values as the full forward.
    cache = model.new_cache(2)
    with torch.no_grad():
        step = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], dim=1)
    assert torch.allclose(step, model(ids), atol=1e-5)
    with pytest.raises(UserError, match="model.value_embed"):
        build_model(load_config("lm-mla-moe-tiny", ["model.vocab_size=64", "model.value_embed=true"]).model)


# ---------------------------------------------------------------- slow: muon under torchrun


@pytest.mark.slow
def test_muon_under_ddp_matches_one_process_and_fsdp_is_refused(data_dir, tmp_path):
    import subprocess
    import sys

    from conftest import run_tiny
    from test_distributed import _env, losses as dist_rows, torchrun

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_tiny(data_dir, tmp_path / "single", optim__name="muon", train__grad_accum=2).run_dir
    finally:
        torch.set_num_threads(threads)
    ddp = torchrun(tmp_path / "ddp", "train.parallel=ddp", "train.grad_accum=2", "optim.name=muon", data_dir=data_dir)
    # Muon's bf16 Newton-Schulz turns the all-reduce's float-sum order (~1e-7) into ~3e-4 relative
    # differences; a rank that diverged (a missed gradient sync) would differ by far more.
    got, want = dist_rows(ddp), dist_rows(single)
    assert [g[:2] for g in got] == [w[:2] for w in want] and len(got) > 16
    assert all(math.isclose(g[2], w[2], rel_tol=2e-3) for g, w in zip(got, want)), list(zip(got, want))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "scratchlab",
           "train", "tiny-lm", *tiny_overrides(data_dir, tmp_path / "fsdp", train__threads=1),
           "train.parallel=fsdp", "optim.name=muon"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    out = done.stderr + done.stdout  # torchrun adds its own traceback of the failed child; the rank says one line
    assert "error: optim.name=muon cannot run on FSDP-sharded matrices" in out and "exitcode: 2" in out
    assert not (tmp_path / "fsdp").exists() or not any((tmp_path / "fsdp").iterdir())
