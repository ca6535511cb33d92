"""PNG of a scaling fit: loss against tokens per model size with the fitted law, and the IsoFLOP parabolas.

matplotlib is a core dependency (the run records' plots use it too); it is imported here, lazily,
only to keep `scratchlab` start-up fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scratchlab.errors import UserError
from scratchlab.scaling.fit import IsoFlopFit, LawFit, RunPoint


def _matplotlib():
    # A bare Figure (Agg canvas), never pyplot: no display, no global figure state.
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UserError(f"matplotlib, a dependency of scratchlab, does not import ({exc}); reinstall it "
                        "(pip install -e .) or pass --no-plot") from exc
    return Figure, colormaps


def plot_fit(points: list[RunPoint], law_fit: LawFit | None, iso: IsoFlopFit | None, path: str | Path) -> Path:
    Figure, colormaps = _matplotlib()
    path = Path(path)
    fig = Figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    sizes = sorted({p.n for p in points})
    cmap = colormaps["viridis"]
    colour = {n: cmap(i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}

    for n in sizes:
        pts = sorted((p for p in points if p.n == n), key=lambda p: p.d)
        left.scatter([p.d for p in pts], [p.loss for p in pts], color=colour[n], s=18, label=f"N={n:.3g}")
        if law_fit is not None:
            lo, hi = min(p.d for p in points), max(p.d for p in points)
            d = np.geomspace(lo / 1.5, hi * 1.5, 100)
            left.plot(d, [law_fit.law.loss(n, x) for x in d], color=colour[n], lw=1)
    left.set_xscale("log")
    left.set_xlabel("training tokens D")
    left.set_ylabel("final validation loss (nats/token)")
    title = "runs and fitted L(N, D)" if law_fit is not None else "runs"
    if law_fit is not None:
        law = law_fit.law
        title += f"\nE={law.E:.3g}  A={law.A:.3g}  B={law.B:.3g}  alpha={law.alpha:.3f}  beta={law.beta:.3f}"
    left.set_title(title, fontsize=9)
    if len(sizes) <= 12:
        left.legend(fontsize=7)

    groups = [g for g in (iso.groups if iso else []) if len({p.n for p in g.points}) >= 2]
    if groups:
        gmap = colormaps["plasma"]
        for i, g in enumerate(groups):
            c = gmap(0.85 * i / max(1, len(groups) - 1))  # the palette's last yellow is hard to see
            pts = sorted(g.points, key=lambda p: p.n)
            right.scatter([p.n for p in pts], [p.loss for p in pts], color=c, s=18, label=f"C={g.compute:.2g}")
            if g.parabola is not None:
                x = np.linspace(np.log(pts[0].n) - 0.3, np.log(pts[-1].n) + 0.3, 100)
                right.plot(np.exp(x), np.polyval(g.parabola, x), color=c, lw=1)
            if g.n_opt is not None:
                right.axvline(g.n_opt, color=c, ls=":", lw=1)
        right.set_xscale("log")
        right.set_xlabel("non-embedding parameters N")
        right.set_ylabel("final validation loss")
        sub = f"N_opt ~ C^{iso.a:.3f}" if iso and iso.a is not None else "IsoFLOP groups"
        right.set_title(f"IsoFLOP parabolas: {sub}", fontsize=9)
        right.legend(fontsize=7)
    elif law_fit is not None:
        observed = [p.loss for p in points]
        predicted = [law_fit.law.loss(p.n, p.d) for p in points]
        right.scatter(observed, predicted, s=18)
        lo, hi = min(observed + predicted), max(observed + predicted)
        right.plot([lo, hi], [lo, hi], color="grey", lw=1)
        right.set_xlabel("observed loss")
        right.set_ylabel("fitted loss")
        right.set_title("fit vs observed (no IsoFLOP groups)", fontsize=9)
    else:
        right.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
