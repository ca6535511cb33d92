"""A run's lifecycle: start a run dir or resume one, hold its lock, train, print the summary.

`train(config)` starts a run; `train(resume=RUN_DIR)` continues one from its latest verified
checkpoint, bit-exactly on CPU. A resume reads and validates everything it needs (config,
checkpoint, metrics) before it changes anything in the run dir. The steps themselves are the
`Trainer`'s (train/loop.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from scratchlab.config import Config, build_config, deep_merge, parse_overrides, read_source, to_yaml
from scratchlab.doctor.findings import write_findings
from scratchlab.errors import UserError, shorten
from scratchlab.families.base import Task
from scratchlab.families.registry import build_task
from scratchlab.fileio import read_json_object
from scratchlab.runs.checkpoint import (
    CORRUPT_SUFFIX,
    corrupt_message,
    latest_verified_checkpoint,
    prune_checkpoints,
    read_state,
    step_checkpoints,
)
from scratchlab.runs.metrics import read_metrics, truncate_after
from scratchlab.runs.sinks import check_sinks
from scratchlab.runs.store import RunDir, RunLock, environment
from scratchlab.runtime import resolve_device
from scratchlab.train.distributed import DistContext, init_distributed, launched_world
from scratchlab.train.loop import Trainer, TrainResult
from scratchlab.train.progress import Reporter

RECORDED_SECTIONS = ("data", "model", "train", "optim")  # always in a run's config.yaml (to_yaml of a Config)


def _print_summary(console: Console, result: TrainResult, demo_text: str | None) -> None:
    table = Table(title=f"run {result.status}", show_header=False)
    for label, value in [
        ("run dir", str(result.run_dir)),
        ("steps", f"{result.step:,}"),
        ("tokens", f"{result.tokens:,}"),
        ("final train loss", f"{result.final_loss:.4f}"),
        ("final val loss", f"{result.val_loss:.4f}" + (" nats/token" if math.isfinite(result.val_bpb) else "")),
        *([("final val bits/byte", f"{result.val_bpb:.4f}")] if math.isfinite(result.val_bpb) else []),
        ("best val loss", f"{result.best_val_loss:.4f}"),
        ("tokens/s (training)", f"{result.tokens_per_s:,.0f}"),
        ("wall time", f"{result.wall_s:.1f} s"),
    ]:
        table.add_row(label, value)
    if demo_text:
        console.print(demo_text, markup=False, highlight=False)
    console.print(table)


@dataclass
class _Resume:
    """What a resume read and validated before it may change anything in the run dir."""

    rows: list[dict] = field(default_factory=list)  # metrics.jsonl, every line checked
    notes: list[str] = field(default_factory=list)  # said once the run's log is open
    corrupt: list[Path] = field(default_factory=list)  # checkpoints newer than the one resumed from, failing checks
    data_change: tuple[str, str] | None = None  # (old, new) data.path, allowed with allow_data_change


def _prepare_resume(run: RunDir, cfg: Config, old_data: object, allow_data_change: bool) -> tuple[Path, _Resume]:
    """Read and validate everything a resume needs; writes nothing. UserError (one line) on anything unusable."""
    info = _Resume()
    if old_data != cfg.data.path:
        if not allow_data_change:
            raise UserError(
                f"resume would change data.path from {shorten(str(old_data), 80)} to {shorten(cfg.data.path, 80)}; "
                "a run trains on one dataset: start a new run, or pass --allow-data-change to continue on the new "
                "data (the run's data.json then records both)"
            )
        info.data_change = (str(old_data), cfg.data.path)

    problems: list[str] = []

    def corrupt(ckpt: Path, problem: tuple[str, str]) -> None:
        info.corrupt.append(ckpt)
        problems.append(corrupt_message(ckpt, problem))
        info.notes.append(f"warning: {problems[-1]}; set aside as {ckpt.name}{CORRUPT_SUFFIX}")

    ckpt = latest_verified_checkpoint(run.checkpoints, corrupt)
    if ckpt is None and problems:
        raise UserError(f"{problems[0]}, and no earlier checkpoint verifies; run {run.path} cannot be resumed: "
                        "start a new run")
    if ckpt is None:
        raise UserError(f"run {run.path} has no checkpoint to resume from; start a new run instead")
    if info.corrupt:
        info.notes.append(f"resuming from {ckpt.name}, the newest checkpoint that verifies")
    recorded = run.recorded_status()
    if recorded.get("status") == "running":  # we hold the lock, so nobody is training it
        info.notes.append(f"run was killed at step {recorded.get('step', '?')} (status.json said running, no process "
                          f"held its lock); resuming from {ckpt.name}")
    read_state(ckpt)  # state.json: a JSON object with a step
    info.rows = read_metrics(run.metrics_file, strict=True)
    return ckpt, info


def _set_aside(ckpt: Path) -> None:
    target = ckpt.with_name(ckpt.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}{CORRUPT_SUFFIX}{n}")
    os.replace(ckpt, target)


def train(
    config: Config | None = None,
    *,
    resume: str | Path | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
    allow_data_change: bool = False,
) -> TrainResult:
    """Train a new run from ``config``, or continue the run dir ``resume`` (with optional overrides).

    The training process holds the run's lock (RUN/.lock) for the whole run: a second writer is
    refused. A resume reads and validates everything (config, checkpoint, metrics) before it changes
    anything in the run dir; ``allow_data_change`` lets it continue on another ``data.path``.
    """
    wall_start = time.time()
    console = console or Console()
    with contextlib.ExitStack() as locks:
        resume_info = None
        if resume is not None:
            run = RunDir.open(resume)
            if (launched_world() or (0, 1, 0))[0] == 0:  # under torchrun rank 0 writes the run, and holds its lock
                locks.enter_context(RunLock(run.path))
            old = read_source(run.config_file)
            missing = [k for k in RECORDED_SECTIONS if not isinstance(old.get(k), dict)]
            if missing:  # a truncated or emptied config.yaml must not resume on defaults without a word
                raise UserError(f"{run.config_file} lacks the section(s) {', '.join(missing)} that every run records "
                                "(truncated or hand-edited?); restore it before resuming")
            raw = deep_merge(old, parse_overrides(overrides or []))
            cfg = build_config(raw)
            old_data = old.get("data", {}).get("path", "stdlib") if isinstance(old.get("data"), dict) else "stdlib"
            ckpt, resume_info = _prepare_resume(run, cfg, old_data, allow_data_change)
        else:
            cfg = config if config is not None else build_config({})
            run, ckpt = None, None

        # Under torchrun: join the process group first; from here on every rank runs the same code,
        # and only rank 0 prints and writes the run dir (docs/distributed.md).
        dist, _ = init_distributed(cfg.train.parallel, cfg.train.batch_size, resolve_device(cfg.train.device))
        try:
            return _train(cfg, run, ckpt, console if dist.is_main else quiet_console(), dist, wall_start,
                          resume_info, locks)
        finally:
            dist.shutdown()


def quiet_console() -> Console:
    """The console of ranks other than 0: they print nothing (rank 0 speaks for the run)."""
    return Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the run


def _train(
    cfg: Config, run: RunDir | None, ckpt: Path | None, console: Console, dist: DistContext, wall_start: float,
    resume: _Resume | None = None, locks: contextlib.ExitStack | None = None,
) -> TrainResult:
    main = dist.is_main
    reporter = Reporter(console, cfg.log.progress)
    check_sinks(cfg.log)  # a tracker extra that is missing fails here, before any data or run dir
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    with dist.main_first():  # rank 0 prepares (and caches) the data; the others then read it
        cfg, task = build_task(cfg, reporter.info)  # announce: a callable(str)

    # Build (and for a resume, restore) everything before touching the run dir, so a
    # failure here leaves no empty run dir and never alters an existing run's record.
    trainer = Trainer(cfg, run, task, reporter, resume_from=ckpt, dist=dist,
                      run_checks=ckpt is None and cfg.doctor.preflight)
    device_text = f"{trainer.device} ({trainer.precision})"
    if dist.parallel != "none":
        device_text += f", {dist.parallel} x {dist.world_size} ranks"
    if run is None:
        if main:
            run = RunDir.create(cfg.train.out_dir, cfg.train.name)
            if locks is not None:
                locks.enter_context(RunLock(run.path))
            write_findings(run.findings_file, trainer.preflight_findings)
            run.write_text("config.yaml", to_yaml(cfg))
            task.write_assets(run)
            run.write_json("env.json", environment(device_text))
        # Rank 0 named the run dir (its timestamp); the others take its path, never create one.
        path = dist.broadcast_text(str(run.path) if main else None, trainer.device)
        run = trainer.run = run if main else RunDir(Path(path))
        trainer.prior_wall += time.time() - wall_start  # data preparation counts as wall time
    elif main:
        # Everything was read and validated (config, checkpoint, metrics): only now is the run dir changed.
        resume = resume or _Resume(rows=read_metrics(run.metrics_file, strict=True))
        for bad in resume.corrupt:
            _set_aside(bad)
        prune_checkpoints(run.checkpoints, len(step_checkpoints(run.checkpoints)) or 1)  # killed saves' temp dirs
        run.write_text("config.yaml", to_yaml(cfg))  # overrides given at resume are part of the record
        run.write_json(f"env_resume_step_{trainer.step:06d}.json", environment(device_text))
        if resume.data_change is not None:
            _record_data_change(run, task, resume.data_change, trainer.step)
        dropped = truncate_after(run.metrics_file, trainer.step, resume.rows)
        if dropped:
            reporter.info(f"discarded {dropped} metric rows logged after the checkpoint", style="dim")
        kept = [r for r in resume.rows if r.get("step", 0) <= trainer.step]
        trainer.replay_metrics(kept)
        # An owed eval/demo that an earlier resume already did (then was killed before its next save): done.
        if trainer.pending_eval and any(r.get("step") == trainer.step and "val_loss" in r for r in kept):
            trainer.pending_eval = False
        if trainer.pending_demo and list(run.demos.glob(f"step_{trainer.step:06d}*")):
            trainer.pending_demo = False
    if main:
        reporter.attach_log(run.log_file)
        for note in resume.notes if resume is not None else []:
            reporter.info(note, style="yellow")

    m = trainer.model
    reporter.info(f"run dir: {run.path}")
    if ckpt is not None:
        reporter.info(f"resumed from {ckpt} at step {trainer.step}")
    size = f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params"
    if hasattr(m, "num_params"):
        size += f" ({m.num_params(exclude_embeddings=True) / 1e6:.2f}M non-embedding)"
    if hasattr(m, "flops_per_token"):
        size += f", {m.flops_per_token(cfg.train.seq_len) / 1e6:.1f} MFLOP/token (training)"
    reporter.info(
        f"model ({cfg.model.family}): {size}; "
        f"device {trainer.device}, precision {trainer.precision}"
        + (", activation checkpointing" if cfg.train.activation_checkpointing else "")
        + (", torch.compile" if trainer.forward_model is not trainer.wrapped else "")
    )
    if trainer.compile_note:
        reporter.info(trainer.compile_note, style="yellow")
    if dist.parallel != "none":
        reporter.info(
            f"{dist.parallel} over {dist.world_size} ranks: global batch {cfg.train.batch_size} = "
            f"{dist.world_size} x {cfg.train.batch_size // dist.world_size} per rank per micro-step"
        )
    reporter.info(
        f"data: {task.data_summary()}; {trainer.tokens_per_step:,} tokens/step x {cfg.train.max_steps:,} steps"
    )
    try:
        result = trainer.fit()
    finally:
        reporter.close()
    last_demo = trainer.run.demos / f"step_{result.step:06d}.txt"
    if main and not reporter.console_broken:
        try:
            _print_summary(console, result, last_demo.read_text(errors="replace") if last_demo.exists() else None)
        except OSError:
            pass  # stdout closed (`| head`): the run and its record are complete
    return result


def _record_data_change(run: RunDir, task: Task, change: tuple[str, str], step: int) -> None:
    """An allowed data change at a resume: data.json describes the new data and keeps the old in ``history``."""
    old = read_json_object(run.path / "data.json") or {"path": change[0]}
    history = old.pop("history", [])
    history = history if isinstance(history, list) else []
    task.write_assets(run)  # the new data's data.json (and tokenizer)
    new = read_json_object(run.path / "data.json") or {"path": change[1]}
    new["history"] = [*history, {**old, "until_step": step}]
    run.write_json("data.json", new)
