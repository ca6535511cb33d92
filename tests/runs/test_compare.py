"""`scratchlab compare`: strict A/B check, matched metrics, what is missing, plots; on real tiny runs."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_pinned
from scratchlab.cli import main
from scratchlab.errors import UserError
from scratchlab.runs import read_metrics
from scratchlab.runs.compare import compare_runs, write_comparison


def _vals(run, key="val_loss"):
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def more_runs(tmp_path_factory, data_dir):
    """Runs that differ from `b` (lr 1e-3) in more than one way, or in length / batch size."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "seed": run_pinned(data_dir, tmp_path_factory.mktemp("seed"), optim__lr=1e-3, train__seed=7),
            "short": run_pinned(data_dir, tmp_path_factory.mktemp("short"), optim__lr=3e-3, train__max_steps=4),
            "batch8": run_pinned(data_dir, tmp_path_factory.mktemp("batch8"), optim__lr=3e-3, train__batch_size=8),
        }
    finally:
        torch.set_num_threads(threads)


def _copy_with_env(run, dest, **git):
    """A copy of a run whose env.json records other git facts (as a run made from another checkout would)."""
    shutil.copytree(run, dest)
    env = json.loads((dest / "env.json").read_text())
    env["git"] = {**env["git"], **git}
    (dest / "env.json").write_text(json.dumps(env))
    return dest


def test_strict_ab_when_only_the_lr_differs(record_runs):
    a, b = record_runs["a"], record_runs["b"]
    c = compare_runs([a, b])
    assert c.strict and c.settings == ["optim.lr"] and c.confounds == []
    # Every differing key is listed; the output dirs differ too, but cannot change what a run learns.
    assert [(k, kind, vals) for k, kind, vals in c.diff] == [
        ("optim.lr", "setting", [3e-3, 1e-3]), ("train.out_dir", "bookkeeping", [str(a.parent), str(b.parent)])]
    assert c.labels == ["optim.lr=0.003", "optim.lr=0.001"]
    va, vb = _vals(a), _vals(b)
    assert [(s, vals) for s, _, vals in c.at_steps] == [(s, [va[s], vb[s]]) for s in sorted(va)]
    assert c.at_steps[-1][1] == [8 * 128, 8 * 128]  # tokens at the matched step
    assert c.final == [(8, va[8]), (8, vb[8])]
    assert c.best == [min(((s, v) for s, v in va.items()), key=lambda x: x[1]),
                      min(((s, v) for s, v in vb.items()), key=lambda x: x[1])]
    assert c.winner == (0 if va[8] < vb[8] else 1) and c.last_shared_step == 8
    assert c.tokens_per_s == [json.loads((r / "status.json").read_text())["tokens_per_s"] for r in (a, b)]
    assert c.missing == []

    md = c.markdown()
    assert "Strict A/B: yes" in md and "exactly one setting, `optim.lr`" in md
    assert "| setting | final val loss | best val loss | step of best | tokens/s | notes |" in md
    winner_row = next(line for line in md.splitlines() if line.startswith(f"| **{c.labels[c.winner]}** |"))
    assert f"| {c.final[c.winner][1]:.4f} |" in winner_row
    assert f"{vb[8] - va[8]:+.4f}" in md  # B minus A at the last shared step


def test_seed_and_lr_differ_is_not_strict_and_names_the_confound(record_runs, more_runs):
    c = compare_runs([record_runs["a"], more_runs["seed"]])
    assert not c.strict and c.settings == ["optim.lr"]
    assert len(c.confounds) == 1 and c.confounds[0].startswith("seed differs") and "7" in c.confounds[0]
    assert ("train.seed", "seed", [1337, 7]) in c.diff
    assert "Strict A/B: no" in c.markdown() and "seed differs" in c.markdown()
    only_seed = compare_runs([record_runs["b"], more_runs["seed"]])
    assert not only_seed.strict and only_seed.settings == [] and "differ only in the seed" in only_seed.verdict


def test_code_and_environment_confounds(record_runs, tmp_path):
    a, b = record_runs["a"], record_runs["b"]
    other = compare_runs([a, _copy_with_env(b, tmp_path / "other", commit="f" * 40)])
    assert not other.strict and any(x.startswith("code commit differs") for x in other.confounds)

    nogit = compare_runs([_copy_with_env(a, tmp_path / "n1", commit=None), _copy_with_env(b, tmp_path / "n2", commit=None)])
    assert not nogit.strict and nogit.confounds == [
        "code commit not recorded (n1, n2: not run from a git checkout), so the code is not pinned"]

    dirty1 = _copy_with_env(a, tmp_path / "d1", dirty=True, diff_sha256="1" * 64)
    dirty2 = _copy_with_env(b, tmp_path / "d2", dirty=True, diff_sha256="2" * 64)
    c = compare_runs([dirty1, dirty2])
    assert [x for x in c.confounds if "dirty" in x] == ["working tree dirty (d1, d2): the uncommitted changes differ"]
    same = _copy_with_env(b, tmp_path / "d3", dirty=True, diff_sha256="1" * 64)
    assert compare_runs([dirty1, same]).strict  # same commit, same uncommitted changes: the code is pinned
    unknown = _copy_with_env(b, tmp_path / "d4", dirty=True, diff_sha256=None)
    assert "not pinned" in " ".join(compare_runs([dirty1, unknown]).confounds)

    torch2 = _copy_with_env(b, tmp_path / "t2")
    env = json.loads((torch2 / "env.json").read_text())
    (torch2 / "env.json").write_text(json.dumps({**env, "torch": "9.9.9", "device": "cuda (bf16)"}))
    confounds = compare_runs([a, torch2]).confounds
    assert any(x.startswith("torch differs") for x in confounds)
    assert any(x.startswith("device/precision differs") and "cuda (bf16)" in x for x in confounds)


