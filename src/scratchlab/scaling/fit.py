"""Fit a scaling law to your own runs: L(N, D) = E + A/N^alpha + B/D^beta, and the IsoFLOP method.

The parametric fit follows Hoffmann et al. 2022 (approach 3, appendix D.2): minimise the
Huber loss (delta = 1e-3) between log predicted and log observed loss, with
log L_hat = LSE(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b, E = e^e), by L-BFGS
from the best points of their grid of initialisations. The objective is summed, not averaged,
over runs: Besiroglu et al. 2024 traced Hoffmann's too-narrow intervals to an average that
made L-BFGS stop early. Uncertainty is a bootstrap over runs.

The IsoFLOP method (approach 2) groups runs of equal compute C = 6ND, fits a parabola of loss
against log N in each group, takes its minimum as N_opt(C), and fits N_opt = G C^a across groups.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchlab.errors import UserError
from scratchlab.scaling.laws import FLOPS_PER_PARAM_TOKEN, LossLaw

HUBER_DELTA = 1e-3
# Hoffmann et al. 2022, appendix D.2: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}
INIT_GRID = {
    "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "e": [-1.0, -0.5, 0.0, 0.5, 1.0],
    "alpha": [0.0, 0.5, 1.0, 1.5, 2.0],
    "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
}
PARAMS = ("a", "b", "e", "alpha", "beta")


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunPoint:
    """One finished run: non-embedding params N, tokens trained D, final validation loss."""

    n: float
    d: float
    loss: float
    run_dir: str = ""

    @property
    def compute(self) -> float:
        return FLOPS_PER_PARAM_TOKEN * self.n * self.d


def _final_val_loss(run_dir: Path, status: dict) -> float | None:
    from scratchlab.runs import read_metrics

    value = status.get("val_loss")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    evals = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if isinstance(r.get("val_loss"), (int, float))]
    return float(evals[-1]) if evals and math.isfinite(evals[-1]) else None


def read_run(path: str | Path) -> tuple[RunPoint | None, str]:
    """(the run's point, "") or (None, why it is skipped). N is counted on the model built on the meta device."""
    from scratchlab.config import build_config, read_source
    from scratchlab.families.registry import build_model
    from scratchlab.runs import RunDir

    run = RunDir.open(path)
    status = run.status()
    if status.get("status") != "finished":
        return None, f"status {status.get('status', 'unknown')} (only finished runs are fitted)"
    cfg = build_config(read_source(run.config_file))
    if cfg.model.vocab_size is None:
        return None, "config.yaml has no model.vocab_size"
    with torch.device("meta"):
        model = build_model(cfg.model)
    if not hasattr(model, "num_params"):
        return None, f"model family '{cfg.model.family}' does not count its non-embedding parameters (num_params)"
    n = float(model.num_params(exclude_embeddings=True))
    t = cfg.train
    tokens = status.get("tokens") or status.get("step", t.max_steps) * t.batch_size * t.grad_accum * t.seq_len
    loss = _final_val_loss(run.path, status)
    if loss is None:
        return None, "no finite final val_loss"
    return RunPoint(n, float(tokens), loss, str(run.path)), ""


def _run_dirs_under(root: Path) -> list[Path]:
    try:  # the run index's walker (sweep sub-folders included)
        from scratchlab.runs.index import find_run_dirs
    except ImportError:
        return sorted(p.parent for pattern in ("*/config.yaml", "*/*/config.yaml") for p in root.glob(pattern))
    return find_run_dirs(root)


def collect_runs(
    paths: list[str | Path] = (), root: str | Path | None = None
) -> tuple[list[RunPoint], list[tuple[str, str]]]:
    """The finished runs among ``paths`` and the run dirs under ``root``; and (path, reason) for those skipped."""
    dirs = [Path(p) for p in paths]
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"--root {root} is not a directory; give the folder that holds your run dirs (e.g. runs/)")
        dirs += _run_dirs_under(root)
    if not dirs:
        raise UserError("give run dirs (scratchlab scaling fit runs/A runs/B ...) or --root runs/")
    points, skipped = [], []
    for d in dict.fromkeys(dirs):  # keep order, drop duplicates
        point, why = read_run(d)
        if point is None:
            skipped.append((str(d), why))
        else:
            points.append(point)
    return points, skipped


