"""Open a finished (or stopped) run for use: its config and a model restored from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from scratchlab.config import build_config, read_source
from scratchlab.families.base import LoadedRun
from scratchlab.families.registry import build_model
from scratchlab.runs.checkpoint import load_weights, resolve_checkpoint
from scratchlab.runs.store import RunDir
from scratchlab.runtime import resolve_device


def load_run(run_dir: str | Path, checkpoint: str | None = None, device: str = "cpu",
             purpose: str = "load") -> LoadedRun:
    """The run's config and model (eval mode) from its best checkpoint, else the latest, or the named one."""
    run = RunDir.open(run_dir)
    cfg = build_config(read_source(run.config_file))
    ckpt = resolve_checkpoint(run.checkpoints, checkpoint, purpose=purpose)
    model = build_model(cfg.model).to(resolve_device(device))
    load_weights(model, ckpt)
    model.eval()
    return LoadedRun(run=run, cfg=cfg, model=model, checkpoint=ckpt)
