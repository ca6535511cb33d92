"""Time-to-loss race: training recipes side by side, seed by seed, step by step.

Usage::

    python benchmarks/time_to_loss.py                       # tiny-lm-adamw (400 steps) vs tiny-lm (Muon, 250)
    python benchmarks/time_to_loss.py --max-steps 100 --eval-every 25 --seeds 2
    python benchmarks/time_to_loss.py --recipe "adamw=" --recipe "muon=optim.name=muon,optim.muon_lr=0.02" \\
        --recipe "mine=my.yaml,optim.lr=1e-3" --set train.precision=fp32 --target 2.0

A **recipe** is ``NAME=ITEMS``: comma-separated items, each a dotted override (``optim.name=muon``) or a
preset name / YAML path (the base instead of ``--preset``). ``--set`` overrides apply to every recipe
(before the recipe's own). The first recipe is the baseline.

What it does: every (recipe, seed) run is built as ``scratchlab train`` builds it (``torch.manual_seed``
then ``build_model``, ``build_optimizer``, the data generator seeded with the run's seed: the same seed
gives every recipe the same data order and the same draw of initial weights where shapes agree), then
the runs advance ONE optimizer step each in turn (round-robin), so load on the machine hits all of
them alike. Each step is the trainer's (per-group LR schedule, clip schedule, grad_accum, autocast,
the MoE aux loss) without its logging, checkpoints or doctor. Every ``--eval-every`` steps (and at the
end, and at step 0) each run evaluates on the fixed validation batches (``eval.batches``).

Reported, per recipe (mean over seeds, and the spread):

- **tokens / steps / wall s to target**: the first crossing of ``--target`` val bits/byte, linearly
  interpolated between the two evals around it ("-" where a seed never reaches it; then the mean is
  "-" too). Wall s is the run's own training-step time (evals excluded), summed. The target defaults
  to the baseline's final val bits/byte (its worst seed, so that every baseline seed reaches it): "how
  soon does each recipe reach where the baseline ends".
- **val bpb at equal tokens**: at the smallest training budget of the race (the end, when every recipe
  trains the same tokens) and at half of it, interpolated between evals. Recipes may train different
  budgets (``train.max_steps=300`` in one recipe): each follows its own schedule and stops at its own
  end, so "equal tokens" compares a short recipe at its end with a longer one part way through its
  schedule (what a user choosing between the two presets gets for that many tokens).
- **opt step %**: the optimizer step's share of the training-step time (Muon's Newton-Schulz
  included), median over steps.
- **clipped %**: the share of steps after the warmups whose pre-clip grad norm was above the clip
  threshold (the doctor's ``clip_saturated`` fires at 50 % over 100 steps).

Writes ``OUT/time_to_loss.json`` (every eval of every run) and ``OUT/time_to_loss.png`` (val bits/byte
against tokens, mean over seeds with the min-max band, the target as a line). ``--plot-only`` redraws
the table and plot from a JSON written earlier; ``--merge A.json B.json`` from the runs of several (e.g.
one process per seed, ``--set train.seed=1338 --seeds 1``, to use more cores: each is interleaved within).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from scratchlab.config import Config, load_config
from scratchlab.errors import UserError
from scratchlab.families.registry import build_model, build_task
from scratchlab.runtime import resolve_device, resolve_precision
from scratchlab.train.optim import build_optimizer, clip_threshold_at, lr_at

DEFAULT_RECIPES = [  # the old default against the new one, each with its own budget (docs/recipes.md)
    "adamw=tiny-lm-adamw",
    "tiny-lm=tiny-lm",
]


# ---------------------------------------------------------------- recipes


def split_items(text: str) -> list[str]:
    """Split on commas outside brackets (``demo.prompts=[a,b]`` stays one item)."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [i.strip() for i in items if i.strip()]


