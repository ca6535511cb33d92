"""Scaling laws: plan a compute budget, fit your own runs, generate IsoFLOP sweeps.

- laws.py: published loss laws (Hoffmann et al. 2022, Besiroglu et al. 2024, Muennighoff et al. 2023), C = 6ND
- plan.py: compute-optimal N, D, epochs and data-constrained advice, with lm shapes (shapes.py, gpus.py)
- fit.py: L(N, D) fit (Huber + L-BFGS, bootstrap) and the IsoFLOP-parabola method; report.py, plot.py
- isoflop.py: the IsoFLOP sweep configs
"""

from scratchlab.scaling.fit import LawFit, RunPoint, collect_runs, fit_law, isoflop_fit
from scratchlab.scaling.isoflop import isoflop_sweep
from scratchlab.scaling.laws import LAWS, LossLaw, get_law
from scratchlab.scaling.plan import Plan, plan, render_plan
from scratchlab.scaling.report import FitReport, fit_runs, render_fit_report
from scratchlab.scaling.shapes import Shape, pick_shapes

__all__ = [
    "LAWS", "FitReport", "LawFit", "LossLaw", "Plan", "RunPoint", "Shape", "collect_runs", "fit_law", "fit_runs",
    "get_law", "isoflop_fit", "isoflop_sweep", "pick_shapes", "plan", "render_fit_report", "render_plan",
]
