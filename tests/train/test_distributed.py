"""Data-parallel training: 2 CPU ranks (gloo) under torchrun against one process with the same global batch.

The slow tests launch real `torchrun --nproc_per_node 2 -m scratchlab train ...` runs of the tiny
model (about 10 s each on 2 cores) and compare metrics.jsonl step by step with a single-process run.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_tiny, tiny_overrides
from safetensors import safe_open
from safetensors.torch import save_model

from scratchlab.cli import main
from scratchlab.config import load_config
from scratchlab.errors import UserError
from scratchlab.families.registry import build_model
from scratchlab.runs.metrics import read_metrics
from scratchlab.runs.checkpoint import save_weights
from scratchlab.train.distributed import (
    DistContext,
    init_distributed,
    rank_rows,
    rank_slice,
    resolve_parallel,
    tied_parameters,
)

# fp32 on the same CPU: the only differences are the order of sums in the gradient all-reduce
# (measured: up to ~2e-7 relative); anything structural (wrong rows, unaveraged gradients, a rank's
# batch counted twice) is off by 1e-3 or more from the first step.
RTOL = 1e-5


# ---------------------------------------------------------------- fast: the pieces


def test_each_rank_keeps_its_own_contiguous_block_of_the_global_batch():
    batch = {"input_ids": torch.arange(24).view(6, 4), "labels": torch.arange(24).view(6, 4) + 100}
    parts = [rank_slice(batch, DistContext(rank=r, world_size=3, parallel="ddp")) for r in range(3)]
    assert [p["input_ids"][:, 0].tolist() for p in parts] == [[0, 4], [8, 12], [16, 20]]
    for key in batch:  # together the ranks see every row exactly once, in order
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    assert rank_slice(batch, DistContext()) is batch


def _family_tasks(data_dir, tmp_path):
    import test_host_syncs as configs

    from scratchlab.families.registry import build_task

    return [build_task(make(data_dir, tmp_path))[1] for make in
            (configs.lm_config, configs.codec_config, configs.cascade_config)]


def test_a_rank_builds_only_its_rows_and_the_data_position_of_the_whole_batch(data_dir, tmp_path, monkeypatch):
    """Each family: rows r of 2 equal the rows of the whole batch, the generator ends where the whole batch
    leaves it, and only this rank's windows are cut (counted where each family gathers its tokens)."""
    import scratchlab.families.cascade.data as cascade_data
    import scratchlab.families.codec.data as codec_data
    import scratchlab.families.lm.task as lm_task

    cut = []
    real_windows, real_codes = lm_task.make_windows, codec_data.codes_windows
    monkeypatch.setattr(lm_task, "make_windows", lambda tokens, starts, *a: cut.extend([1] * len(starts)) or
                        real_windows(tokens, starts, *a))
    monkeypatch.setattr(codec_data, "codes_windows", lambda clips, *a, **k: cut.extend([1] * len(clips)) or
                        real_codes(clips, *a, **k))
    real_stack = cascade_data.np.stack
    monkeypatch.setattr(cascade_data.np, "stack", lambda arrays, *a, **k: cut.extend([1] * len(arrays)) or
                        real_stack(arrays, *a, **k))
    for task in _family_tasks(data_dir, tmp_path):
        whole_gen = torch.Generator().manual_seed(5)
        whole = task.train_batch(4, whole_gen)
        for rank in range(2):
            rows = rank_rows(4, DistContext(rank=rank, world_size=2, parallel="ddp"))
            assert rows == slice(2 * rank, 2 * rank + 2)
            gen = torch.Generator().manual_seed(5)
            cut.clear()
            part = task.train_batch(4, gen, rows=rows)
            assert torch.equal(gen.get_state(), whole_gen.get_state()), task.family
            assert part.keys() == whole.keys()
            for key in whole:
                if key == "cond_ids":  # padded to the longest condition of the rows built
                    width = part[key].shape[1]
                    assert torch.equal(part[key], whole[key][rows, :width]), task.family
                elif key == "cond_mask":
                    assert torch.equal(part[key], whole[key][rows, : part[key].shape[1]]), task.family
                else:
                    assert torch.equal(part[key], whole[key][rows]), (task.family, key)
            assert len(cut) == 2, (task.family, len(cut))  # windows cut: this rank's 2 rows, not the batch's 4
    assert rank_rows(4, DistContext()) is None


