"""`scratchlab scaling fit`: read finished runs, fit both methods, print and plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scratchlab.scaling.fit import IsoFlopFit, LawFit, RunPoint, collect_runs, fit_law, isoflop_fit
from scratchlab.scaling.plan import human


@dataclass
class FitReport:
    points: list[RunPoint]
    skipped: list[tuple[str, str]]
    law_fit: LawFit | None
    law_error: str = ""
    iso: IsoFlopFit | None = None
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out: dict = {
            "runs": [{"run_dir": p.run_dir, "N": p.n, "D": p.d, "loss": p.loss, "C": p.compute} for p in self.points],
            "skipped": [{"run_dir": d, "reason": r} for d, r in self.skipped],
        }
        if self.law_fit is not None:
            out["law"] = {
                "coefficients": self.law_fit.coefficients(),
                "intervals": {k: vars(v) for k, v in self.law_fit.intervals.items()},
                "bootstrap": self.law_fit.bootstrap,
                "objective": self.law_fit.objective,
            }
        elif self.law_error:
            out["law_error"] = self.law_error
        if self.iso is not None:
            out["isoflop"] = {
                "a": self.iso.a, "a_se": self.iso.a_se, "G": self.iso.G,
                "groups": [{"C": g.compute, "runs": len(g.points), "n_opt": g.n_opt, "note": g.note}
                           for g in self.iso.groups],
            }
        if self.plot is not None:
            out["plot"] = str(self.plot)
        return out


def fit_runs(paths: list[str] = (), root: str | None = None, bootstrap: int = 100, plot: str | Path | None = None,
             seed: int = 0) -> FitReport:
    """Fit L(N, D) and the IsoFLOP method to the finished runs among ``paths`` / under ``root``."""
    from scratchlab.errors import UserError

    points, skipped = collect_runs(list(paths), root)
    report = FitReport(points, skipped, None)
    try:
        report.law_fit = fit_law([p.n for p in points], [p.d for p in points], [p.loss for p in points],
                                 bootstrap=bootstrap, seed=seed)
    except UserError as exc:  # too few runs for 5 coefficients: still show the runs and the IsoFLOP view
        report.law_error = str(exc)
    if points:
        report.iso = isoflop_fit(points)
    if report.law_fit is not None and len({p.n for p in points}) < 3:
        report.notes.append("fewer than 3 model sizes: alpha and A are barely constrained")
    if report.law_fit is not None and len({p.d for p in points}) < 3:
        report.notes.append("fewer than 3 token counts: beta and B are barely constrained")
    if plot is not None and points:
        from scratchlab.scaling.plot import plot_fit

        report.plot = plot_fit(points, report.law_fit, report.iso, plot)
    return report


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def render_fit_report(r: FitReport, console: Console) -> None:
    runs = Table(title=f"{len(r.points)} finished runs")
    for col in ("run", "N (non-emb)", "D tokens", "C = 6ND", "val loss"):
        runs.add_column(col)
    for p in r.points:
        runs.add_row(Path(p.run_dir).name, human(p.n), human(p.d), f"{p.compute:.3g}", f"{p.loss:.4f}")
    console.print(runs)
    for d, why in r.skipped:
        console.print(f"skipped {d}: {why}", markup=False, highlight=False)

    if r.law_fit is not None:
        t = Table(title=f"L(N, D) = E + A/N^alpha + B/D^beta  ({r.law_fit.n_runs} runs, bootstrap {r.law_fit.bootstrap})")
        for col in ("coefficient", "estimate", "std", "95% interval"):
            t.add_column(col)
        for name, value in r.law_fit.coefficients().items():
            iv = r.law_fit.intervals.get(name)
            label = "a (N_opt ~ C^a)" if name == "a" else name
            if iv is None:
                t.add_row(label, _fmt(value), "", "")
            else:
                t.add_row(label, _fmt(value), _fmt(iv.std), f"[{_fmt(iv.low)}, {_fmt(iv.high)}]")
        console.print(t)
        console.print("method: Huber (delta 1e-3) on log loss, L-BFGS from Hoffmann et al. 2022's init grid (approach 3)",
                      markup=False, highlight=False)
    else:
        console.print(f"no L(N, D) fit: {r.law_error}", markup=False, highlight=False)

    if r.iso is not None and any(len(g.points) > 1 for g in r.iso.groups):
        g_t = Table(title="IsoFLOP groups (approach 2)")
        for col in ("C", "runs", "N_opt (parabola min)", "note"):
            g_t.add_column(col)
        for g in r.iso.groups:
            g_t.add_row(f"{g.compute:.3g}", str(len(g.points)), human(g.n_opt) if g.n_opt else "-", g.note)
        console.print(g_t)
        if r.iso.a is not None:
            se = f" +- {r.iso.a_se:.3f}" if r.iso.a_se is not None else ""
            console.print(f"N_opt = {r.iso.G:.3g} C^{r.iso.a:.3f}{se}  (D_opt ~ C^{1 - r.iso.a:.3f})",
                          markup=False, highlight=False)
    for note in r.notes:
        console.print(f"note: {note}", style="yellow", markup=False)
    if r.plot is not None:
        console.print(f"plot: {r.plot}", markup=False, highlight=False)
