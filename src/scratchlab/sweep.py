"""`scratchlab sweep`: run a grid of configs one after another, and compare them.

    scratchlab sweep tiny-lm --grid optim.lr=1e-4,3e-4,1e-3 model.n_layers=4,8 [--budget-tokens N]

The grid is the cartesian product of the listed values (values are YAML, as in any override;
commas inside [...] or {...} do not split). CONFIG may also be a folder of YAML configs (what
`scratchlab scaling sweep` writes): each file is crossed with the grid.

Every run of a sweep goes to ``<train.out_dir>/<sweep id>/`` with ``train.name`` set to
``<sweep id>-<NN>``, and gets a ``sweep.json`` (sweep id, index, the grid values). The sweep's
own ``sweep.json`` in that folder lists every point with its status, rewritten after each run,
so a sweep cut short still says what ran. A run that fails (bad value, crash, divergence) is
recorded as failed and the sweep goes on. ``--dry-run`` prints the commands (plain, torchrun or
a Slurm array script) instead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from scratchlab.config import Config, load_config
from scratchlab.errors import UserError

LAUNCHERS = ("python", "torchrun", "slurm")


# ---------------------------------------------------------------- the grid


def _split_values(raw: str) -> list[str]:
    """'1e-4,3e-4' -> ['1e-4', '3e-4']; commas inside brackets or quotes stay ('[0,1],[0.5]' -> two values)."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['optim.lr=1e-4,3e-4', 'model.n_layers=4,8'] -> {'optim.lr': ['1e-4', '3e-4'], 'model.n_layers': ['4', '8']}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"--grid item '{item}' must look like section.key=v1,v2 (e.g. optim.lr=1e-4,3e-4)")
        values = _split_values(raw)
        if any(v == "" for v in values):
            raise UserError(f"--grid item '{item}' has an empty value; list values separated by commas")
        if key in grid:
            raise UserError(f"--grid names '{key}' twice; give all its values in one item ({key}=v1,v2,...)")
        grid[key] = values
    return grid


def config_sources(config: str | Path) -> list[str]:
    """A preset or YAML file -> [it]; a folder -> its YAML files, sorted."""
    path = Path(config)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        if not files:
            raise UserError(f"sweep folder {path} has no .yaml configs; give a preset, a YAML file or a folder of them")
        return files
    return [str(config)]


# ---------------------------------------------------------------- the points


@dataclass
class SweepPoint:
    index: int
    source: str  # preset name or YAML path
    values: dict[str, str]  # the grid values of this point
    overrides: list[str]  # everything passed to load_config: fixed overrides, grid values, budget, name, out_dir
    name: str
    status: str = "pending"  # finished | stopped | failed | diverged | pending
    run_dir: str | None = None
    error: str | None = None
    steps: int | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    wall_s: float | None = None


@dataclass
class Sweep:
    sweep_id: str
    root: Path  # <train.out_dir>/<sweep id>: the runs and the sweep's sweep.json
    grid: dict[str, list[str]]
    points: list[SweepPoint]
    budget_tokens: int | None = None
    comparison: str | None = None  # compare_runs(...).markdown() over the finished runs
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.status == "finished" for p in self.points)

    def to_json(self) -> dict[str, Any]:
        return {"sweep_id": self.sweep_id, "grid": self.grid, "budget_tokens": self.budget_tokens,
                "points": [asdict(p) for p in self.points]}


def new_sweep_id(config: str | Path, grid: dict[str, list[str]]) -> str:
    digest = hashlib.sha1(f"{config}|{sorted(grid.items())}|{time.time_ns()}".encode()).hexdigest()[:4]
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{digest}"


def _budget_steps(cfg: Config, budget_tokens: int) -> int:
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len
    steps = budget_tokens // per_step
    if steps < 1:
        raise UserError(f"--budget-tokens {budget_tokens:,} is below one step ({per_step:,} tokens = batch_size x "
                        "grad_accum x seq_len); raise the budget")
    return steps


def resolve_point(point: SweepPoint, budget_tokens: int | None) -> Config:
    """The point's validated config; with a token budget, train.max_steps = budget / tokens per step."""
    cfg = load_config(point.source, point.overrides)
    if budget_tokens is not None:
        point.overrides.insert(len(point.overrides) - 2, f"train.max_steps={_budget_steps(cfg, budget_tokens)}")
        cfg = load_config(point.source, point.overrides)
    point.steps = cfg.train.max_steps
    return cfg