# ---------------------------------------------------------------- parametric fit (approach 3)


def _objective(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Summed Huber loss of log-space residuals; theta [..., 5] = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta.unbind(-1)
    terms = torch.stack(
        [a[..., None] - alpha[..., None] * log_n, b[..., None] - beta[..., None] * log_d,
         e[..., None].expand(*e.shape, log_n.shape[-1])], dim=-1,
    )
    pred = torch.logsumexp(terms, dim=-1)
    return torch.nn.functional.huber_loss(pred, log_l.expand_as(pred), delta=delta, reduction="none").sum(-1)


def _lbfgs(theta0: torch.Tensor, log_n, log_d, log_l, delta: float) -> tuple[torch.Tensor, float]:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = _objective(theta, log_n, log_d, log_l, delta)
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        value = float(_objective(theta, log_n, log_d, log_l, delta))
    return theta.detach(), value


def _fit_once(log_n, log_d, log_l, delta: float, starts: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """L-BFGS from the k best of ``starts`` (objective evaluated on all of them at once); the best result."""
    with torch.no_grad():
        values = _objective(starts, log_n, log_d, log_l, delta)
    order = torch.argsort(values)[:k]
    best_theta, best_value = starts[order[0]], math.inf
    for i in order.tolist():
        theta, value = _lbfgs(starts[i], log_n, log_d, log_l, delta)
        if math.isfinite(value) and value < best_value:
            best_theta, best_value = theta, value
    return best_theta, best_value


def init_grid() -> torch.Tensor:
    return torch.tensor(list(itertools.product(*(INIT_GRID[p] for p in PARAMS))), dtype=torch.float64)


@dataclass
class Interval:
    estimate: float
    std: float
    low: float  # 2.5th percentile of the bootstrap
    high: float  # 97.5th


@dataclass
class LawFit:
    law: LossLaw
    n_runs: int
    objective: float
    intervals: dict[str, Interval] = field(default_factory=dict)  # E, A, B, alpha, beta, a (N_opt ~ C^a)
    bootstrap: int = 0

    def coefficients(self) -> dict[str, float]:
        law = self.law
        return {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta, "a": law.a}


def _law_from(theta: torch.Tensor, n_runs: int) -> LossLaw:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return LossLaw("fit", E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                   source=f"fitted to {n_runs} runs (Huber delta {HUBER_DELTA:g}, L-BFGS; Hoffmann et al. 2022 approach 3)")


def fit_law(n, d, loss, *, delta: float = HUBER_DELTA, bootstrap: int = 200, seed: int = 0, starts: int = 10) -> LawFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to arrays of params, tokens and losses, with a bootstrap over runs."""
    log_n, log_d, log_l = (torch.log(torch.as_tensor(np.asarray(x, dtype=np.float64))) for x in (n, d, loss))
    if log_n.ndim != 1 or not (len(log_n) == len(log_d) == len(log_l)):
        raise UserError("scaling fit needs one N, D and loss per run")
    if len(log_n) < 5:
        raise UserError(f"a 5-coefficient law needs at least 5 finished runs (got {len(log_n)}); train more runs, "
                        "e.g. from `scratchlab scaling sweep`")
    if not all(torch.isfinite(t).all() for t in (log_n, log_d, log_l)):
        raise UserError("scaling fit needs positive, finite N, D and loss for every run")
    grid = init_grid()
    theta, value = _fit_once(log_n, log_d, log_l, delta, grid, starts)
    law = _law_from(theta, len(log_n))
    result = LawFit(law, len(log_n), value, bootstrap=bootstrap)
    if bootstrap <= 0:
        return result
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(bootstrap):
        idx = torch.randint(len(log_n), (len(log_n),), generator=gen)
        # warm start from the full fit, plus the best grid point of the resample: cheap and robust
        boot_starts = torch.cat([theta[None], grid])
        t, v = _fit_once(log_n[idx], log_d[idx], log_l[idx], delta, boot_starts, 2)
        if math.isfinite(v):
            samples.append(t)
    if samples:
        s = torch.stack(samples)
        alpha, beta = s[:, 3], s[:, 4]
        columns = {"E": torch.exp(s[:, 2]), "A": torch.exp(s[:, 0]), "B": torch.exp(s[:, 1]), "alpha": alpha,
                   "beta": beta, "a": beta / (alpha + beta)}
        estimates = result.coefficients()
        for name, col in columns.items():
            col = col[torch.isfinite(col)]
            result.intervals[name] = Interval(
                estimates[name], float(col.std()) if len(col) > 1 else 0.0,
                float(torch.quantile(col, 0.025)), float(torch.quantile(col, 0.975)),
            )
    return result


# ---------------------------------------------------------------- IsoFLOP parabolas (approach 2)


@dataclass
class IsoFlopGroup:
    compute: float  # geometric mean of the group's 6ND
    points: list[RunPoint]
    parabola: tuple[float, float, float] | None = None  # loss = c2 x^2 + c1 x + c0, x = ln N
    n_opt: float | None = None
    note: str = ""


@dataclass
class IsoFlopFit:
    groups: list[IsoFlopGroup]
    a: float | None = None  # N_opt = G C^a
    a_se: float | None = None
    G: float | None = None

    def n_opt(self, compute: float) -> float | None:
        return None if self.a is None else self.G * compute**self.a


def group_by_compute(points: list[RunPoint], tolerance: float = 0.25) -> list[list[RunPoint]]:
    """Runs whose 6ND lie within ``tolerance`` (relative) of the group's smallest: one IsoFLOP group each."""
    groups: list[list[RunPoint]] = []
    for p in sorted(points, key=lambda p: p.compute):
        if groups and p.compute <= groups[-1][0].compute * (1 + tolerance):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def isoflop_fit(points: list[RunPoint], tolerance: float = 0.25) -> IsoFlopFit:
    """Approach 2: per group of equal compute with >= 3 model sizes, the parabola's minimum; then N_opt ~ C^a."""
    groups = []
    for members in group_by_compute(points, tolerance):
        c = math.exp(sum(math.log(p.compute) for p in members) / len(members))
        g = IsoFlopGroup(c, members)
        sizes = {p.n for p in members}
        if len(sizes) < 3:
            g.note = f"{len(sizes)} model size(s); a parabola needs 3"
        else:
            x = np.log([p.n for p in members])
            c2, c1, c0 = np.polyfit(x, [p.loss for p in members], 2)
            g.parabola = (float(c2), float(c1), float(c0))
            if c2 <= 0:
                g.note = "no minimum (the parabola opens downwards): widen the range of sizes"
            else:
                x_opt = -c1 / (2 * c2)
                g.n_opt = float(math.exp(x_opt))
                if not x.min() <= x_opt <= x.max():
                    g.note = "minimum outside the sizes tried (extrapolated)"
        groups.append(g)
    fit = IsoFlopFit(groups)
    usable = [g for g in groups if g.n_opt is not None]
    if len(usable) >= 2:
        lc = np.log([g.compute for g in usable])
        ln = np.log([g.n_opt for g in usable])
        slope, intercept = np.polyfit(lc, ln, 1)
        fit.a, fit.G = float(slope), float(math.exp(intercept))
        if len(usable) >= 3:
            resid = ln - (slope * lc + intercept)
            s2 = float(resid @ resid) / (len(usable) - 2)
            fit.a_se = math.sqrt(s2 / float(((lc - lc.mean()) ** 2).sum()))
    return fit
