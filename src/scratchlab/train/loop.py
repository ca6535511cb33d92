"""The training loop: the `Trainer` runs steps, evals, demos and checkpoints of one run.

Its state restores bit-exactly on CPU (weights, optimizer, data position, RNG and clip history;
schedules are functions of the step). Starting or resuming a run dir is train/run.py's.
"""

from __future__ import annotations

import contextlib
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

from scratchlab.config import Config, config_record
from scratchlab.doctor.findings import (
    Finding,
    make_finding,
    read_findings,
    sort_findings,
    write_findings,
)
from scratchlab.doctor.probes import (
    UPDATE_RATIO_KEYS,
    guilty_parameters,
    moe_load_stats,
    snapshot,
    update_ratio,
)
from scratchlab.errors import UserError, shorten
from scratchlab.fileio import to_float
from scratchlab.runs.metrics import MetricsLogger
from scratchlab.runs.sinks import open_sinks
from scratchlab.runs.store import RunDir
from scratchlab.runs.checkpoint import (
    BEST,
    NonFiniteModelError,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    read_state,
    save_checkpoint,
)
from scratchlab.runtime import (
    StopRequested,
    clear_stop,
    compiler_missing,
    request_stop,
    resolve_device,
    resolve_precision,
    stop_requested,
)
from scratchlab.train.distributed import (
    DistContext,
    clip_grad_norm,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    load_full_optimizer_state,
    local_tensors,
    rank_device,
    rank_rows,
    sharded_update_ratio,
    tied_parameters,
    wrap_model,
)
from scratchlab.families.base import Task
from scratchlab.families.registry import build_model, build_monitor
from scratchlab.train.batches import BatchPrefetcher
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
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves, and exits cleanly.

    The handler answers at once (one line on stderr) and sets the runtime's stop flag, which the
    eval batches and demo tokens poll (`runtime.check_stop`), so a long eval does not delay the stop.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopFlag":
        clear_stop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        request_stop()
        try:  # straight to fd 2: no console lock is taken inside a signal handler
            os.write(2, f"\n{self.signal}: stopping, saving a checkpoint (press Ctrl-C again to quit without "
                        "saving)\n".encode())
        except OSError:
            pass  # stderr is gone: the stop goes on regardless

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        clear_stop()


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
        # Fused AdamW takes the step's non-finite flag as a device tensor (found_inf) and skips the
        # update on the device: no host read per step. Other devices read the flag (see train_step).
        self._skip_on_device = self.device.type in ("cuda", "cpu")
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=self._skip_on_device)
        self.compile_note: str | None = None
        # What the training forward goes through: the wrapped module (eager: self._eager_loss calls the
        # task's loss on it), or torch.compile of that whole function, batch -> loss (the loss in the graph).
        self.forward_model = self._compiled(self._eager_loss) if cfg.train.compile else self.wrapped
        self._compile_unverified = cfg.train.compile and self.forward_model is not self.wrapped
        # The next batch is drawn on a worker thread while a step runs; data_gen stays the data position.
        self.batches = BatchPrefetcher(
            lambda generator: self.task.train_batch(cfg.train.batch_size, generator,
                                                    rows=rank_rows(cfg.train.batch_size, self.dist)),
            self.data_gen, pin=self.device.type == "cuda",
        )
        self.step = 0
        self.clip_history: deque[torch.Tensor] = deque(maxlen=CLIP_WINDOW)  # 0-dim bools on the device
        self.best_val = math.inf
        self.last_val: tuple[float, float] = (math.nan, math.nan)
        self._last_loss: torch.Tensor | float = math.nan  # read when saved, logged or at the end
        self.guilty: list[dict] = []  # parameters blamed for the last non-finite step
        # Non-finite steps, counted on the device, read on check steps (see train_step):
        # the current run of non-finite steps, the longest run and the count since the last check,
        # and the gradient norms per parameter of the last non-finite step (for the blame).
        self._streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self._max_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_norms: tuple[list[str], torch.Tensor] | None = None
        self.nonfinite_seen = 0  # non-finite steps found by the last check (0 on other steps)
        self.nonfinite_run = 0  # the longest run of consecutive non-finite steps seen by the last check
        self.train_time = 0.0  # seconds spent in optimizer steps (for tokens/s)
        self.prior_wall = 0.0  # wall time of earlier segments of a resumed run
        self._t0 = time.time()
        self._interval_tokens, self._interval_start = 0, time.perf_counter()  # for tokens_per_s rows
        self.monitor = build_monitor(cfg) if cfg.doctor.monitors else None  # generic + the family's monitors
        self.metrics: MetricsLogger | None = None  # set by fit(); findings also go to its tracker sinks
        # A stop interrupted this step's eval / demo: the checkpoint says so and the resume runs them first.
        self.pending_eval = self.pending_demo = False
        self.good_checkpoint: Path | None = resume_from  # newest verified step checkpoint: never pruned
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
            "clip_history": torch.stack(list(self.clip_history)).tolist() if self.clip_history else [],
            "train_time_s": self.train_time,
            "wall_s": self.prior_wall + time.time() - self._t0,
            "pending_eval": self.pending_eval,
            "pending_demo": self.pending_demo,
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
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError) as exc:
            raise UserError(f"checkpoint {ckpt}/trainer.pt does not match this model/optimizer "
                            f"({shorten(str(exc), 160)})") from exc

        def number(key: str, default: float) -> float:
            value = to_float(state.get(key, default))
            return default if value is None else value

        self.step = int(state["step"])
        history = state.get("clip_history", [])
        if isinstance(history, list):
            self.clip_history.extend(torch.tensor(c, device=self.device) for c in history if isinstance(c, bool))
        self.best_val = number("best_val_loss", math.inf)
        self.last_val = (number("val_loss", math.nan), number("val_bpb", math.nan))
        self.train_time = number("train_time_s", 0.0)
        self.prior_wall = number("wall_s", 0.0)
        self.pending_eval = state.get("pending_eval") is True
        self.pending_demo = state.get("pending_demo") is True

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
            self.good_checkpoint = path  # written and fsynced by this process: verified by construction
            prune_checkpoints(self.run.checkpoints, self.cfg.train.keep_last, keep=self.good_checkpoint)
        return path

    # -- one optimizer step

    @property
    def last_loss(self) -> float:
        """The last step's training loss (a device tensor until read: reading it waits for the device)."""
        return float(self._last_loss)

    @last_loss.setter
    def last_loss(self, value: float) -> None:
        self._last_loss = value

    def _eager_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Batch -> (loss, objective, logged extras): the task's one loss over the training module.

        This whole function is what ``train.compile`` compiles, so the loss (cross-entropy, z-loss,
        codebook weights) is fused with the model's output layer (no fp32 copy of the logits).
        """
        out = self.task.loss(self.wrapped, batch, self.precision)
        return out.loss, out.objective, out.logged

    def _compiled(self, loss_fn):
        """torch.compile(loss_fn), or the wrapped module (with a warning) where compiling cannot work."""
        missing = compiler_missing(self.device)
        if missing:  # printed by train() once the run's log is open
            self.compile_note = f"warning: train.compile=true but {missing}; training eagerly"
            return self.wrapped
        return torch.compile(loss_fn)

    def _fall_back_to_eager(self, exc: Exception) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        self.reporter.info(
            f"warning: torch.compile failed ({type(exc).__name__}: {first}); training eagerly", style="yellow"
        )
        self.forward_model = self.wrapped

    def _micro_batches(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of grad_accum micro-batches: (sum of losses, sums of the logged extras).

        Both stay on the device (read once per log row). Each micro-batch is this rank's rows of the
        global batch (drawn ahead by ``self.batches``; the data position advances the same on every
        rank); gradients are reduced across ranks on the last micro-batch only.
        """
        cfg = self.cfg.train
        step_loss = self._eager_loss if self.forward_model is self.wrapped else self.forward_model
        pinned = self.batches.pin
        loss_sum: torch.Tensor | None = None
        extra: dict[str, torch.Tensor] = {}  # the task's logged extras and moe_aux_loss, summed over micro-batches
        for i in range(cfg.grad_accum):
            batch = {k: v.to(self.device, non_blocking=pinned) for k, v in self.batches.next().items()}
            with gradient_sync(self.wrapped, self.dist, sync=i == cfg.grad_accum - 1):
                loss, objective, logged = step_loss(batch)
                aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else None
                if aux is not None:  # MoE load balancing, logged on its own as moe_aux_loss
                    objective = objective + aux
                    logged = {**logged, "moe_aux_loss": aux.detach()}
                (objective / cfg.grad_accum).backward()
            loss = loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            for key, value in logged.items():
                value = torch.as_tensor(value, device=self.device).detach().float()
                extra[key] = value if key not in extra else extra[key] + value
        return loss_sum, extra

    def _check_step(self) -> bool:
        """Whether this step reads its figures to the host: log steps, save steps and the last step.

        Every other step runs without a host sync. The price is latency: a non-finite step (skipped on
        the device either way) is noticed, logged (``nonfinite``) and counted towards MAX_NONFINITE_STEPS
        at the next check, at most ``train.log_every`` steps later; no checkpoint is written in between
        (save steps are checks, and a save right after a non-finite step is still refused).
        """
        cfg, following = self.cfg.train, self.step + 1
        return following % cfg.log_every == 0 or following % cfg.save_every == 0 or following == cfg.max_steps

    def train_step(self, metrics: MetricsLogger) -> bool:
        """One optimizer step over grad_accum micro-batches.

        Returns False if the step is known to have been skipped as non-finite (known on check steps,
        see ``_check_step``; True otherwise). The skip itself is decided on the device.
        """
        cfg = self.cfg.train
        lr = lr_at(self.step, self.cfg.optim, cfg.max_steps)
        for group in self.optimizer.param_groups:  # each group: its own base LR (train/optim.py) x the schedule
            group["lr"] = lr_at(self.step, self.cfg.optim, cfg.max_steps, group.get("base_lr"))
        threshold = clip_threshold_at(self.step, cfg.clip)
        logging = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps
        check = self._check_step()
        started = time.perf_counter()
        if self._compile_unverified:  # torch.compile fails on the first call, if at all: retry this step eagerly
            position = self.data_gen.get_state()
            try:
                loss_sum, extra = self._micro_batches()
            except Exception as exc:  # noqa: BLE001 - any compiler failure; a real model error recurs eagerly
                self._fall_back_to_eager(exc)
                self.optimizer.zero_grad(set_to_none=True)
                self.data_gen.set_state(position)  # the prefetched batch is then redrawn from here
                loss_sum, extra = self._micro_batches()
            self._compile_unverified = False
        else:
            loss_sum, extra = self._micro_batches()
        # Logged figures are means over ranks (each rank's loss is the mean over its slice of the batch).
        keys = list(extra)
        means = self.dist.all_mean_tensor(torch.stack([loss_sum, *(extra[k] for k in keys)]) / cfg.grad_accum)
        loss_t = means[0]
        named = list(self.model.named_parameters())
        grad_norm, names, per_param = clip_grad_norm(named, threshold)  # DDP/FSDP grads are already averaged
        finite = torch.isfinite(loss_t) & torch.isfinite(grad_norm)
        self._count_nonfinite(finite, names, per_param)
        # The update/weight ratio needs the weights before the step: copy them only on steps
        # that will be logged (one weight-sized copy every log_every steps keeps it cheap).
        # It is the doctor's measurement: off with its monitors (doctor.monitors=false).
        measure = self.monitor is not None and logging
        groups = self.optimizer.param_groups[: len(UPDATE_RATIO_KEYS)]
        sharded = self.dist.parallel == "fsdp"  # FSDP: each rank holds shards; the ratio sums over ranks
        before = [snapshot(local_tensors(g["params"]) if sharded else g["params"]) for g in groups] if measure else []
        if self._skip_on_device:
            self.optimizer.found_inf = (~finite).float()  # fused AdamW: 1 = leave weights and state untouched
            self.optimizer.step()
        elif bool(finite):  # an optimizer without found_inf: the flag is read (one sync per step)
            self.optimizer.step()
        if hasattr(self.model, "after_optimizer_step"):
            self.model.after_optimizer_step()  # e.g. MoE aux-loss-free bias balancing
        clipped = finite & (grad_norm > threshold)
        self.clip_history.append(clipped)
        self._last_loss = loss_t
        self.step += 1
        self._interval_tokens += self.tokens_per_step
        if not check:
            self.nonfinite_seen = 0
            self.optimizer.zero_grad(set_to_none=True)
            self.train_time += time.perf_counter() - started
            self.reporter.advance(self.step)
            return True
        # A check step: this step's row, the clip ratio and the non-finite counters in one read.
        ring = torch.stack(list(self.clip_history)).float()
        counters = [grad_norm, finite, clipped, ring.mean(), self._bad_steps, self._max_streak]
        read = torch.cat([means.float(), torch.stack([c.float() for c in counters])]).tolist()
        values, (grad_value, finite_value, clipped_value, clip_ratio, bad, run) = read[: len(means)], read[len(means):]
        ok = finite_value == 1.0
        self.nonfinite_seen, self.nonfinite_run = int(bad), int(run)
        if bad:
            self.guilty = self._blame()
        self._bad_steps.zero_()
        self._max_streak.copy_(self._streak)  # a run still going on carries over to the next check
        ratios: dict[str, float] = {}
        if ok:
            for key, copy, group in zip(UPDATE_RATIO_KEYS, before, groups):
                ratio = sharded_update_ratio(copy, group["params"], self.dist) if sharded else \
                    update_ratio(copy, group["params"])
                if ratio is not None:
                    ratios[key] = ratio
        # A gradient above the doctor's grad_norm_max: name the parameters now, before zero_grad drops them.
        bound = self.monitor.grad_norm_max if self.monitor is not None else 0.0
        grad_top = guilty_parameters(self.model) if logging and ok and 0 < bound < grad_value else None
        self.optimizer.zero_grad(set_to_none=True)
        self.train_time += time.perf_counter() - started
        if logging or bad:
            elapsed = time.perf_counter() - self._interval_start
            row = {
                "step": self.step,
                "tokens": self.step * self.tokens_per_step,
                "loss": values[0],
                "lr": lr,
                "grad_norm": grad_value,
                "clip_threshold": threshold if math.isfinite(threshold) else None,  # None: clipping off
                "clipped": clipped_value == 1.0,
                "clip_ratio": clip_ratio,
                **ratios,
                **dict(zip(keys, values[1:])),
                **moe_load_stats(self.model),
                "tokens_per_s": self._interval_tokens / max(elapsed, 1e-9),
                "time_s": round(self.prior_wall + time.time() - self._t0, 3),
            }
            if bad:
                row["nonfinite"] = True  # this step, or one since the last row (skipped on the device)
                if bad > 1 or ok:
                    row["nonfinite_steps"] = int(bad)
            if grad_top is not None:
                row["grad_top"] = grad_top
            self.log_row(metrics, row)
            self.reporter.step(self.step, row)
            self._interval_tokens, self._interval_start = 0, time.perf_counter()
        else:
            self.reporter.advance(self.step)
        return ok

    @torch.no_grad()
    def _count_nonfinite(self, finite: torch.Tensor, names: list[str], per_param: torch.Tensor | None) -> None:
        """Device-side bookkeeping of non-finite steps (no host read): streaks, count, the last bad step's norms."""
        bad = ~finite
        self._streak = torch.where(bad, self._streak + 1, torch.zeros_like(self._streak))
        self._max_streak = torch.maximum(self._max_streak, self._streak)
        self._bad_steps = self._bad_steps + bad
        if per_param is None:
            return
        if self._bad_norms is None or self._bad_norms[0] != names:
            self._bad_norms = (names, torch.zeros_like(per_param))
        self._bad_norms = (names, torch.where(bad, per_param, self._bad_norms[1]))

    def _blame(self) -> list[dict]:
        """The parameters to blame for the last non-finite step, as ``guilty_parameters`` lists them."""
        if self._bad_norms is None:
            return guilty_parameters(self.model)  # DTensor grads: this step's gradients
        names, norms = self._bad_norms
        rows = [{"name": n, "grad_norm": v if math.isfinite(v) else str(v), "finite": math.isfinite(v)}
                for n, v in zip(names, norms.tolist())]
        rows.sort(key=lambda r: (r["finite"], -(r["grad_norm"] if r["finite"] else 0.0)))
        return rows[:5]

    def first_batch(self) -> dict[str, torch.Tensor]:
        """The batch the next step will train on, drawn from a copy of the data generator (position unchanged)."""
        generator = torch.Generator().manual_seed(0)
        generator.set_state(self.data_gen.get_state())
        return self.task.train_batch(self.cfg.train.batch_size, generator)

    def log_first_batch(self) -> None:
        """Write what step 0 is fed to data_step0.txt: field note, the slicing bug was found only by looking."""
        self.run.write_text("data_step0.txt", self.task.describe_batch(self.first_batch()))

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
            write_findings(self.run.findings_file, [finding])
        if self.metrics is not None:
            self.metrics.log_finding(finding)

    # -- evaluation and demos

    @contextlib.contextmanager
    def _stop_polls(self):
        """While an eval or demo runs: every forward call first checks the stop flag (a batch, a token).

        One process only: under DDP/FSDP a rank that stopped mid-forward would leave the others
        waiting in a collective, so there the stop waits for the step's end as before.
        """
        if self.dist.enabled:
            yield
            return

        def poll(module, args):
            if stop_requested():
                raise StopRequested

        handle = self.model.register_forward_pre_hook(poll)
        try:
            yield
        finally:
            handle.remove()

    def evaluate(self) -> dict[str, float] | None:
        """Validation figures; every rank evaluates the same fixed windows and takes the mean over ranks,
        so all ranks agree exactly on ``best`` (FSDP's forward is collective: all ranks must run it).
        None when a stop interrupted it."""
        try:
            with self._stop_polls():
                val = self.task.evaluate(self.model, self.device, self.precision)
        except StopRequested:
            self.model.train()
            return None
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
            with self._stop_polls():
                return self.task.demo(self.model, self.step, self.run.demos, self.device, self.precision)
        except StopRequested:
            self.pending_demo = True  # the resume writes this step's demo
            self.model.train()
            return None
        except Exception as exc:  # noqa: BLE001 - any demo failure is logged and training goes on
            self.reporter.info(f"warning: demo at step {self.step} failed ({type(exc).__name__}: {exc}); training continues", style="yellow")
            return None

    # -- the loop

    def _eval_and_demo(self, metrics: MetricsLogger, last: bool, eval_due: bool | None = None,
                       demo_due: bool | None = None) -> None:
        """This step's eval and demo when due (or when a resume owes them: an interrupted one)."""
        cfg, rep = self.cfg, self.reporter
        eval_due = (self.step % cfg.eval.every == 0 or last) if eval_due is None else eval_due
        demo_due = (self.step % cfg.demo.every == 0 or last) if demo_due is None else demo_due
        if eval_due:
            val = self.evaluate()
            if val is None:  # interrupted by a stop: the resume evaluates (and demos) this step first
                self.pending_eval, self.pending_demo = True, demo_due
                return
            val_loss = val["val_loss"]
            self.last_val = (val_loss, val.get("val_bpb", math.nan))
            self.log_row(metrics, {"step": self.step, "tokens": self.step * self.tokens_per_step, **val})
            shown = "  ".join(f"{k} {v:.4f}" for k, v in val.items() if k in ("val_loss", "val_bpb"))
            rep.info(f"eval step {self.step}: {shown}", style="cyan")
            if math.isfinite(val_loss) and val_loss < self.best_val:
                self.best_val = val_loss
                self.save(BEST, weights_only=True)
        if demo_due:
            if self.demo() is not None and (measured := self.task.demo_metrics()):
                self.log_row(metrics, {"step": self.step, "tokens": self.step * self.tokens_per_step, **measured})

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
        metrics.log_config(config_record(cfg))
        for finding in read_findings(run.findings_file) if self.step == 0 and main else []:
            metrics.log_finding(finding)  # the preflight findings written at run start
        status = "finished"
        try:
            if main:
                run.set_status("running", step=self.step)
            if self.step == 0 and main:
                self.log_first_batch()
            with _StopFlag() as stop:
                rep.start(cfg.train.max_steps, self.step)
                if self.pending_eval or self.pending_demo:  # the stop that saved the checkpoint cut them short
                    owed = (self.pending_eval, self.pending_demo)
                    self.pending_eval = self.pending_demo = False
                    self._eval_and_demo(metrics, False, eval_due=owed[0], demo_due=owed[1])
                    if self.pending_eval or self.pending_demo:  # interrupted again: the checkpoint stays as it is
                        status = "stopped"
                        rep.info(f"{stop.signal or 'SIGTERM'}: stopped at step {self.step}. "
                                 f"Resume with: scratchlab train --resume {run.path}")
                while self.step < cfg.train.max_steps and status != "stopped":
                    ok = self.train_step(metrics)
                    if self.nonfinite_seen:  # known on check steps only (Trainer._check_step)
                        what = "step skipped" if self.nonfinite_seen == 1 and not ok else \
                            f"{self.nonfinite_seen} steps since the last check skipped"
                        rep.info(f"warning: non-finite loss/gradients at step {self.step}; {what}", style="yellow")
                    if self.nonfinite_run >= MAX_NONFINITE_STEPS:
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
                    self._eval_and_demo(metrics, last)
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
            if main:  # whenever the disk lets it: a full disk must not hide the error that stopped the run
                run.try_set_status("crashed", step=self.step, error=f"{type(exc).__name__}: {str(exc)[:1000]}")
            raise
        finally:
            self.batches.close()
            try:
                metrics.close(status)
            except OSError:
                pass  # the disk is full: the rows already written are intact
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

