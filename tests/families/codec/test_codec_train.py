"""The codec_lm family end to end: training through the Task, the one loss, demos, overfit-and-reproduce, sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import quiet

from scratchlab.cli import main
from scratchlab.config import load_config
from scratchlab.families.codec.data import open_codes_data, write_synthetic_codes
from scratchlab.families.codec.conditioning import collate_conditions, condition_ids
from scratchlab.families.codec.patterns import codes_window
from scratchlab.families.registry import build_model
from scratchlab.families.codec.patterns import DelayPattern, SpecialIds
from scratchlab.runs.metrics import read_metrics
from scratchlab.families.codec.sampler import generate_codes, sample_codes
from scratchlab.runs.load import load_run
from scratchlab.train import train
from scratchlab.families.registry import build_task

CB = 32


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
    return write_synthetic_codes(tmp_path_factory.mktemp("codes"), n_clips=24, T=80, K=4, codebook_size=CB, seed=0)


def codec_config(codes_dir, tmp_path, preset="musicgen-tiny", **extra):
    overrides = {
        "data.path": str(codes_dir), "data.val_fraction": 0.2, "model.n_layers": 2, "model.d_model": 64,
        "model.max_seq_len": 64, "train.seq_len": 32, "train.batch_size": 8, "train.max_steps": 6,
        "train.out_dir": str(tmp_path), "train.save_every": 3, "eval.every": 3, "eval.batches": 2,
        "eval.batch_size": 4, "demo.every": 3, "demo.seconds": 0.2, "log.progress": "lines", "train.threads": 1,
        **extra,
    }
    return load_config(preset, [f"{k}={v}" for k, v in overrides.items()])


def test_train_and_eval_use_the_one_loss_on_the_same_batch(codes_dir, tmp_path):
    cfg, task = build_task(codec_config(codes_dir, tmp_path, **{"eval.batches": 1}))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = task._batch("val", cfg.eval.batch_size, "fixed", batch_index=0)
    model.eval()
    with torch.no_grad():
        out = task.loss(model, batch)
    val = task.evaluate(model, torch.device("cpu"), "fp32")
    assert val["val_loss"] == pytest.approx(float(out.loss), rel=1e-5)
    for k in range(4):
        assert val[f"val_loss_cb{k}"] == pytest.approx(float(out.logged[f"loss_cb{k}"]), rel=1e-5)
    # At init every codebook's loss is near ln(classes): nothing is learned yet.
    assert abs(val["val_loss"] - math.log(CB + 3)) < 0.5


def test_codec_run_logs_per_codebook_losses_demos_and_samples(codes_dir, tmp_path, capsys):
    result = train(codec_config(codes_dir, tmp_path, **{"train.uncond_prob": 0.2}), console=quiet())
    run = result.run_dir
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert all(f"loss_cb{k}" in train_rows[-1] for k in range(4))
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(f"val_loss_cb{k}" in evals[-1] and f"val_entropy_cb{k}" in evals[-1] for k in range(4))
    coverage = [r for r in rows if "demo_coverage" in r]
    assert [r["step"] for r in coverage] == [3, 6] and 0 < coverage[-1]["demo_coverage_cb0"] <= 1
    # Demos at every temperature and CFG scale, saved as [T, K] codes with only real ids.
    demos = sorted((run / "demos").glob("step_000006_*.npy"))
    assert len(demos) == 2 * 3 * 2  # conditions x temperatures x cfg scales
    for path in demos:
        codes = np.load(path)
        assert codes.ndim == 2 and codes.shape[1] == 4 and codes.max() < CB
    index = json.loads((run / "demos" / "step_000006.json").read_text())
    assert {v["cfg_scale"] for v in index.values()} == {1.0, 3.0}
    assert "ids >= 32 are BOS/PAD/EOS" in (run / "data_step0.txt").read_text()
    # `scratchlab sample` on a codec run writes codes.
    assert main(["sample", str(run), "--text", "a slow calm loop", "--seconds", "0.3", "--cfg-scale", "2",
                 "--seed", "0", "--out", str(tmp_path / "out")]) == 0
    written = list((tmp_path / "out").glob("*.npy"))
    assert len(written) == 1 and np.load(written[0]).shape[1] == 4
    assert "never trained" not in capsys.readouterr().err


def test_cfg_on_a_model_never_trained_unconditionally_warns(codes_dir, tmp_path):
    run = train(codec_config(codes_dir, tmp_path, **{"train.max_steps": 2, "demo.every": 2, "train.uncond_prob": 0}),
                console=quiet()).run_dir
    text = (run / "demos" / "step_000002.txt").read_text()
    assert "CFG scales != 1 skipped: train.uncond_prob=0" in text
    assert not list((run / "demos").glob("*cfg3*.npy"))
    warnings = []
    sample_codes(load_run(run), "calm", seconds=0.1, cfg_scale=4.0, seed=0, out=tmp_path / "s", warn=warnings.append)
    assert len(warnings) == 1 and "unconditional branch was never trained" in warnings[0]


def test_a_crashing_demo_does_not_stop_the_run(codes_dir, tmp_path, monkeypatch):
    import scratchlab.families.codec.sampler as sampler

    def broken(*args, **kwargs):
        raise RuntimeError("demo bug")

    monkeypatch.setattr(sampler, "generate_codes", broken)
    result = train(codec_config(codes_dir, tmp_path), console=quiet())
    assert result.status == "finished" and result.step == 6
    assert "demo at step 6 failed (RuntimeError: demo bug)" in (result.run_dir / "train.log").read_text()


def test_greedy_sampling_after_overfitting_one_clip_reproduces_it():
    """Field note: greedy demos reproduced an overfit clip. Here exactly, EOS included, with the dia pattern."""
    K, T = 4, 20
    cfg = load_config("dia-tiny", ["model.n_layers=2", "model.d_model=64", "model.max_seq_len=64", "train.seq_len=32",
                                   f"model.codec.n_codebooks={K}", f"model.codec.codebook_size={CB}",
                                   "model.codec.codebook_weights=null"])
    pattern = DelayPattern.preset("dia", K)  # delays 0, 8, 9, 10
    special = SpecialIds.for_codebook(CB)
    clip = np.random.default_rng(0).integers(0, CB, (T, K))
    x, y = codes_window(clip, 0, T, pattern, special)
    ids, mask = collate_conditions([condition_ids("the one clip", (), 48)])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    from scratchlab.loss import codebook_loss

    for _ in range(150):
        logits = model(x[None], ids, mask)
        loss, _ = codebook_loss(logits, y[None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    codes, stream = generate_codes(model, list(pattern.delays), T + 10, cond_ids=ids, cond_mask=mask,
                                   temperature=0.0)
    assert codes[0].shape == (T, K)  # stopped on its own, at the clip's EOS
    assert torch.equal(codes[0], torch.from_numpy(clip))
    assert torch.equal(stream[0], pattern.apply(torch.from_numpy(clip), special, eos=True))


def test_codec_config_errors_are_one_line(codes_dir, tmp_path, capsys):
    base = [f"data.path={codes_dir}", f"train.out_dir={tmp_path}"]
    assert main(["train", "musicgen-tiny", *base, "model.codec.n_codebooks=9"]) == 2
    assert "model.codec.n_codebooks=9 but the codes" in capsys.readouterr().err
    assert main(["train", "musicgen-tiny", *base, "train.seq_len=126"]) == 2
    assert "raise model.max_seq_len" in capsys.readouterr().err
    assert main(["train", "musicgen-tiny", "data.path=stdlib", f"train.out_dir={tmp_path}"]) == 2
    assert "needs codes" in capsys.readouterr().err
    assert main(["train", "musicgen-tiny", *base, "model.codec.codebook_weights=[1,2]"]) == 2
    assert "codebook_weights has 2 entries for 4 codebooks" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run dir was left behind


@pytest.mark.slow
@pytest.mark.parametrize("preset, steps", [("musicgen-tiny", 80), ("dia-tiny", 80)])
def test_tiny_codec_presets_learn_the_synthetic_codes(preset, steps, tmp_path, monkeypatch):
    """The shipped tiny presets on their generated codes: every codebook's val loss far below ln(codebook)."""
    monkeypatch.setenv("SCRATCHLAB_CACHE", str(tmp_path / "cache"))
    cfg = load_config(preset, [f"train.max_steps={steps}", "train.batch_size=8", f"train.out_dir={tmp_path}",
                               f"eval.every={steps}", f"demo.every={steps}", "log.progress=lines"])
    result = train(cfg, console=quiet())
    (last,) = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "val_loss_cb0" in r]
    per_cb = [last[f"val_loss_cb{k}"] for k in range(16) if f"val_loss_cb{k}" in last]
    print(f"\n{preset}: {steps} steps, val_loss {result.val_loss:.4f}, per codebook {[round(x, 3) for x in per_cb]}, "
          f"{result.tokens_per_s:,.0f} tok/s, ln(64) = {math.log(64):.3f}")
    assert len(per_cb) >= 4
    assert max(per_cb) < 0.35 * math.log(64)


def test_preflight_catches_a_crop_that_always_starts_at_zero(codes_dir, tmp_path, monkeypatch):
    """Field note: an inverted crop flag made every sample the clip's first seconds."""
    import scratchlab.families.codec.data as codes_mod

    cfg, task = build_task(codec_config(codes_dir, tmp_path))
    model = build_model(cfg.model)
    batch = task.train_batch(4, torch.Generator().manual_seed(0))
    healthy = task.preflight(model, batch)
    assert not [f for f in healthy if f.severity == "error"], healthy
    assert "deterministic_windows" not in {f.code for f in healthy}

    real = codes_mod.clip_window_start
    monkeypatch.setattr(codes_mod, "clip_window_start",
                        lambda length, window, mode, **kw: 0 if mode == "random" else real(length, window, mode, **kw))
    broken = {f.code: f for f in task.preflight(model, batch)}
    assert "deterministic_windows" in broken
    assert broken["deterministic_windows"].evidence["reason"] == "constant_start"
