"""The training loop: config -> data -> model -> steps, evals, demos, checkpoints -> run dir.

`train(config)` starts a run; `train(resume=RUN_DIR)` continues one from its latest
checkpoint, bit-exactly on CPU (weights, optimizer, data position, RNG and clip
history are all restored; schedules are functions of the step).
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from scratchlab.config import (
    Config,
    build_config,
    deep_merge,
    parse_overrides,
    read_source,
    to_yaml,
)
from scratchlab.doctor.findings import (
    Finding,
    make_finding,
    read_findings,
    sort_findings,
    write_findings,
)
from scratchlab.doctor.monitors import MonitorConfig, RunMonitor
from scratchlab.doctor.probes import (
    UPDATE_RATIO_KEYS,
    guilty_parameters,
    moe_load_stats,
    snapshot,
    update_ratio,
)
from scratchlab.errors import UserError
from scratchlab.runs.metrics import MetricsLogger, read_metrics, truncate_after
from scratchlab.runs.sinks import check_sinks, open_sinks
from scratchlab.runs.store import RunDir, environment
from scratchlab.runs.checkpoint import (
    BEST,
    NonFiniteModelError,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    read_state,
    save_checkpoint,
)
from scratchlab.runtime import autocast, compiler_missing, resolve_device, resolve_precision
from scratchlab.train.distributed import (
    DistContext,
    clip_grad_norm,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    init_distributed,
    load_full_optimizer_state,
    local_tensors,
    rank_device,
    rank_slice,
    sharded_update_ratio,
    tied_parameters,
    wrap_model,
)
from scratchlab.families.base import Task
from scratchlab.families.registry import build_model, build_task
from scratchlab.train.optim import build_optimizer, clip_threshold_at, lr_at
from scratchlab.train.progress import Reporter

CLIP_WINDOW = 100  # clip_ratio = clipped fraction of the last CLIP_WINDOW steps
MAX_NONFINITE_STEPS = 3  # consecutive non-finite steps before the run is stopped


class TrainingDiverged(UserError):
    """The loss or gradients stayed non-finite: stop, keeping the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    final_loss: float
    val_loss: float
    val_bpb: float
    best_val_loss: float
    tokens_per_s: float
    wall_s: float
    status: str


