"""Scaling laws: published fits and the Chinchilla anchor, data-constrained advice, shapes, fitting, IsoFLOP sweeps."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import run_tiny
from scratchlab.cli import main
from scratchlab.config import ModelConfig, load_config
from scratchlab.errors import UserError
from scratchlab.families.registry import build_model
from scratchlab.scaling import laws
from scratchlab.scaling.fit import RunPoint, collect_runs, fit_law, group_by_compute, isoflop_fit
from scratchlab.scaling.isoflop import isoflop_sweep
from scratchlab.scaling.plan import epoch_advice, plan
from scratchlab.scaling.shapes import pick_shapes, shape_for

CHINCHILLA_C = 5.76e23  # Chinchilla: 70B parameters, 1.4T tokens (Hoffmann et al. 2022)


# ---------------------------------------------------------------- published laws and the plan


def test_plan_hits_the_chinchilla_anchor_with_the_default_law():
    # The default law is the Besiroglu et al. 2024 refit of approach 3: 72.2B params, 1.33T tokens.
    p = plan(CHINCHILLA_C)
    assert p.law.name == "besiroglu2024"
    assert p.n == pytest.approx(70e9, rel=0.05)
    assert p.d == pytest.approx(1.4e12, rel=0.06)
    assert 6 * p.n * p.d == pytest.approx(CHINCHILLA_C)
    assert 15 < p.tokens_per_param < 25


def test_approach1_allocation_hits_the_anchor():
    # Approach 1 (a = b = 0.5, G from Table 3): 67.8B params, 1.42T tokens.
    n, d = laws.APPROACH_1.optimal(CHINCHILLA_C)
    assert n == pytest.approx(70e9, rel=0.05)
    assert d == pytest.approx(1.4e12, rel=0.05)


def test_hoffmann_printed_coefficients_give_the_known_smaller_model():
    # The paper's rounded approach-3 coefficients put ~32B params / ~3T tokens at Chinchilla's budget
    # (Besiroglu et al. 2024): the reason they are not the default.
    n, d = laws.HOFFMANN_2022.optimal(CHINCHILLA_C)
    assert 3.0e10 < n < 3.5e10 and 2.8e12 < d < 3.2e12


@pytest.mark.parametrize("law", list(laws.LAWS.values()), ids=list(laws.LAWS))
def test_closed_form_is_the_minimum_on_the_isoflop_line(law):
    c = 1e21
    n, d = law.optimal(c)
    best = law.loss(n, d)
    for factor in (0.8, 0.95, 1.05, 1.25):
        m = n * factor
        assert law.loss(m, c / (6 * m)) > best


def test_muennighoff_formula_reproduces_the_authors_numbers():
    # datablations README: scaling_law(6.34e9, 242e9, 25e9) and the 8.67e9 / 178e9 model, and their optimum.
    law = laws.MUENNIGHOFF_2023
    assert laws.data_constrained_loss(law, 6.34e9, 242e9, 25e9) == pytest.approx(2.2256440889984477, abs=1e-9)
    assert laws.data_constrained_loss(law, 8.67e9, 178e9, 25e9) == pytest.approx(2.2269634075087867, abs=1e-9)
    n, d = laws.data_constrained_optimum(law, 6 * 8.67e9 * 178e9, 25e9)
    assert n == pytest.approx(6.8e9, rel=0.02) and d == pytest.approx(227e9, rel=0.02)


def test_effective_tokens():
    assert laws.effective_tokens(5.0, 10.0) == 5.0  # less than one epoch: all new
    four_epochs = laws.effective_tokens(4.0, 1.0)  # R = 3
    assert four_epochs == pytest.approx(1 + laws.R_D_STAR * (1 - math.exp(-3 / laws.R_D_STAR)))
    assert 0.9 * 4 < four_epochs < 4  # ~4 epochs are nearly as good as new data
    assert laws.effective_tokens(1000.0, 1.0) == pytest.approx(1 + laws.R_D_STAR, rel=1e-6)  # the ceiling


def test_plan_with_too_little_data_gives_epochs_and_advice():
    p = plan(CHINCHILLA_C, tokens_available=1e11)
    dc = p.data
    assert dc.epochs == pytest.approx(p.d / 1e11)
    assert dc.effective_tokens < p.d
    assert dc.loss <= dc.loss_repeated + 1e-12  # the data-constrained optimum is at least as good
    assert dc.n < p.n  # fewer parameters, more epochs
    assert "16 epochs" in dc.advice or "4 epochs" in dc.advice
    assert plan(CHINCHILLA_C, tokens_available=1e13).data.epochs < 1


@pytest.mark.parametrize(("epochs", "phrase"), [(0.5, "enough"), (3, "nearly as good"), (8, "lose value"), (40, "16 epochs")])
def test_epoch_advice(epochs, phrase):
    assert phrase in epoch_advice(epochs)


def test_gpu_hours_budget():
    p = plan(gpu_hours=1000, gpu="h100", mfu=0.4)
    assert p.compute == pytest.approx(1000 * 3600 * 989.4e12 * 0.4)
    assert plan(gpu_hours=1000, gpu="a100", mfu=0.4).compute == pytest.approx(p.compute * 312 / 989.4)


@pytest.mark.parametrize("kwargs", [{}, {"compute": 1e20, "gpu_hours": 5.0}, {"gpu_hours": 10.0, "gpu": "nope"},
                                    {"gpu_hours": 10.0, "mfu": 1.5}, {"compute": -1.0}, {"compute": 1e20, "law": "x"}])
def test_plan_bad_input_is_a_user_error(kwargs):
    with pytest.raises(UserError):
        plan(**kwargs)


def test_plan_cli_cites_its_source(capsys):
    assert main(["scaling", "plan", "--flops", "5.76e23", "--tokens-available", "300B"]) == 0
    out = capsys.readouterr().out
    assert "arXiv:2404.10102" in out and "arXiv:2305.16264" in out
    assert "72.2B" in out
    assert main(["scaling", "plan", "--gpu-hours", "10", "--gpu", "zz"]) == 2


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("target", [3e6, 1.2e8, 7e9, 7.2e10])
def test_shapes_hit_the_target(target):
    shapes = pick_shapes(target, 32000)
    assert len(shapes) == 3
    assert len({s.d_model for s in shapes}) == 3
    assert [s.label for s in shapes] == ["deep", "balanced", "wide"]
    for s in shapes:
        assert abs(s.error) <= 0.10
        assert s.d_model % s.n_heads == 0


@pytest.mark.parametrize("base", [ModelConfig(), ModelConfig(tie_embeddings=False, ffn="gelu", n_heads=4, n_kv_heads=2)])
def test_shape_counts_match_the_real_model(base):
    vocab, seq = 500, 64
    s = shape_for(base, 128, 3, vocab, seq_len=seq)
    cfg = base.model_copy(update={"n_layers": 3, "d_model": 128, "n_heads": s.n_heads, "vocab_size": vocab,
                                  "max_seq_len": seq, "n_kv_heads": base.n_kv_heads and s.n_heads // 2})
    model = build_model(cfg)
    assert s.non_embedding_params == model.num_params(exclude_embeddings=True)
    assert s.total_params == model.num_params()
    assert s.flops_per_token == pytest.approx(model.flops_per_token(seq))


def test_too_small_target_is_a_user_error():
    with pytest.raises(UserError, match="raise the budget"):
        pick_shapes(1000, 32000)


# ---------------------------------------------------------------- fitting


def _synthetic(law, n_runs=40, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    n = 10 ** rng.uniform(7, 10, n_runs)
    d = 10 ** rng.uniform(8, 11, n_runs)
    loss = np.array([law.loss(a, b) for a, b in zip(n, d)]) * np.exp(rng.normal(0, noise, n_runs))
    return n, d, loss


def test_fit_recovers_known_coefficients_without_noise():
    truth = laws.BESIROGLU_2024
    f = fit_law(*_synthetic(truth), bootstrap=0)
    got = f.law
    assert got.E == pytest.approx(truth.E, rel=1e-3)
    assert got.alpha == pytest.approx(truth.alpha, abs=2e-3)
    assert got.beta == pytest.approx(truth.beta, abs=2e-3)
    assert got.A == pytest.approx(truth.A, rel=0.02)
    assert got.B == pytest.approx(truth.B, rel=0.02)


def test_fit_with_noise_recovers_within_tolerance_and_reports_uncertainty():
    truth = laws.HOFFMANN_2022
    f = fit_law(*_synthetic(truth, n_runs=40, noise=0.005, seed=1), bootstrap=6, seed=0)
    assert f.law.E == pytest.approx(truth.E, abs=0.06)
    assert f.law.alpha == pytest.approx(truth.alpha, abs=0.04)
    assert f.law.beta == pytest.approx(truth.beta, abs=0.04)
    assert f.law.a == pytest.approx(truth.a, abs=0.04)
    for name in ("E", "A", "B", "alpha", "beta", "a"):
        iv = f.intervals[name]
        assert iv.std > 0 and iv.low <= iv.high
    assert f.intervals["alpha"].std < 0.05


def test_fit_needs_five_runs():
    with pytest.raises(UserError, match="at least 5"):
        fit_law([1e6] * 4, [1e8] * 4, [3.0] * 4)


def _isoflop_points(law, budgets, sizes=7, spread=4.0):
    points = []
    for c in budgets:
        n_opt, _ = law.optimal(c)
        for k in np.linspace(-1, 1, sizes):
            n = n_opt * spread**k
            points.append(RunPoint(n, c / (6 * n), law.loss(n, c / (6 * n))))
    return points


def test_isoflop_parabolas_recover_the_allocation_exponent():
    truth = laws.BESIROGLU_2024
    budgets = [1e18, 1e19, 1e20, 1e21]
    fit = isoflop_fit(_isoflop_points(truth, budgets))
    assert len(fit.groups) == 4
    for g, c in zip(fit.groups, budgets):
        assert g.compute == pytest.approx(c, rel=1e-6)
        assert g.n_opt == pytest.approx(truth.optimal(c)[0], rel=0.10)  # approach 2's parabola bias is small here
    assert fit.a == pytest.approx(truth.a, abs=0.02)
    assert fit.a_se is not None and fit.a_se < 0.02


def test_group_by_compute():
    pts = [RunPoint(1, 1e6 / 6, 1.0), RunPoint(2, 1.1e6 / 12, 1.0), RunPoint(1, 1e7 / 6, 1.0)]
    assert [len(g) for g in group_by_compute(pts)] == [2, 1]


def test_fit_plot_is_a_png(tmp_path):
    from scratchlab.scaling.plot import plot_fit

    truth = laws.BESIROGLU_2024
    points = _isoflop_points(truth, [1e18, 1e19], sizes=5)
    f = fit_law([p.n for p in points], [p.d for p in points], [p.loss for p in points], bootstrap=0)
    out = plot_fit(points, f, isoflop_fit(points), tmp_path / "fit.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- real run dirs and the IsoFLOP sweep


def test_fit_reads_real_tiny_runs(data_dir, tmp_path, capsys):
    a = run_tiny(data_dir, tmp_path / "runs").run_dir
    b = run_tiny(data_dir, tmp_path / "runs", model__d_model=64, train__max_steps=6).run_dir
    crashed = tmp_path / "runs" / "crashed-copy"
    shutil.copytree(a, crashed)
    status = json.loads((crashed / "status.json").read_text())
    (crashed / "status.json").write_text(json.dumps({**status, "status": "crashed"}))

    points, skipped = collect_runs(root=tmp_path / "runs")
    assert [s[0] for s in skipped] == [str(crashed)] and "crashed" in skipped[0][1]
    by_dir = {p.run_dir: p for p in points}
    for run_dir, d_model, steps in ((a, 32, 8), (b, 64, 6)):
        p = by_dir[str(run_dir)]
        cfg = load_config(str(run_dir / "config.yaml"))
        assert cfg.model.d_model == d_model
        with torch.device("meta"):
            assert p.n == build_model(cfg.model).num_params(exclude_embeddings=True)
        assert p.d == steps * 4 * 32  # steps x batch x seq_len
        assert p.loss == pytest.approx(json.loads((run_dir / "status.json").read_text())["val_loss"])

    assert main(["scaling", "fit", str(a), str(b), "--json", "--no-plot"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 2 and "at least 5" in out["law_error"]
    assert main(["scaling", "fit", "--root", str(tmp_path / "nowhere")]) == 2


def test_isoflop_sweep_writes_loadable_configs_sized_for_each_budget(tmp_path, data_dir):
    base = [f"data.path={data_dir}", "train.batch_size=4", "train.seq_len=32", "model.max_seq_len=64"]
    budgets = [1e13, 3e13]
    written = isoflop_sweep(budgets, tmp_path / "sweep", overrides=base, sizes=4, spread=3.0)
    assert {r.compute for r in written} == set(budgets)
    for r in written:
        cfg = load_config(str(r.path))  # a complete config, loadable as is
        with torch.device("meta"):
            n = build_model(cfg.model.model_copy(update={"vocab_size": 400})).num_params(exclude_embeddings=True)
        assert n == r.shape.non_embedding_params
        tokens = cfg.train.max_steps * cfg.train.batch_size * cfg.train.seq_len
        assert 6 * n * tokens == pytest.approx(r.compute, rel=0.05)
        assert cfg.optim.warmup_steps <= cfg.train.max_steps // 5
    for c in budgets:
        sizes = [r.shape.non_embedding_params for r in written if r.compute == c]
        assert len(sizes) >= 3 and sizes == sorted(sizes) and sizes[-1] > 3 * sizes[0]
    assert main(["scaling", "sweep", "--flops", "1e13", "--out", str(tmp_path / "cli"), *base]) == 0
    assert len(list((tmp_path / "cli").glob("*.yaml"))) >= 3
