"""`scratchlab export RUN --format F`: the run's family exports its checkpoint (families/registry.py)."""

from __future__ import annotations

from pathlib import Path

from scratchlab.config import build_config, read_source
from scratchlab.errors import UserError
from scratchlab.families.registry import get_family
from scratchlab.runs.load import load_run
from scratchlab.runs.store import RunDir


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "hf", checkpoint: str | None = None) -> str:
    """Export a run's best (or latest, or named) checkpoint; returns the line to show.

    The format's checks run on the config alone, before any weights are read.
    """
    run = RunDir.open(run_dir)
    cfg = build_config(read_source(run.config_file))
    exporters = get_family(cfg.model.family).exporters
    if fmt not in exporters:
        known = ", ".join(sorted(exporters)) or "none"
        raise UserError(f"--format {fmt}: a {cfg.model.family} run exports to: {known}")
    exporters[fmt].check(cfg, Path(out_dir))
    return exporters[fmt].write(load_run(run.path, checkpoint, purpose="export"), Path(out_dir))
