"""`scratchlab sample RUN`: load the run, then hand it to its family's sampler (families/registry.py)."""

from __future__ import annotations

from pathlib import Path

from scratchlab.families.base import SampleRequest
from scratchlab.families.registry import get_family
from scratchlab.runs.load import load_run


def sample_run(run_dir: str | Path, request: SampleRequest | None = None, *, checkpoint: str | None = None,
               device: str = "cpu") -> list[str]:
    """Sample from a run's best (or latest, or named) checkpoint; returns the lines to show (text or paths)."""
    loaded = load_run(run_dir, checkpoint, device, purpose="sample from")
    return get_family(loaded.cfg.model.family).sample(loaded, request or SampleRequest())