def test_parallel_setting_resolution():
    assert resolve_parallel("ddp", 1) == "none"  # one process: plain training whatever the setting
    assert resolve_parallel("auto", 4) == "ddp"
    assert resolve_parallel("fsdp", 2) == "fsdp"
    with pytest.raises(UserError, match="train.parallel=none"):
        resolve_parallel("none", 2)


def test_launch_errors_are_one_line_before_any_process_group(monkeypatch, data_dir, tmp_path, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"train.batch_size \(3\).*divisible by the world size \(2\)"):
        init_distributed("ddp", 3, torch.device("cpu"))
    code = main(["train", "tiny-lm", *tiny_overrides(data_dir, tmp_path)])  # parallel left at none
    err = capsys.readouterr().err.strip()
    assert code == 2 and "WORLD_SIZE=2 but train.parallel=none" in err and len(err.splitlines()) == 1
    assert not torch.distributed.is_initialized() and not any(tmp_path.iterdir())


def test_tied_weights_gathered_as_two_tensors_save_like_save_model(tmp_path):
    cfg = load_config("tiny-lm", ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=50",
                                  "model.max_seq_len=32", "train.seq_len=16"])
    model = build_model(cfg.model)
    tied = tied_parameters(model)
    assert tied == {"tok_emb.weight": "head.weight"}
    save_model(model, str(tmp_path / "module.safetensors"))
    # What FSDP's full state dict gives: every name, tied ones as separate copies.
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    save_weights(gathered, tmp_path / "gathered.safetensors", tied)
    files = [safe_open(str(tmp_path / f"{n}.safetensors"), "pt") for n in ("module", "gathered")]
    assert files[0].metadata() == files[1].metadata() == {"tok_emb.weight": "head.weight"}
    assert sorted(files[0].keys()) == sorted(files[1].keys())
    for key in files[0].keys():
        assert torch.equal(files[0].get_tensor(key), files[1].get_tensor(key))


def test_the_trainer_feeds_each_rank_its_rows_of_every_micro_batch(data_dir, tmp_path, monkeypatch):
    from conftest import quiet

    from scratchlab.families.registry import build_task
    from scratchlab.train.loop import Reporter, Trainer

    cfg = load_config("tiny-lm", tiny_overrides(data_dir, tmp_path, train__grad_accum=2))
    cfg, task = build_task(cfg)
    trainer = Trainer(cfg, None, task, Reporter(quiet(), "lines"))
    trainer.dist = DistContext(rank=1, world_size=2)  # rank 1 of 2, unwrapped (no collective is called)
    reference = torch.Generator().manual_seed(0)
    reference.set_state(trainer.data_gen.get_state())
    expected = [task.train_batch(4, reference)["input_ids"][2:] for _ in range(2)]
    seen = []
    loss = task.loss
    monkeypatch.setattr(task, "loss", lambda model, batch, precision: seen.append(batch["input_ids"]) or
                        loss(model, batch, precision))
    trainer._micro_batches()
    assert len(seen) == 2 and all(torch.equal(s, e) for s, e in zip(seen, expected))
    assert torch.equal(trainer.data_gen.get_state(), reference.get_state())  # the data position: the global one


def test_parallel_without_torchrun_trains_in_one_process(data_dir, tmp_path):
    # A run configured for DDP resumes (or starts) in one process when not launched by torchrun.
    plain = run_tiny(data_dir, tmp_path / "plain", train__max_steps=3)
    ddp = run_tiny(data_dir, tmp_path / "ddp", train__max_steps=3, train__parallel="ddp")
    assert losses(ddp.run_dir) == losses(plain.run_dir)


# ---------------------------------------------------------------- slow: real torchrun runs


def losses(run_dir: Path, keys=("loss", "grad_norm", "val_loss")) -> list[tuple]:
    return [(r["step"], k, r[k]) for r in read_metrics(run_dir / "metrics.jsonl") for k in keys if k in r]


def assert_same_sequence(run_dir: Path, reference: Path, keys=("loss", "grad_norm", "val_loss")) -> None:
    got, want = losses(run_dir, keys), losses(reference, keys)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    bad = [(g, w) for g, w in zip(got, want) if not math.isclose(g[2], w[2], rel_tol=RTOL)]
    assert not bad, f"{len(bad)} values differ, first: {bad[0]}"