def parse_recipe(spec: str, preset: str, common: list[str]) -> tuple[str, str, list[str]]:
    """``"muon=optim.name=muon,optim.muon_lr=0.02"`` -> (name, base preset/YAML, overrides)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip():
        raise UserError(f"--recipe '{spec}' must look like NAME=ITEMS (e.g. muon=optim.name=muon,optim.muon_lr=0.02)")
    base, overrides = preset, []
    for item in split_items(rest):
        if "=" in item:
            overrides.append(item)
        else:
            base = item
    return name.strip(), base, [*common, *overrides]


# ---------------------------------------------------------------- one run


@dataclass
class RunRecord:
    recipe: str
    seed: int
    tokens_per_step: int
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "wall_s", "val_loss", "val_bpb"}
    step_s: list[float] = field(default_factory=list)
    opt_s: list[float] = field(default_factory=list)
    clipped: list[bool] = field(default_factory=list)  # per step: the pre-clip grad norm was above the threshold
    warmup_steps: int = 0  # the clip and LR warmups (clipping is expected there)


class Racer:
    """One (recipe, seed) run that trains one step at a time, as the trainer's train_step does."""

    def __init__(self, recipe: str, cfg: Config, task, seed: int) -> None:
        self.cfg, self.task = cfg, task
        self.device = resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        torch.manual_seed(seed)
        self.model = build_model(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=self.device.type == "cuda")
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.record = RunRecord(recipe, seed, cfg.train.batch_size * cfg.train.grad_accum * task.tokens_per_sample,
                                warmup_steps=max(cfg.optim.warmup_steps, cfg.train.clip.warmup_steps))

    def train_step(self) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg.optim, cfg.train.max_steps, group.get("base_lr"))
        self.model.train()
        for _ in range(cfg.train.grad_accum):
            batch = {k: v.to(self.device) for k, v in self.task.train_batch(cfg.train.batch_size, self.gen).items()}
            out = self.task.loss(self.model, batch, self.precision)
            objective = out.objective
            aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else None
            if aux is not None:
                objective = objective + aux
            (objective / cfg.train.grad_accum).backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        threshold = clip_threshold_at(self.step, cfg.train.clip)
        norm = torch.nn.utils.clip_grad_norm_(params, threshold)
        self.record.clipped.append(bool(norm > threshold))  # a sync per step: fine for a CPU race
        opt_started = time.perf_counter()
        self.optimizer.step()
        if hasattr(self.model, "after_optimizer_step"):
            self.model.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
        self.record.opt_s.append(done - opt_started)
        self.record.step_s.append(done - started)
        self.step += 1

    def evaluate(self) -> None:
        val = self.task.evaluate(self.model, self.device, self.precision)
        self.record.evals.append({
            "step": self.step, "tokens": self.step * self.record.tokens_per_step,
            "wall_s": sum(self.record.step_s), "val_loss": float(val["val_loss"]),
            "val_bpb": float(val.get("val_bpb", math.nan)),
        })


# ---------------------------------------------------------------- figures


def crossing(evals: list[dict], target: float) -> dict | None:
    """Tokens, steps and wall s at the first eval at or below ``target``, interpolated from the previous eval."""
    previous = None
    for row in evals:
        if row["val_bpb"] <= target:
            if previous is None or previous["val_bpb"] <= target:
                return {k: row[k] for k in ("tokens", "step", "wall_s")}
            frac = (previous["val_bpb"] - target) / (previous["val_bpb"] - row["val_bpb"])
            return {k: previous[k] + frac * (row[k] - previous[k]) for k in ("tokens", "step", "wall_s")}
        previous = row
    return None