def make_points(config: str | Path, grid: dict[str, list[str]], sweep_id: str, overrides: list[str] = (),
                out_dir: str | Path | None = None) -> tuple[Path, list[SweepPoint]]:
    """Every (config file x grid value) point, named and placed under <out_dir>/<sweep id>/."""
    sources = config_sources(config)
    if out_dir is None:  # the first config's own train.out_dir (a bad config falls back to runs/)
        try:
            out_dir = load_config(sources[0], list(overrides)).train.out_dir
        except UserError:
            out_dir = "runs"
    root = Path(out_dir) / sweep_id
    keys = list(grid)
    combos = list(itertools.product(*(grid[k] for k in keys))) or [()]
    points = []
    for i, (source, combo) in enumerate(itertools.product(sources, combos)):
        values = dict(zip(keys, combo))
        name = f"{sweep_id}-{i:02d}"
        ovr = [*overrides, *(f"{k}={v}" for k, v in values.items()), f"train.name={name}", f"train.out_dir={root}"]
        points.append(SweepPoint(i, source, values, ovr, name))
    return root, points


# ---------------------------------------------------------------- running


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _find_run_dir(root: Path, name: str) -> Path | None:
    found = sorted(p for p in root.glob(f"*-{name}") if (p / "config.yaml").is_file())
    return found[-1] if found else None


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_sweep(
    config: str | Path,
    grid: dict[str, list[str]],
    *,
    budget_tokens: int | None = None,
    overrides: list[str] = (),
    out_dir: str | Path | None = None,
    console: Console | None = None,
    train_fn: Callable[..., Any] | None = None,
) -> Sweep:
    """Run every point in turn with ``scratchlab.train.train``; failures are recorded and the sweep goes on."""
    from scratchlab.train import train as default_train
    from scratchlab.train.loop import TrainingDiverged

    train_fn = train_fn or default_train
    console = console or Console()
    if budget_tokens is not None and budget_tokens < 1:
        raise UserError(f"--budget-tokens must be a positive number of tokens (got {budget_tokens})")
    sweep_id = new_sweep_id(config, grid)
    root, points = make_points(config, grid, sweep_id, list(overrides), out_dir)
    sweep = Sweep(sweep_id, root, grid, points, budget_tokens)
    manifest = root / "sweep.json"
    _write_json(manifest, sweep.to_json())
    console.print(f"sweep {sweep_id}: {len(points)} runs in {root}", markup=False, highlight=False)
    interrupted = False
    for point in points:
        label = ", ".join(f"{k}={v}" for k, v in point.values.items()) or Path(point.source).name
        console.print(f"[{point.index + 1}/{len(points)}] {label}", style="bold", markup=False, highlight=False)
        started = time.time()
        try:
            cfg = resolve_point(point, budget_tokens)
            result = train_fn(cfg, console=console)
            point.run_dir = str(result.run_dir)
            point.val_loss, point.val_bpb = _finite(result.val_loss), _finite(result.val_bpb)
            point.steps = result.step
            if result.status == "stopped":  # Ctrl-C inside the run: it saved; the sweep stops too
                point.status, interrupted = "stopped", True
            elif point.val_loss is None:
                point.status, point.error = "diverged", f"final val_loss is {result.val_loss}"
            else:
                point.status = "finished"
        except KeyboardInterrupt:
            point.status, point.error, interrupted = "stopped", "interrupted", True
        except TrainingDiverged as exc:
            point.status, point.error = "diverged", str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad run must not end the sweep; the error is recorded
            error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            point.status, point.error = "failed", error
        point.wall_s = round(time.time() - started, 2)
        if point.run_dir is None:
            found = _find_run_dir(root, point.name)
            point.run_dir = str(found) if found else None
        if point.run_dir:
            _write_json(Path(point.run_dir) / "sweep.json", {
                "sweep_id": sweep_id, "index": point.index, "values": point.values, "source": point.source,
                "status": point.status, "error": point.error, "sweep": str(manifest),
            })
        if point.status != "finished":
            console.print(f"  {point.status}: {point.error or ''}", style="red", markup=False, highlight=False)
        _write_json(manifest, sweep.to_json())
        if interrupted:
            sweep.notes.append(f"interrupted at run {point.index + 1} of {len(points)}")
            break
    sweep.comparison = _compare(sweep)
    return sweep