def torchrun(out_dir: Path, *extra: str, data_dir: Path | None = None, resume: Path | None = None) -> Path:
    """`torchrun --nproc_per_node 2 -m scratchlab train ...` on 2 CPU ranks; the run dir it wrote."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scratchlab", "train"]
    if resume is not None:
        cmd += ["--resume", str(resume), *extra]
    else:
        cmd += ["tiny-lm", *tiny_overrides(data_dir, out_dir, train__threads=1), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if resume is not None:
        return resume
    runs = list(out_dir.iterdir())
    assert len(runs) == 1, f"rank 0 alone creates the run dir, found {runs}"
    return runs[0]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def resumable_copy(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished 8-step run with its last checkpoint removed: a resume redoes steps 5-8."""
    copy = dest / run_dir.name
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000008")
    return copy


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    """The same 8-step tiny run: one process (global batch 4), DDP and FSDP over 2 ranks (2 rows each).

    Two micro-batches per step, so the gradient-sync skipping of grad accumulation is covered too.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_tiny(data_dir, tmp_path_factory.mktemp("single"), train__grad_accum=2).run_dir
    finally:
        torch.set_num_threads(threads)
    ddp = torchrun(tmp_path_factory.mktemp("ddp"), "train.parallel=ddp", "train.grad_accum=2", data_dir=data_dir)
    # FSDP with activation checkpointing: recomputing sharded blocks must not change a number either.
    fsdp = torchrun(tmp_path_factory.mktemp("fsdp"), "train.parallel=fsdp", "train.activation_checkpointing=true",
                    "train.grad_accum=2", data_dir=data_dir)
    return {"single": single, "ddp": ddp, "fsdp": fsdp}


def trainer_state(run_dir: Path, step: int = 8) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "trainer.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, mode):
    run, single = runs[mode], runs["single"]
    assert_same_sequence(run, single)
    if mode == "fsdp":  # the update/weight ratio is summed over shards, not one rank's half
        assert_same_sequence(run, single, keys=("update_ratio", "update_ratio_vectors"))
    assert len(losses(run, ("loss",))) == 8
    # Rank 0 alone wrote the record: each step logged once, one status, one set of demos.
    log = (run / "train.log").read_text()
    assert log.count("step 8 ") == 1 and log.count("run dir:") == 1
    assert f"{mode} over 2 ranks: global batch 4 = 2 x 2" in log
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in (run / "demos").iterdir()) == ["step_000004.txt", "step_000008.txt"]
    assert "2 ranks" in json.loads((run / "env.json").read_text())["device"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_checkpoints_keep_the_single_process_format(runs, mode):
    ckpt, ref = runs[mode] / "checkpoints" / "step_000008", runs["single"] / "checkpoints" / "step_000008"
    got, want = (safe_open(str(c / "model.safetensors"), "pt") for c in (ckpt, ref))
    assert sorted(got.keys()) == sorted(want.keys()) and got.metadata() == want.metadata()
    for key in want.keys():  # Adam divides by sqrt(v): a 1e-7 gradient difference can move a weight by ~1e-5
        torch.testing.assert_close(got.get_tensor(key), want.get_tensor(key), rtol=1e-3, atol=5e-5)
    opt, opt_ref = trainer_state(runs[mode])["optimizer"], trainer_state(runs["single"])["optimizer"]
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in opt_ref["param_groups"]]
    assert sorted(opt["state"]) == sorted(opt_ref["state"])
    for i, state in opt_ref["state"].items():  # AdamW moments, parameter by parameter
        for name, value in state.items():
            torch.testing.assert_close(opt["state"][i][name], value, rtol=1e-3, atol=1e-8)
    assert torch.equal(trainer_state(runs[mode])["rng"]["data"], trainer_state(runs["single"])["rng"]["data"])


@pytest.mark.slow
def test_resume_under_torchrun_and_with_a_different_world_size(runs, tmp_path):
    from conftest import quiet

    from scratchlab.train import train

    # 2 ranks -> 2 ranks (DDP, under torchrun)
    ddp = torchrun(tmp_path, resume=resumable_copy(runs["ddp"], tmp_path / "a"))
    assert_same_sequence(ddp, runs["single"])
    assert (ddp / "env_resume_step_000004.json").is_file()
    # 2 ranks (FSDP) -> 1 process: train.parallel=fsdp in its config is ignored without torchrun
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(resume=resumable_copy(runs["fsdp"], tmp_path / "b"), console=quiet()).run_dir
    finally:
        torch.set_num_threads(threads)
    assert_same_sequence(one, runs["single"])
    # 1 process -> 2 ranks with FSDP: the single-process optimizer state is scattered onto the shards
    fsdp = torchrun(tmp_path, "train.parallel=fsdp", resume=resumable_copy(runs["single"], tmp_path / "c"))
    assert_same_sequence(fsdp, runs["single"])