# ---------------------------------------------------------------- the trainer


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves, and exits cleanly."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _NullMetrics:
    """The metrics logger of ranks other than 0: they compute every row but only rank 0 writes."""

    def log(self, row: dict) -> None: ...
    def log_config(self, config: dict) -> None: ...
    def log_finding(self, finding: Finding) -> None: ...
    def close(self, status: str = "finished") -> None: ...


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run: RunDir | None,
        task: Task,
        reporter: Reporter,
        *,
        resume_from: Path | None = None,
        dist: DistContext | None = None,
        run_checks: bool = False,
    ) -> None:
        """Build the model (restoring ``resume_from``), run preflight if ``run_checks``, then wrap for ``dist``.

        Preflight sees the plain, unwrapped model on every rank (same model, same batch, same
        findings); DDP/FSDP wrapping, the optimizer (built on FSDP's sharded parameters) and
        torch.compile come after it.
        """
        self.cfg, self.run, self.task, self.reporter = cfg, run, task, reporter
        self.dist = dist or DistContext()
        world = self.dist.world_size if self.dist.parallel != "none" else 1
        self.device = rank_device(resolve_device(cfg.train.device), self.dist.local_rank, world)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model).to(self.device)
        if cfg.train.activation_checkpointing:
            if not hasattr(self.model, "activation_checkpointing"):
                raise UserError(
                    f"train.activation_checkpointing is supported by the lm and codec_lm families, not "
                    f"{cfg.model.family}; set it to false"
                )
            self.model.activation_checkpointing = True
        self.tied = tied_parameters(self.model)  # names a gathered (FSDP) state dict saves once
        self.data_gen = torch.Generator().manual_seed(cfg.train.seed)  # the data position
        if resume_from is not None:
            load_weights(self.model, resume_from)  # full weights on every rank, before any sharding
        self.preflight_findings = run_preflight(self, reporter) if run_checks else []
        # The module the training forward goes through: DDP(model), or model itself (sharded in place by FSDP).
        self.wrapped = wrap_model(self.model, self.dist, self.device, find_unused=bool(cfg.model.moe.n_routed_experts))
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=self.device.type == "cuda")
        self.compile_note: str | None = None
        self.forward_model = self._compiled(self.wrapped) if cfg.train.compile else self.wrapped
        self._compile_unverified = cfg.train.compile and self.forward_model is not self.wrapped
        self.step = 0
        self.clip_history: deque[bool] = deque(maxlen=CLIP_WINDOW)
        self.best_val = math.inf
        self.last_val: tuple[float, float] = (math.nan, math.nan)
        self.last_loss = math.nan
        self.guilty: list[dict] = []  # parameters blamed for the last non-finite step
        self.train_time = 0.0  # seconds spent in optimizer steps (for tokens/s)
        self.prior_wall = 0.0  # wall time of earlier segments of a resumed run
        self._t0 = time.time()
        self._interval_tokens, self._interval_start = 0, time.perf_counter()  # for tokens_per_s rows
        self.monitor = RunMonitor(MonitorConfig.from_config(cfg)) if cfg.doctor.monitors else None
        self.metrics: MetricsLogger | None = None  # set by fit(); findings also go to its tracker sinks
        if resume_from is not None:
            self._restore(resume_from)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * task.tokens_per_sample

    # -- state

    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "data": self.data_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "loss": self.last_loss,
            "val_loss": self.last_val[0],
            "val_bpb": self.last_val[1],
            "best_val_loss": self.best_val,
            "clip_history": [bool(c) for c in self.clip_history],
            "train_time_s": self.train_time,
            "wall_s": self.prior_wall + time.time() - self._t0,
        }

    def _restore(self, ckpt: Path) -> None:
        """Optimizer, RNG and loop state of ``ckpt`` (the weights were loaded before wrapping)."""
        trainer_state = load_trainer_state(ckpt)
        state = read_state(ckpt)
        try:
            if self.dist.parallel == "fsdp":  # the single-process layout, scattered onto the shards
                load_full_optimizer_state(self.model, self.optimizer, trainer_state["optimizer"])
            else:
                self.optimizer.load_state_dict(trainer_state["optimizer"])
            torch.set_rng_state(trainer_state["rng"]["torch"])
            self.data_gen.set_state(trainer_state["rng"]["data"])
            if "cuda" in trainer_state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(trainer_state["rng"]["cuda"], self.device)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise UserError(f"checkpoint {ckpt}/trainer.pt does not match this model/optimizer ({exc})") from exc
        self.step = int(state["step"])
        self.clip_history.extend(state.get("clip_history", []))
        self.best_val = float(state.get("best_val_loss", math.inf))
        self.last_val = (float(state.get("val_loss", math.nan)), float(state.get("val_bpb", math.nan)))
        self.train_time = float(state.get("train_time_s", 0.0))
        self.prior_wall = float(state.get("wall_s", 0.0))

    def save(self, name: str | None = None, weights_only: bool = False) -> Path | None:
        """Write a checkpoint from rank 0. Every rank must call it: FSDP gathers the full state first."""
        name = name or f"step_{self.step:06d}"
        if self.dist.parallel == "fsdp":
            weights = full_model_state(self.model, self.dist)
            optimizer = None if weights_only else full_optimizer_state(self.model, self.optimizer, self.dist)
        else:  # DDP: the unwrapped module is the same on every rank
            weights, optimizer = self.model, None if weights_only else self.optimizer
        if not self.dist.is_main:
            return None
        try:
            path = save_checkpoint(
                self.run.checkpoints,
                name,
                weights,
                optimizer,
                None if weights_only else self._rng_state(),
                self._state(),
                tied=self.tied,
            )
        except NonFiniteModelError as exc:
            self.reporter.info(f"warning: checkpoint {name} not saved: {exc}", style="yellow")
            return None
        if name != BEST:
            prune_checkpoints(self.run.checkpoints, self.cfg.train.keep_last)
        return path

    # -- one optimizer step

    def _compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """torch.compile(module), or module itself (with a warning) where compiling cannot work."""
        missing = compiler_missing(self.device)
        if missing:  # printed by train() once the run's log is open
            self.compile_note = f"warning: train.compile=true but {missing}; training eagerly"
            return module
        return torch.compile(module)

    def _fall_back_to_eager(self, exc: Exception) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        self.reporter.info(
            f"warning: torch.compile failed ({type(exc).__name__}: {first}); training eagerly", style="yellow"
        )
        self.forward_model = self.wrapped

    def _micro_batches(self) -> tuple[float, dict[str, float]]:
        """Forward and backward of grad_accum micro-batches: (sum of losses, sums of the logged extras).

        Each draws the global batch (the data position advances the same on every rank) and trains
        on this rank's rows; gradients are reduced across ranks on the last micro-batch only.
        """
        cfg = self.cfg.train
        loss_sum = 0.0
        extra: dict[str, float] = {}  # the task's logged extras and moe_aux_loss, summed over micro-batches
        for i in range(cfg.grad_accum):
            batch = rank_slice(self.task.train_batch(cfg.batch_size, self.data_gen), self.dist)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with gradient_sync(self.wrapped, self.dist, sync=i == cfg.grad_accum - 1):
                out = self.task.loss(self.forward_model, batch, self.precision)
                objective = out.objective
                logged = dict(out.logged)
                aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else None
                if aux is not None:  # MoE load balancing, logged on its own as moe_aux_loss
                    objective = objective + aux
                    logged["moe_aux_loss"] = aux.item()
                (objective / cfg.grad_accum).backward()
            loss_sum += out.loss.item()
            for key, value in logged.items():
                extra[key] = extra.get(key, 0.0) + value
        return loss_sum, extra

    def train_step(self, metrics: MetricsLogger) -> bool:
        """One optimizer step over grad_accum micro-batches. Returns False if it was skipped (non-finite)."""
        cfg = self.cfg.train
        lr = lr_at(self.step, self.cfg.optim, cfg.max_steps)
        for group in self.optimizer.param_groups:  # each group: its own base LR (train/optim.py) x the schedule
            group["lr"] = lr_at(self.step, self.cfg.optim, cfg.max_steps, group.get("base_lr"))
        threshold = clip_threshold_at(self.step, cfg.clip)
        started = time.perf_counter()
        if self._compile_unverified:  # torch.compile fails on the first call, if at all: retry this step eagerly
            position = self.data_gen.get_state()
            try:
                loss_sum, extra = self._micro_batches()
            except Exception as exc:  # noqa: BLE001 - any compiler failure; a real model error recurs eagerly
                self._fall_back_to_eager(exc)
                self.optimizer.zero_grad(set_to_none=True)
                self.data_gen.set_state(position)
                loss_sum, extra = self._micro_batches()
            self._compile_unverified = False
        else:
            loss_sum, extra = self._micro_batches()
        # Logged figures are means over ranks (each rank's loss is the mean over its slice of the batch).
        keys = list(extra)
        means = self.dist.all_mean([loss_sum / cfg.grad_accum, *(extra[k] / cfg.grad_accum for k in keys)], self.device)
        loss_value, extra = means[0], dict(zip(keys, means[1:]))
        grad_norm = clip_grad_norm(list(self.model.parameters()), threshold)  # DDP/FSDP grads are already averaged
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        ratios: dict[str, float] = {}
        if finite:
            # The update/weight ratio needs the weights before the step: copy them only on steps
            # that will be logged (one weight-sized copy every log_every steps keeps it cheap).
            # It is the doctor's measurement: off with its monitors (doctor.monitors=false).
            logged = self.monitor is not None and ((self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps)
            groups = self.optimizer.param_groups[: len(UPDATE_RATIO_KEYS)]
            sharded = self.dist.parallel == "fsdp"  # FSDP: each rank holds shards; the ratio sums over ranks
            before = [snapshot(local_tensors(g["params"]) if sharded else g["params"]) for g in groups] if logged else []
            self.optimizer.step()
            if hasattr(self.model, "after_optimizer_step"):
                self.model.after_optimizer_step()  # e.g. MoE aux-loss-free bias balancing
            for key, copy, group in zip(UPDATE_RATIO_KEYS, before, groups):
                if sharded:
                    ratio = sharded_update_ratio(copy, group["params"], self.dist)
                else:
                    ratio = update_ratio(copy, group["params"])
                if ratio is not None:
                    ratios[key] = ratio
        else:
            self.guilty = guilty_parameters(self.model)  # before zero_grad drops the evidence
        # A gradient above the doctor's grad_norm_max: name the parameters now, before zero_grad drops them.
        bound = self.monitor.config.grad_norm_max if self.monitor is not None else 0.0
        grad_top = guilty_parameters(self.model) if finite and 0 < bound < grad_norm else None
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_time += time.perf_counter() - started
        self.step += 1
        clipped = finite and grad_norm > threshold
        self.clip_history.append(clipped)
        self.last_loss = loss_value
        self._interval_tokens += self.tokens_per_step
        if self.step % self.cfg.train.log_every == 0 or self.step == cfg.max_steps or not finite:
            elapsed = time.perf_counter() - self._interval_start
            row = {
                "step": self.step,
                "tokens": self.step * self.tokens_per_step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "clip_threshold": threshold if math.isfinite(threshold) else None,  # None: clipping off
                "clipped": clipped,
                "clip_ratio": sum(self.clip_history) / len(self.clip_history),
                **ratios,
                **extra,
                **moe_load_stats(self.model),
                "tokens_per_s": self._interval_tokens / max(elapsed, 1e-9),
                "time_s": round(self.prior_wall + time.time() - self._t0, 3),
            }
            if not finite:
                row["nonfinite"] = True
            if grad_top is not None:
                row["grad_top"] = grad_top
            self.log_row(metrics, row)
            self.reporter.step(self.step, row)
            self._interval_tokens, self._interval_start = 0, time.perf_counter()
        else:
            self.reporter.advance(self.step)
        return finite

    def first_batch(self) -> dict[str, torch.Tensor]:
        """The batch the next step will train on, drawn from a copy of the data generator (position unchanged)."""
        generator = torch.Generator().manual_seed(0)
        generator.set_state(self.data_gen.get_state())
        return self.task.train_batch(self.cfg.train.batch_size, generator)

    def log_first_batch(self) -> None:
        """Write what step 0 is fed to data_step0.txt: field note, the slicing bug was found only by looking."""
        (self.run.path / "data_step0.txt").write_text(self.task.describe_batch(self.first_batch()), encoding="utf-8")

    def log_row(self, metrics: MetricsLogger, row: dict) -> None:
        """Every metric row goes to metrics.jsonl, then past the monitors (the doctor reads what people read)."""
        metrics.log(row)
        if self.monitor is not None:
            for finding in self.monitor.observe(row):
                self.record(finding)

    def replay_metrics(self, rows: list[dict]) -> None:
        """After a resume: feed the monitors the run's history (its findings were recorded the first time)."""
        if self.monitor is not None:
            for row in rows:
                self.monitor.observe(row)

    def record(self, finding: Finding) -> None:
        """A doctor finding raised while training: printed, and appended to findings.jsonl."""
        style = {"error": "bold red", "warning": "yellow"}.get(finding.severity)
        self.reporter.info(str(finding), style=style)
        if self.dist.is_main:  # every rank sees the same rows and raises the same findings; one writes them
            write_findings(self.run.path / "findings.jsonl", [finding])
        if self.metrics is not None:
            self.metrics.log_finding(finding)

    # -- evaluation and demos

    def evaluate(self) -> dict[str, float]:
        """Validation figures; every rank evaluates the same fixed windows and takes the mean over ranks,
        so all ranks agree exactly on ``best`` (FSDP's forward is collective: all ranks must run it)."""
        val = self.task.evaluate(self.model, self.device, self.precision)
        keys = [k for k, v in val.items() if isinstance(v, (int, float))]
        return {**val, **dict(zip(keys, self.dist.all_mean([float(val[k]) for k in keys], self.device)))}

    def demo(self) -> str | None:
        """The task's demo samples; never raises (a demo must not stop training).

        Written by rank 0. FSDP's forward is collective, so there every rank generates in lockstep
        (same weights, same seeds) and the other ranks write into a scratch folder that is deleted.
        """
        if not self.dist.is_main and self.dist.parallel != "fsdp":
            return None
        try:
            if not self.dist.is_main:
                with tempfile.TemporaryDirectory(prefix="scratchlab-demo-") as scratch:
                    return self.task.demo(self.model, self.step, Path(scratch), self.device, self.precision)
            return self.task.demo(self.model, self.step, self.run.demos, self.device, self.precision)
        except Exception as exc:  # noqa: BLE001 - any demo failure is logged and training goes on
            self.reporter.info(f"warning: demo at step {self.step} failed ({type(exc).__name__}: {exc}); training continues", style="yellow")
            return None

    # -- the loop

    def fit(self) -> TrainResult:
        cfg, run, rep = self.cfg, self.run, self.reporter
        self._interval_tokens, self._interval_start = 0, time.perf_counter()  # do not count set-up time
        warn = lambda message: rep.info(message, style="yellow")  # noqa: E731 - a tracker failure is a warning
        main = self.dist.is_main  # only rank 0 writes the run dir; the other ranks compute the same rows
        if main:
            sinks = open_sinks(cfg, run.path, start_step=self.step, warn=warn)
            metrics = self.metrics = MetricsLogger(run.metrics_file, sinks, warn=warn)
        else:
            metrics = self.metrics = _NullMetrics()
        metrics.log_config(cfg.model_dump(mode="json"))
        for finding in read_findings(run.path / "findings.jsonl") if self.step == 0 and main else []:
            metrics.log_finding(finding)  # the preflight findings written at run start
        if main:
            run.set_status("running", step=self.step)
        if self.step == 0 and main:
            self.log_first_batch()
        status = "finished"
        nonfinite_streak = 0
        try:
            with _StopFlag() as stop:
                rep.start(cfg.train.max_steps, self.step)
                while self.step < cfg.train.max_steps:
                    ok = self.train_step(metrics)
                    nonfinite_streak = 0 if ok else nonfinite_streak + 1
                    if nonfinite_streak:
                        rep.info(f"warning: non-finite loss/gradients at step {self.step}; step skipped", style="yellow")
                    if nonfinite_streak >= MAX_NONFINITE_STEPS:
                        names = ", ".join(g["name"] for g in self.guilty[:3]) or "none (the loss itself)"
                        self.record(make_finding(
                            "nonfinite",
                            f"loss or gradients non-finite for {MAX_NONFINITE_STEPS} steps in a row; top parameters "
                            f"by gradient: {names}",
                            step=self.step, loss=self.last_loss, parameters=self.guilty[:5],
                        ))
                        raise TrainingDiverged(
                            f"training diverged: loss or gradients non-finite for {MAX_NONFINITE_STEPS} steps in a row "
                            f"at step {self.step} (top parameters by gradient: {names}); lower optim.lr or "
                            f"train.clip.max_norm, then resume from the last good checkpoint in {run.checkpoints}"
                        )
                    last = self.step == cfg.train.max_steps
                    if self.step % cfg.eval.every == 0 or last:
                        val = self.evaluate()
                        val_loss = val["val_loss"]
                        self.last_val = (val_loss, val.get("val_bpb", math.nan))
                        self.log_row(metrics, {"step": self.step, "tokens": self.step * self.tokens_per_step, **val})
                        shown = "  ".join(f"{k} {v:.4f}" for k, v in val.items() if k in ("val_loss", "val_bpb"))
                        rep.info(f"eval step {self.step}: {shown}", style="cyan")
                        if math.isfinite(val_loss) and val_loss < self.best_val:
                            self.best_val = val_loss
                            self.save(BEST, weights_only=True)
                    if self.step % cfg.demo.every == 0 or last:
                        if self.demo() is not None and (measured := self.task.demo_metrics()):
                            self.log_row(metrics, {"step": self.step, "tokens": self.step * self.tokens_per_step,
                                                   **measured})
                    # A signal may reach the ranks at different steps: they agree, then all save together.
                    if self.dist.any(stop.signal is not None, self.device):
                        rep.stop()
                        self.save()
                        status = "stopped"
                        rep.info(f"{stop.signal or 'SIGTERM'}: saved step {self.step}. "
                                 f"Resume with: scratchlab train --resume {run.path}")
                        break
                    if (self.step % cfg.train.save_every == 0 or last) and ok:  # never right after a non-finite step
                        self.save()
        except BaseException as exc:
            status = "crashed"
            rep.stop()
            if main:
                run.set_status("crashed", step=self.step, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            metrics.close(status)
            rep.stop()
        state = self._state()
        tokens_per_s = state["tokens"] / max(self.train_time, 1e-9)
        result = TrainResult(
            run_dir=run.path,
            step=self.step,
            tokens=state["tokens"],
            final_loss=self.last_loss,
            val_loss=self.last_val[0],
            val_bpb=self.last_val[1],
            best_val_loss=self.best_val,
            tokens_per_s=tokens_per_s,
            wall_s=state["wall_s"],
            status=status,
        )
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items() if k != "status"}
        if main:
            run.set_status(status, **summary)
        return result


# ---------------------------------------------------------------- entry points


PREFLIGHT_SAMPLES = 4  # enough for the batch checks; keeps preflight to seconds on a CPU


def run_preflight(trainer: Trainer, reporter: Reporter) -> list[Finding]:
    """The doctor's checks on the real model and the real first batch, before step 0.

    Errors stop the run (a UserError listing them) unless ``doctor.allow_errors`` is set.
    """
    cfg = trainer.cfg
    batch = {k: v[:PREFLIGHT_SAMPLES].to(trainer.device) for k, v in trainer.first_batch().items()}
    started = time.perf_counter()
    findings = sort_findings(trainer.task.preflight(trainer.model, batch))
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    reporter.info(f"preflight: {len(errors)} errors, {len(warnings)} warnings ({time.perf_counter() - started:.1f} s)")
    for f in findings:
        reporter.info(f"  {f}", style={"error": "bold red", "warning": "yellow"}.get(f.severity))
    if errors and not cfg.doctor.allow_errors:
        raise UserError(
            f"preflight found {len(errors)} error(s), first: {errors[0].code}: {errors[0].message}; fix the model or "
            "data (see docs/findings.md), or set doctor.allow_errors=true to train anyway"
        )
    return findings


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


def train(
    config: Config | None = None,
    *,
    resume: str | Path | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train a new run from ``config``, or continue the run dir ``resume`` (with optional overrides)."""
    wall_start = time.time()
    console = console or Console()
    if resume is not None:
        run = RunDir.open(resume)
        raw = deep_merge(read_source(run.config_file), parse_overrides(overrides or []))
        cfg = build_config(raw)
        ckpt = latest_checkpoint(run.checkpoints)
        if ckpt is None:
            raise UserError(f"run {run.path} has no checkpoint to resume from; start a new run instead")
    else:
        cfg = config if config is not None else build_config({})
        run, ckpt = None, None

    # Under torchrun: join the process group first; from here on every rank runs the same code,
    # and only rank 0 prints and writes the run dir (docs/distributed.md).
    dist, _ = init_distributed(cfg.train.parallel, cfg.train.batch_size, resolve_device(cfg.train.device))
    try:
        return _train(cfg, run, ckpt, console if dist.is_main else quiet_console(), dist, wall_start)
    finally:
        dist.shutdown()


def quiet_console() -> Console:
    """The console of ranks other than 0: they print nothing (rank 0 speaks for the run)."""
    return Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the run


def _train(
    cfg: Config, run: RunDir | None, ckpt: Path | None, console: Console, dist: DistContext, wall_start: float
) -> TrainResult:
    main = dist.is_main
    reporter = Reporter(console, cfg.log.progress)
    check_sinks(cfg.log)  # a tracker extra that is missing fails here, before any data or run dir
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    with dist.main_first():  # rank 0 prepares (and caches) the data; the others then read it
        cfg, task = build_task(cfg, reporter.info)

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
            write_findings(run.path / "findings.jsonl", trainer.preflight_findings)
            run.config_file.write_text(to_yaml(cfg))
            task.write_assets(run)
            run.write_json("env.json", environment(device_text))
        # Rank 0 named the run dir (its timestamp); the others take its path, never create one.
        path = dist.broadcast_text(str(run.path) if main else None, trainer.device)
        run = trainer.run = run if main else RunDir(Path(path))
        trainer.prior_wall += time.time() - wall_start  # data preparation counts as wall time
    elif main:
        run.config_file.write_text(to_yaml(cfg))  # overrides given at resume are part of the record
        run.write_json(f"env_resume_step_{trainer.step:06d}.json", environment(device_text))
        dropped = truncate_after(run.metrics_file, trainer.step)
        if dropped:
            console.print(f"discarded {dropped} metric rows logged after the checkpoint", style="dim")
        trainer.replay_metrics(read_metrics(run.metrics_file))
    if main:
        reporter.attach_log(run.log_file)

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
    if main:
        _print_summary(console, result, last_demo.read_text() if last_demo.exists() else None)
    return result
