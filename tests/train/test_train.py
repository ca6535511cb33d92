"""The trainer: run dir contract, bit-exact resume, no NaN checkpoints, atomic saves, demos."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import copy_cut_after, quiet, run_tiny, tiny_overrides
from safetensors.torch import load_file

import scratchlab.runs.checkpoint as checkpoint_mod
import scratchlab.families.lm.task as lm_task
import scratchlab.train.loop as loop
from scratchlab.cli import main
from scratchlab.config import ClipConfig, OptimConfig, load_config
from scratchlab.data.text import open_text_data
from scratchlab.doctor import read_findings
from scratchlab.families.registry import build_task
from scratchlab.families.lm.model import TransformerLM
from scratchlab.runs.metrics import read_metrics
from scratchlab.runs.load import load_run
from scratchlab.train import train
from scratchlab.runs.checkpoint import latest_checkpoint, step_checkpoints
from scratchlab.train.optim import clip_threshold_at, lr_at

TRAIN_KEYS = {"step", "tokens", "loss", "lr", "grad_norm", "clip_threshold", "clipped", "clip_ratio", "tokens_per_s"}


def param_names(run) -> set[str]:
    return {name for name, _ in load_run(run, checkpoint="step_000004").model.named_parameters()}




def losses(run_dir, key="loss"):
    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def test_run_dir_and_metrics_contract(data_dir, tmp_path):
    result = run_tiny(data_dir, tmp_path)
    run = result.run_dir
    assert result.status == "finished" and result.step == 8
    for name in ("config.yaml", "env.json", "metrics.jsonl", "train.log", "tokenizer.json", "status.json", "data.json",
                 "data_step0.txt"):
        assert (run / name).is_file(), name
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(TRAIN_KEYS <= r.keys() for r in train_rows)
    assert [r["tokens"] for r in train_rows] == [s * 4 * 32 for s in range(1, 9)]
    assert [r["step"] for r in eval_rows] == [4, 8]
    assert all(math.isfinite(r["val_loss"]) and 0 < r["val_bpb"] < 20 for r in eval_rows)
    assert result.val_loss == eval_rows[-1]["val_loss"]
    # Model internals for the doctor: update/weight ratio per param group, output entropy and logit size.
    assert all(0 < r["update_ratio"] < 1 and 0 < r["update_ratio_vectors"] < 1 for r in train_rows)
    vocab = open_text_data(data_dir).vocab_size
    assert all(0 < r["val_entropy"] < math.log(vocab) and 0 < r["val_logit_max"] < 100 for r in eval_rows)
    assert all(0 < r["val_attn_logit_max"] < 100 for r in eval_rows)
    # Schedules recorded as configured: warmup to 3e-3 over 2 steps, then cosine.
    assert train_rows[0]["lr"] == pytest.approx(1.5e-3) and train_rows[1]["lr"] == pytest.approx(3e-3)
    # keep_last=2 step checkpoints + best
    assert [p.name for p in step_checkpoints(run / "checkpoints")] == ["step_000004", "step_000008"]
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "demos").iterdir()) == ["step_000004.txt", "step_000008.txt"]
    demo = (run / "demos" / "step_000008.txt").read_text()
    assert demo.count("temperature=") == 3 and "prompt='def '" in demo
    step0 = (run / "data_step0.txt").read_text()
    assert "32/32 targets in the loss" in step0 and "--- target text" in step0
    env = json.loads((run / "env.json").read_text())
    assert {"python", "torch", "platform", "device", "pip_freeze", "git"} <= env.keys()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 8
    assert load_config(run / "config.yaml").model.vocab_size == open_text_data(data_dir).vocab_size


def test_resume_is_bit_exact(data_dir, tmp_path):
    straight = run_tiny(data_dir, tmp_path / "a", train__max_steps=12, train__keep_last=3).run_dir
    # Simulate a run killed after its step-4 checkpoint: drop the later checkpoints.
    cut = copy_cut_after(straight, tmp_path / "cut", "step_000004")
    assert latest_checkpoint(cut / "checkpoints").name == "step_000004"
    resumed = train(resume=cut, console=quiet())
    assert resumed.step == 12
    assert losses(cut) == losses(straight)  # every train loss, bit for bit
    assert losses(cut, "val_loss") == losses(straight, "val_loss")
    assert [r["grad_norm"] for r in read_metrics(cut / "metrics.jsonl") if "loss" in r] == [
        r["grad_norm"] for r in read_metrics(straight / "metrics.jsonl") if "loss" in r
    ]
    a = load_file(straight / "checkpoints" / "step_000012" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step_000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_can_extend_a_finished_run(data_dir, tmp_path):
    run = run_tiny(data_dir, tmp_path).run_dir
    result = train(resume=run, overrides=["train.max_steps=10"], console=quiet())
    assert result.step == 10
    assert [s for s, _ in losses(run)] == list(range(1, 11))


def test_nonfinite_loss_is_never_checkpointed(data_dir, tmp_path, monkeypatch):
    real_loss, real_step = lm_task.token_loss, loop.Trainer.train_step
    taking = {"step": None}  # the 0-based index of the optimizer step under way (None: preflight, before step 0)

    def tracked(self, metrics):
        taking["step"] = self.step
        return real_step(self, metrics)

    def poisoned(logits, labels, reduction="mean"):
        loss = real_loss(logits, labels, reduction)
        # Steps 1-5 train normally (preflight, which also calls the family loss, is never poisoned); 6-8 are NaN.
        return loss * float("nan") if (taking["step"] or 0) >= 5 and reduction == "mean" else loss

    monkeypatch.setattr(loop.Trainer, "train_step", tracked)
    monkeypatch.setattr(lm_task, "token_loss", poisoned)
    with pytest.raises(loop.TrainingDiverged, match="non-finite"):
        run_tiny(data_dir, tmp_path, train__save_every=2, eval__every=100)
    run = next(tmp_path.iterdir())
    assert json.loads((run / "status.json").read_text())["status"] == "crashed"
    # Steps 6-8 were non-finite and skipped: the last checkpoint is step 4 and its weights are finite.
    assert [p.name for p in step_checkpoints(run / "checkpoints")] == ["step_000002", "step_000004"]
    weights = load_file(run / "checkpoints" / "step_000004" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    flagged = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("nonfinite")]
    assert flagged == [6, 7, 8]
    first, finding = read_findings(run / "findings.jsonl")  # the monitor's, at the first bad step; the stop's
    assert (first.code, first.step) == ("nonfinite", 6)
    assert finding.code == "nonfinite" and finding.severity == "error" and finding.step == 8
    blamed = finding.evidence["parameters"]
    assert len(blamed) == 5 and not blamed[0]["finite"] and blamed[0]["name"] in param_names(run)


def test_nonfinite_weights_refused_and_previous_checkpoint_kept(data_dir, tmp_path):
    run = run_tiny(data_dir, tmp_path).run_dir
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(checkpoint_mod.NonFiniteModelError, match="weight"):
        checkpoint_mod.save_checkpoint(run / "checkpoints", "step_000009", model, None, None, {})
    assert latest_checkpoint(run / "checkpoints").name == "step_000008"


def test_killed_save_leaves_previous_checkpoint_usable(data_dir, tmp_path, monkeypatch):
    run = run_tiny(data_dir, tmp_path).run_dir

    def dies_midway(model, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # as if killed while writing

    monkeypatch.setattr(checkpoint_mod, "save_model", dies_midway)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_mod.save_checkpoint(run / "checkpoints", "step_000010", model, None, None, {"step": 10})
    monkeypatch.undo()
    assert latest_checkpoint(run / "checkpoints").name == "step_000008"
    result = train(resume=run, overrides=["train.max_steps=9"], console=quiet())
    assert result.step == 9
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the torn save was cleaned up


def test_demo_failure_never_stops_training(data_dir, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("demo exploded")

    monkeypatch.setattr(lm_task, "generate_batch", broken)
    result = run_tiny(data_dir, tmp_path)
    assert result.status == "finished" and result.step == 8
    assert "demo exploded" in (result.run_dir / "train.log").read_text()


def test_clipping_is_logged(data_dir, tmp_path):
    run = run_tiny(data_dir, tmp_path, train__clip__max_norm=1e-6).run_dir
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert all(r["clipped"] and r["clip_ratio"] == 1.0 for r in rows)
    run = run_tiny(data_dir, tmp_path / "off", train__clip__max_norm=0).run_dir
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert all(r["clip_threshold"] is None and not r["clipped"] and r["clip_ratio"] == 0 for r in rows)


def test_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_frac=0.1, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    wsd = cfg.model_copy(update={"schedule": "wsd", "decay_frac": 0.5})
    assert lr_at(30, wsd, 110) == 1.0 and lr_at(109, wsd, 110) == pytest.approx(0.1)
    assert lr_at(82, wsd, 110) == pytest.approx(1.0 - 0.9 * 28 / 55)
    assert lr_at(500, cfg.model_copy(update={"schedule": "constant"}), 110) == 1.0
    clip = ClipConfig(max_norm=2.0, warmup_steps=100, start_frac=0.1)
    assert [clip_threshold_at(s, clip) for s in (0, 50, 100, 1000)] == pytest.approx([0.2, 1.1, 2.0, 2.0])
    assert clip_threshold_at(5, ClipConfig(max_norm=0)) == math.inf


def test_bits_per_byte_of_a_uniform_model(data_dir):
    data = open_text_data(data_dir)

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, data.vocab_size)

    # The one eval loop with the lm family's figures: 2 fixed batches of 4 windows of 32 tokens.
    cfg = load_config("tiny-lm", [f"data.path={data_dir}", "train.seq_len=32", "eval.batch_size=4", "eval.batches=2"])
    _, task = build_task(cfg)
    row = task.evaluate(Uniform(), torch.device("cpu"), "fp32")
    val_loss, val_bpb = row["val_loss"], row["val_bpb"]
    assert val_loss == pytest.approx(math.log(data.vocab_size))
    assert task.evaluate(Uniform(), torch.device("cpu"), "fp32") == row  # fixed windows: the same every time
    stats = {k: v for k, v in row.items() if k not in ("val_loss", "val_bpb")}
    assert stats == {"val_entropy": pytest.approx(math.log(data.vocab_size)), "val_logit_max": 0.0}
    # bits/byte = (targets that are text) x log2(V) / (their bytes)
    from scratchlab.data.windows import get_batch

    labels = torch.cat([get_batch(data.val, 32, 4, "fixed", batch_index=i, count=8)["labels"] for i in range(2)])
    nbytes = data.token_bytes[labels.numpy()]
    expected = (nbytes > 0).sum() * math.log2(data.vocab_size) / nbytes.sum()
    assert val_bpb == pytest.approx(expected)


def test_cli_train_then_sample(data_dir, tmp_path, capsys):
    assert main(["train", *tiny_overrides(data_dir, tmp_path)]) == 0
    run = next(tmp_path.iterdir())
    capsys.readouterr()
    code = main(["sample", str(run), "--prompt", "def ", "--temperature", "0.8", "--top-k", "50",
                 "--max-new-tokens", "20", "--seed", "0"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("def ") and len(out) > len("def ") + 5
    assert main(["sample", str(run), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    greedy1 = capsys.readouterr().out
    assert main(["sample", str(run), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == greedy1


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", "tiny-lm", "optim.lr=1e-4", "model.bias=true"]) == 0
    shown = capsys.readouterr().out
    assert "lr: 0.0001" in shown and "bias: true" in shown and "n_layers: 4" in shown


def test_monitors_record_findings_while_training(data_dir, tmp_path):
    healthy = run_tiny(data_dir, tmp_path / "ok").run_dir
    assert read_findings(healthy / "findings.jsonl") == []
    run = run_tiny(data_dir, tmp_path / "clip", train__max_steps=110, train__clip__max_norm=1e-6,
                   train__log_every=1, eval__every=1000, demo__every=1000, train__save_every=1000).run_dir
    (saturated,) = read_findings(run / "findings.jsonl")  # once per episode, when a full window is past warmup
    assert (saturated.code, saturated.step) == ("clip_saturated", 102)
    assert saturated.evidence["clip_ratio"] == 1.0 and saturated.evidence["clip_threshold"] == 1e-6
    assert "clip_saturated" in (run / "train.log").read_text()


def test_update_ratio_recorded_for_a_far_too_high_lr(data_dir, tmp_path):
    # lr 0.3 with clipping off: every step moves the matrices by a large fraction of their norm.
    run = run_tiny(data_dir, tmp_path, optim__lr=0.3, train__clip__max_norm=0, train__max_steps=12,
                   eval__every=1000, demo__every=1000, train__save_every=1000).run_dir
    findings = [f for f in read_findings(run / "findings.jsonl") if f.code == "update_ratio"]
    assert len(findings) == 1 and findings[0].step == 5  # warmup 2 steps, then 3 logged rows in a row
    ev = findings[0].evidence
    assert ev["direction"] == "high" and ev["update_ratio"] > 0.1 and ev["lr"] > 0.2


class LeakyLM(TransformerLM):
    """Adds the mean over time to every position: the output at t sees tokens after t."""

    def forward(self, input_ids, cache=None):
        logits = super().forward(input_ids, cache)
        return logits + logits.mean(dim=1, keepdim=True)


def test_preflight_refuses_a_leaky_model_unless_allowed(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "build_model", LeakyLM)
    code = main(["train", *tiny_overrides(data_dir, tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and "preflight found 1 error(s), first: causal_leak" in err and "doctor.allow_errors" in err
    assert not (tmp_path / "refused").exists()  # no run dir for a run that never started
    result = run_tiny(data_dir, tmp_path / "allowed", doctor__allow_errors="true")
    (leak,) = [f for f in read_findings(result.run_dir / "findings.jsonl") if f.code == "causal_leak"]
    assert leak.severity == "error" and leak.evidence
    monkeypatch.undo()
    healthy = run_tiny(data_dir, tmp_path / "healthy", train__max_steps=1).run_dir
    assert not [f for f in read_findings(healthy / "findings.jsonl") if f.severity != "info"]


class ReportingMoE(TransformerLM):
    """A stand-in for an MoE model: reports 2 layers x 4 experts, layer 1 sending 90% of tokens to one expert."""

    def moe_load(self):
        return [torch.tensor([0.25, 0.25, 0.25, 0.25]), torch.tensor([0.9, 0.05, 0.03, 0.02])]


def test_models_that_report_expert_load_are_monitored(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_model", ReportingMoE)
    run = run_tiny(data_dir, tmp_path, train__max_steps=10).run_dir
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert all(r["moe_max_load_ratio"] == pytest.approx(3.6) and r["moe_worst_layer"] == 1 for r in rows)
    (finding,) = [f for f in read_findings(run / "findings.jsonl") if f.code == "moe_imbalance"]
    assert finding.step == 5 and finding.evidence["layer"] == 1  # warmup 2 steps, then 3 rows in a row