def bpb_at(evals: list[dict], tokens: float) -> float | None:
    """Val bits/byte after ``tokens`` training tokens, interpolated between the evals around it."""
    for before, after in zip(evals, evals[1:]):
        if before["tokens"] <= tokens <= after["tokens"]:
            span = after["tokens"] - before["tokens"]
            frac = (tokens - before["tokens"]) / span if span else 1.0
            return before["val_bpb"] + frac * (after["val_bpb"] - before["val_bpb"])
    return evals[0]["val_bpb"] if evals and evals[0]["tokens"] == tokens else None


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def summarize(records: list[RunRecord], target: float) -> list[dict]:
    """One row per recipe (in first-seen order): means over seeds."""
    names = list(dict.fromkeys(r.recipe for r in records))
    equal_tokens = min(r.evals[-1]["tokens"] for r in records)  # the smallest budget: every run has trained it
    rows = []
    for name in names:
        runs = [r for r in records if r.recipe == name]
        hits = [crossing(r.evals, target) for r in runs]
        finals = [r.evals[-1]["val_bpb"] for r in runs]
        opt_share = [statistics.median(o / s for o, s in zip(r.opt_s, r.step_s)) for r in runs]
        rows.append({
            "recipe": name, "seeds": [r.seed for r in runs], "reached": sum(h is not None for h in hits),
            "tokens_to_target": _mean([h and h["tokens"] for h in hits]),
            "steps_to_target": _mean([h and h["step"] for h in hits]),
            "wall_s_to_target": _mean([h and h["wall_s"] for h in hits]),
            "final_tokens": runs[0].evals[-1]["tokens"], "final_bpb": statistics.fmean(finals),
            "final_bpb_spread": (min(finals), max(finals)),
            "equal_tokens": equal_tokens, "equal_bpb": _mean([bpb_at(r.evals, equal_tokens) for r in runs]),
            "mid_tokens": equal_tokens / 2, "mid_bpb": _mean([bpb_at(r.evals, equal_tokens / 2) for r in runs]),
            "opt_step_share": statistics.fmean(opt_share),
            # the doctor's clip_saturated signal: the clipped share of the steps after the warmups
            "clipped_share": _mean([statistics.fmean(r.clipped[r.warmup_steps:]) if r.clipped[r.warmup_steps:]
                                    else None for r in runs]),
            "step_s": statistics.fmean(statistics.median(r.step_s) for r in runs),
        })
    base = rows[0]
    for row in rows:
        row["tokens_ratio"] = (row["tokens_to_target"] / base["tokens_to_target"]
                               if row["tokens_to_target"] and base["tokens_to_target"] else None)
        row["bpb_gain"] = base["equal_bpb"] - row["equal_bpb"]  # at equal tokens (the smallest budget)
    return rows


def print_table(console: Console, rows: list[dict], target: float) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    table = Table(title=f"time to val bits/byte <= {target:.4f} (mean over seeds; first recipe = baseline)")
    for col in ("recipe", "reached", "tokens to target", "x base", "steps", "wall s", "trained tokens",
                "final bpb (min-max)", "bpb @ equal", "gain", "bpb @ half", "clipped %", "opt step %", "step s"):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for r in rows:
        lo, hi = r["final_bpb_spread"]
        table.add_row(
            r["recipe"], f"{r['reached']}/{len(r['seeds'])}", fmt(r["tokens_to_target"], ",.0f"),
            fmt(r["tokens_ratio"], ".2f"), fmt(r["steps_to_target"], ".0f"), fmt(r["wall_s_to_target"], ".1f"),
            f"{r['final_tokens']:,}", f"{r['final_bpb']:.4f} ({lo:.3f}-{hi:.3f})", fmt(r["equal_bpb"], ".4f"),
            fmt(r["bpb_gain"], "+.4f"), fmt(r["mid_bpb"], ".4f"),
            fmt(r.get("clipped_share") and 100 * r["clipped_share"], ".0f"), f"{100 * r['opt_step_share']:.1f}",
            f"{r['step_s']:.3f}",
        )
    console.print(table)
    console.print(f"equal = after {rows[0]['equal_tokens']:,} tokens (the smallest budget); half = after "
                  f"{rows[0]['mid_tokens']:,.0f} tokens; gain = the baseline's bpb @ equal minus the recipe's; "
                  "clipped % = steps after the warmups whose grad norm was clipped; "
                  "wall s = the run's own training-step time (interleaved runs, evals excluded)")


def plot(records: list[RunRecord], target: float, path: Path) -> None:
    from matplotlib.figure import Figure  # the Agg canvas: no display needed

    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r.recipe for r in records):
        runs = [r for r in records if r.recipe == name]
        n = min(len(r.evals) for r in runs)
        tokens = [runs[0].evals[i]["tokens"] for i in range(n)]
        values = [[r.evals[i]["val_bpb"] for r in runs] for i in range(n)]
        (line,) = ax.plot(tokens, [statistics.fmean(v) for v in values], marker="o", ms=3, label=name)
        ax.fill_between(tokens, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.3f}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val bits/byte")
    ax.set_ylim(top=min(ax.get_ylim()[1], target + 1.5))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"time to loss ({len(records) // max(1, len({r.recipe for r in records}))} seeds each: mean, min-max)")
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------- main


def save_partial(path: Path, records: list[RunRecord]) -> None:
    """The runs so far (after each eval round): a long race stopped early still leaves its curves."""
    path.write_text(json.dumps({"command": " ".join(sys.argv), "partial": True, "runs": [asdict(r) for r in records]}))