def test_data_hash_and_data_path(record_runs, tmp_path):
    a, b = record_runs["a"], record_runs["b"]
    moved = shutil.copytree(b, tmp_path / "moved")  # same data, another path: not a setting, not a confound
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace("  path: ", "  path: /elsewhere", 1))
    c = compare_runs([a, moved])
    assert c.strict and ("data.path", "data path (same data)") in [(k, kind) for k, kind, _ in c.diff]

    other = shutil.copytree(b, tmp_path / "otherdata")
    data = json.loads((other / "data.json").read_text())
    (other / "data.json").write_text(json.dumps({**data, "content_sha256": "0" * 64}))
    c = compare_runs([a, other])
    assert not c.strict and any(x.startswith("data differs") for x in c.confounds)


def test_different_lengths_compare_on_what_they_share(record_runs, more_runs):
    a, short = record_runs["a"], more_runs["short"]
    c = compare_runs([a, short])
    assert c.settings == ["train.max_steps"] and c.strict  # the schedule length is a real setting
    assert [s for s, _, _ in c.at_steps] == [4] and c.last_shared_step == 4
    assert c.final[0][0] == 8 and c.final[1][0] == 4
    assert any("different steps (8, 4)" in m and "stop at step 4" in m for m in c.missing)


def test_crashed_run_is_compared_up_to_its_crash(record_runs):
    c = compare_runs([record_runs["a"], record_runs["crashed"]], metric="loss")
    assert c.settings == [] and c.last_shared_step == 4  # the crashed run trained 4 steps before its eval died
    assert any("is crashed at step 4 of 8" in m and "simulated crash" in m for m in c.missing)
    la, lc = _vals(record_runs["a"], "loss"), _vals(record_runs["crashed"], "loss")
    assert [vals for _, _, vals in c.at_steps] == [[la[s], lc[s]] for s in (1, 2, 3, 4)]
    val = compare_runs([record_runs["a"], record_runs["crashed"]])
    assert val.best[1] is None and val.winner is None
    assert any("has no `val_loss` values" in m for m in val.missing)
    assert any(m.startswith("`val_bpb`: missing in") for m in val.missing)


def test_matched_tokens_when_batch_sizes_differ(record_runs, more_runs):
    a, b8 = record_runs["a"], more_runs["batch8"]
    c = compare_runs([a, b8])
    assert not c.same_tokens_per_step and c.settings == ["train.batch_size"]
    va, v8 = _vals(a), _vals(b8)
    # a: 128 tokens/step, evals at steps 4, 8 -> 512, 1024 tokens; batch8: 256/step -> 1024, 2048.
    assert c.at_tokens == [(1024, [va[8], v8[4]], [False, False])]
    assert "at matched tokens" in c.markdown()


def test_write_comparison_plots_and_html(record_runs, tmp_path):
    c = compare_runs([record_runs["a"], record_runs["b"]])
    out = write_comparison(c, tmp_path / "cmp")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["loss.png", "val_loss.png", "val_bpb.png", "grad_norm.png", "clip_ratio.png", "lr.png"])
    for name in pngs:
        img = np.asarray(Image.open(out / name).convert("RGB"))
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert (img.min(axis=2) < 200).mean() > 0.02  # axes, ticks and lines, not a blank canvas
    # Both runs are drawn: matplotlib's first two colours (tab:blue, tab:orange) are in the overlay.
    loss = np.asarray(Image.open(out / "loss.png").convert("RGB")).reshape(-1, 3).astype(int)
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(loss - rgb).sum(axis=1) < 30).sum() > 50
    md = (out / "compare.md").read_text()
    assert md.startswith(c.markdown()) and all(f"]({p})" in md for p in pngs)
    html = (out / "compare.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1]))).verify()
    assert "<table>" in html and "Strict A/B: yes" in html


def test_per_codebook_losses_are_plotted(record_runs, tmp_path):
    runs = []
    for key in ("a", "b"):
        run = shutil.copytree(record_runs[key], tmp_path / key)
        rows = read_metrics(run / "metrics.jsonl")
        for r in rows:  # what a codec run logs: one loss per codebook
            if "loss" in r:
                r.update({f"loss_cb{k}": r["loss"] + k for k in range(3)})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    out = write_comparison(compare_runs(runs), tmp_path / "cmp")
    img = Image.open(out / "loss_cb.png")
    assert img.size[0] > 600  # three panels side by side
    assert "![loss_cb](loss_cb.png)" in (out / "compare.md").read_text()


def test_bad_input(record_runs):
    with pytest.raises(UserError, match="at least two"):
        compare_runs([record_runs["a"]])
    with pytest.raises(UserError, match="same run dir twice"):
        compare_runs([record_runs["a"], record_runs["a"]])
    with pytest.raises(UserError, match="no run has metric 'val_los'.*val_loss"):
        compare_runs([record_runs["a"], record_runs["b"]], metric="val_los")


def test_cli_compare(record_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(record_runs["a"]), str(record_runs["b"]), "--metric", "loss"]) == 0
    out = capsys.readouterr().out
    assert "Strict A/B: yes" in out and "| setting | final loss | best loss |" in out
    assert not list(tmp_path.iterdir())  # without --out nothing is written
    assert main(["compare", str(record_runs["a"])]) == 2
    assert "at least two" in capsys.readouterr().err
