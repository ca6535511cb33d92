"""Multi-head latent attention: causality, cached decoding equals the full forward, cache size per token."""

from __future__ import annotations

import pytest
import torch

from scratchlab.config import MLAConfig, ModelConfig
from scratchlab.families.registry import build_model
from scratchlab.runs.metrics import read_metrics
from scratchlab.families.lm.sampler import generate

from conftest import run_tiny


def mla_model(**mla) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=50, max_seq_len=64, attention="mla",
                      mla=MLAConfig(**{"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                                       "v_head_dim": 6, **mla}))
    return build_model(cfg).eval()


@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_mla_is_causal(q_lora_rank):
    model = mla_model(q_lora_rank=q_lora_rank)
    ids = torch.randint(0, 50, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4


@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_cached_decoding_equals_full_forward(q_lora_rank):
    model = mla_model(q_lora_rank=q_lora_rank)
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert generate(model, [1, 2, 3], 15, temperature=0) == generate(model, [1, 2, 3], 15, temperature=0, use_cache=False)


def test_cache_holds_only_the_latent_and_the_rope_key():
    model = mla_model()
    cache = model.new_cache(1, 20)
    assert cache.per_token_values() == 8 + 4  # kv_lora_rank + qk_rope_head_dim, per layer
    assert len(cache.latents) == 2 and cache.latents[0].shape == (1, 20, 8) and cache.rope_keys[0].shape == (1, 20, 4)


def test_attention_probe_and_init_cover_mla():
    model = mla_model(q_lora_rank=8)
    assert model.attention_logit_max(torch.randint(0, 50, (1, 10))) > 0
    assert model.blocks[0].attn.kv_up.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_mla_trains(data_dir, tmp_path):
    run = run_tiny(data_dir, tmp_path, model__attention="mla", model__mla__kv_lora_rank=8,
                   model__mla__qk_nope_head_dim=8, model__mla__qk_rope_head_dim=4, model__mla__v_head_dim=8).run_dir
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_field_notes_preset_builds_as_written():
    from scratchlab.config import load_config

    cfg = load_config("lm-mla-moe")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.train.seq_len) == (512, 12, 8, 1024)
    assert (cfg.model.mla.q_lora_rank, cfg.model.mla.kv_lora_rank) == (8, 16)
    assert (cfg.model.mla.qk_nope_head_dim, cfg.model.mla.qk_rope_head_dim) == (512, 128)
    assert (cfg.model.moe.n_shared_experts, cfg.model.moe.n_routed_experts, cfg.model.moe.top_k) == (2, 6, 2)
    assert cfg.optim.lr == 1e-5 and cfg.model.init == "truncated_normal" and not cfg.model.bias
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_model(cfg.model.model_copy(update={"vocab_size": 32000}))
    assert 50e6 < model.num_params() < 200e6


def test_tiny_preset_trains_a_few_steps(data_dir, tmp_path):
    from scratchlab.config import load_config
    from scratchlab.train import train

    from conftest import quiet

    overrides = [f"data.path={data_dir}", "train.max_steps=3", "train.seq_len=32", "train.batch_size=4",
                 "eval.every=3", "eval.batches=1", "eval.batch_size=2", "demo.every=3", "demo.max_new_tokens=4",
                 f"train.out_dir={tmp_path}", "train.precision=fp32", "log.progress=lines", "train.save_every=3"]
    result = train(load_config("lm-mla-moe-tiny", overrides), console=quiet())
    assert result.status == "finished" and result.step == 3
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert all(len(r["moe_load"]) == 4 for r in rows)