def race(args: argparse.Namespace, console: Console) -> list[RunRecord]:
    common = list(args.set)
    if args.max_steps:
        common.append(f"train.max_steps={args.max_steps}")
    specs = [parse_recipe(s, args.preset, common) for s in (args.recipe or DEFAULT_RECIPES)]
    if len({s[0] for s in specs}) != len(specs):
        raise UserError("--recipe names must be unique")
    racers, tasks = [], {}
    for name, base, overrides in specs:
        cfg = load_config(base, overrides)
        data_key = json.dumps([cfg.model.family, cfg.data.model_dump(mode="json")], sort_keys=True)
        if data_key not in tasks:  # recipes on the same data share its loading; each has its own task (its cfg)
            tasks[data_key] = build_task(cfg, lambda msg: console.print(msg, style="dim"))[1]
        task = copy.copy(tasks[data_key])
        cfg = task.configure(cfg)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        for i in range(args.seeds):
            racers.append(Racer(name, cfg, task, cfg.train.seed + i))
        console.print(f"{name}: {base} {' '.join(overrides)}", style="cyan")
    steps = max(r.cfg.train.max_steps for r in racers)
    started = time.perf_counter()
    for racer in racers:  # the starting point: every curve (and the first crossing) begins at step 0
        racer.evaluate()
    for step in range(1, steps + 1):
        # round-robin: one step each, so machine noise hits every run alike; a shorter budget stops at its end
        running = [r for r in racers if r.step < r.cfg.train.max_steps]
        for racer in running:
            racer.train_step()
        evaluated = [r for r in running if step % args.eval_every == 0 or step == r.cfg.train.max_steps]
        for racer in evaluated:
            racer.evaluate()
        if evaluated:
            save_partial(args.out / "time_to_loss.partial.json", [r.record for r in racers])
            line = "  ".join(f"{r.record.recipe}/{r.record.seed} {r.record.evals[-1]['val_bpb']:.4f}"
                             for r in evaluated)
            console.print(f"step {step}/{steps} ({time.perf_counter() - started:.0f} s): val bpb {line}")
    return [r.record for r in racers]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-lm", help="base preset or YAML of every recipe (default tiny-lm)")
    p.add_argument("--recipe", action="append", metavar="NAME=ITEMS",
                   help="a recipe (repeatable); default: " + " | ".join(DEFAULT_RECIPES))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe")
    p.add_argument("--seeds", type=int, default=2, help="seeds per recipe (train.seed, +1, ...); default 2")
    p.add_argument("--max-steps", "--steps", dest="max_steps", type=int, default=0,
                   help="train.max_steps of every recipe (the schedule follows it; a recipe's own "
                        "train.max_steps wins); default: the preset's")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evals (default 50)")
    p.add_argument("--target", type=float, default=None,
                   help="val bits/byte to reach (default: the baseline's final val bits/byte, worst seed)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/time_to_loss"), help="folder for JSON and PNG")
    p.add_argument("--plot-only", action="store_true", help="redraw table and plot from OUT/time_to_loss.json")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="table and plot of the runs of several earlier JSONs (e.g. one process per seed), into OUT")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)  # the table is wide; logs should keep it whole
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        data_file = args.out / "time_to_loss.json"
        if args.plot_only or args.merge:
            saved = [json.loads(f.read_text()) for f in (args.merge or [data_file])]
            records = [RunRecord(**r) for one in saved for r in one["runs"]]
            command = " ; ".join(one.get("command", "") for one in saved)
        else:
            if args.seeds < 1 or args.eval_every < 1:
                raise UserError("--seeds and --eval-every must be >= 1")
            records = race(args, console)
            command = " ".join(["python benchmarks/time_to_loss.py", *sys.argv[1:]]) if argv is None else ""
        baseline = [r for r in records if r.recipe == records[0].recipe]
        target = args.target if args.target is not None else max(r.evals[-1]["val_bpb"] for r in baseline)
        rows = summarize(records, target)
        print_table(console, rows, target)
        data_file.write_text(json.dumps({"command": command, "target": target, "summary": rows,
                                         "runs": [asdict(r) for r in records]}, indent=1))
        console.print(f"wrote {data_file}")
        if not args.no_plot:
            plot(records, target, args.out / "time_to_loss.png")
            console.print(f"wrote {args.out / 'time_to_loss.png'}")
    except UserError as exc:
        console.print(f"error: {exc}", style="bold red", markup=False)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