def _compare(sweep: Sweep) -> str | None:
    """compare_runs over the finished runs (scratchlab.runs.compare), as markdown; None when it cannot."""
    dirs = [p.run_dir for p in sweep.points if p.status == "finished" and p.run_dir]
    if len(dirs) < 2:
        return None
    try:
        from scratchlab.runs.compare import compare_runs
    except ImportError:
        return None
    try:
        return compare_runs(dirs, metric="val_loss").markdown()
    except Exception as exc:  # noqa: BLE001 - the sweep's own table and sweep.json stand without it
        sweep.notes.append(f"compare_runs failed: {type(exc).__name__}: {exc}")
        return None


def render_sweep(sweep: Sweep, console: Console) -> None:
    table = Table(title=f"sweep {sweep.sweep_id}")
    table.add_column("#", justify="right")
    for key in sweep.grid:
        table.add_column(key)
    if any(Path(p.source).suffix in (".yaml", ".yml") for p in sweep.points) and len({p.source for p in sweep.points}) > 1:
        table.add_column("config")
    multi_source = len(table.columns) > len(sweep.grid) + 1
    for col in ("status", "steps", "val loss", "val bpb", "run dir / error"):
        table.add_column(col)
    finished = [p for p in sweep.points if p.val_loss is not None and p.status == "finished"]
    best = min(finished, key=lambda p: p.val_loss) if finished else None
    for p in sweep.points:
        row = [str(p.index)] + [p.values.get(k, "") for k in sweep.grid]
        if multi_source:
            row.append(Path(p.source).name)
        where = p.run_dir if p.status == "finished" else (p.error or p.run_dir or "")
        row += [p.status, "" if p.steps is None else str(p.steps),
                "" if p.val_loss is None else f"{p.val_loss:.4f}" + (" *" if p is best else ""),
                "" if p.val_bpb is None else f"{p.val_bpb:.4f}", where]
        table.add_row(*row, style=None if p.status == "finished" else "red")
    console.print(table)
    console.print(f"sweep record: {sweep.root / 'sweep.json'}  (* = lowest val loss)", markup=False, highlight=False)
    for note in sweep.notes:
        console.print(f"note: {note}", style="yellow", markup=False)
    if sweep.comparison:
        console.print(sweep.comparison, markup=False, highlight=False, soft_wrap=True)  # keep table rows whole


# ---------------------------------------------------------------- dry run


def dry_run(
    config: str | Path,
    grid: dict[str, list[str]],
    *,
    launcher: str = "python",
    nproc: int = 1,
    budget_tokens: int | None = None,
    overrides: list[str] = (),
    out_dir: str | Path | None = None,
) -> str:
    """The commands the sweep would run (nothing is written): one per line, or a Slurm array script."""
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)} (got '{launcher}')")
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1 (got {nproc})")
    sweep_id = new_sweep_id(config, grid)
    root, points = make_points(config, grid, sweep_id, list(overrides), out_dir)
    distributed = launcher == "torchrun" or nproc > 1
    prefix = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "scratchlab", "train"] if distributed \
        else ["scratchlab", "train"]
    commands, invalid = [], []
    for p in points:
        try:
            resolve_point(p, budget_tokens)
        except UserError as exc:
            invalid.append(f"# point {p.index} is invalid and would fail: {exc}")
        commands.append(shlex.join([*prefix, p.source, *p.overrides]))
    if launcher != "slurm":
        return "\n".join([f"# sweep {sweep_id}: {len(points)} runs into {root}", *invalid, *commands])
    array = "\n".join(f"  {shlex.quote(c)}" for c in commands)
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={sweep_id}",
        f"#SBATCH --array=0-{len(commands) - 1}",
        "#SBATCH --nodes=1",
        f"#SBATCH --gpus-per-node={nproc}",
        f"#SBATCH --output=slurm-{sweep_id}-%a.out",
        *invalid,
        f"mkdir -p {shlex.quote(str(root))}",
        "CMDS=(",
        array,
        ")",
        'eval "${CMDS[$SLURM_ARRAY_TASK_ID]}"',
    ])
