"""What the doctor costs: training step time with the in-loop monitors on vs off, and preflight time.

Usage::

    python benchmarks/doctor_overhead.py [--steps N] [--log-every N] [section.key=value ...]

Runs the real `Trainer.train_step` of the default preset (tiny-lm) on the stdlib corpus
(capped at 4 MB of text, prepared once and cached), alternating blocks of steps with the
monitors on and off in the same process so that machine noise hits both alike. Reports the
median step time of each and the overhead in percent, at the preset's log cadence and at
log_every=1 (the worst case: every step is a metric row). "On" includes the doctor's own
measurements (the update/weight-ratio snapshot on logged steps) as well as its checks. Then times `preflight` on the
preset's model and a real batch, as `scratchlab train` runs it. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from rich.console import Console
from rich.table import Table

from scratchlab.config import load_config
from scratchlab.runs import MetricsLogger, RunDir
from scratchlab.families.registry import build_monitor, build_task
from scratchlab.train.loop import Trainer, run_preflight
from scratchlab.train.progress import Reporter


def step_times(trainer: Trainer, metrics: MetricsLogger, steps: int, block: int) -> dict[str, list[float]]:
    """Seconds per step with the monitor on and off, in alternating blocks."""
    monitor = trainer.monitor
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(0, steps, block):
        for mode in ("on", "off") if (i // block) % 2 == 0 else ("off", "on"):
            trainer.monitor = monitor if mode == "on" else None
            for _ in range(block):
                started = time.perf_counter()
                trainer.train_step(metrics)
                times[mode].append(time.perf_counter() - started)
    trainer.monitor = monitor
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per mode and cadence (default 40)")
    parser.add_argument("--block", type=int, default=1, help="steps per alternating block (default 1)")
    args = parser.parse_args()
    console = Console()
    cfg = load_config("tiny-lm", ["train.max_steps=100000", "data.max_mb=4", *args.overrides])
    cfg, task = build_task(cfg)

    table = Table(title="in-loop monitors: cost per training step (tiny-lm)")
    for column in ("log_every", "median step off", "median step on", "overhead (median)", "overhead (min)"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        reporter = Reporter(Console(file=open("/dev/null", "w")), "lines")
        for log_every in (cfg.train.log_every, 1):
            run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"log_every": log_every})})
            run = RunDir.create(tmp, f"log{log_every}")
            trainer = Trainer(run_cfg, run, task, reporter)
            trainer.monitor = build_monitor(run_cfg)
            metrics = MetricsLogger(run.metrics_file)
            step_times(trainer, metrics, 2 * args.block, args.block)  # warmup
            times = step_times(trainer, metrics, args.steps, args.block)
            off, on = statistics.median(times["off"]), statistics.median(times["on"])
            best = min(times["on"]) / min(times["off"]) - 1
            table.add_row(str(log_every), f"{off * 1e3:.1f} ms", f"{on * 1e3:.1f} ms", f"{(on / off - 1) * 100:+.2f}%",
                          f"{best * 100:+.2f}%")
            metrics.close()
        console.print(table)
        console.print("(steps alternate on/off, so load from other processes hits both; the min column is the least noisy)")

        trainer = Trainer(cfg, None, task, Reporter(console, "lines"))
        started = time.perf_counter()
        run_preflight(trainer, trainer.reporter)
        console.print(f"preflight on the tiny-lm model and a real batch: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
