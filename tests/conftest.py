"""Shared fixtures: a small real corpus (stdlib source), a prepared data dir, tiny-model overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from scratchlab.data.text import prepare_text, stdlib_files


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Nothing in the tests may write to the user's ~/.cache.
    monkeypatch.setenv("SCRATCHLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    # Test models are tiny: threads gain nothing, and on a shared 2-core machine two OpenMP
    # threads competing with another process run ~50x slower (spin-waits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_corpus(n_docs: int = 60, max_chars: int = 4000) -> list[str]:
    """Real text: the first characters of some standard-library modules."""
    docs = []
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="ignore")[:max_chars]
        if len(text) > 500:
            docs.append(text)
        if len(docs) == n_docs:
            break
    return docs


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return small_corpus()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus) -> Path:
    return prepare_text(corpus, tmp_path_factory.mktemp("data"), vocab_size=400, val_fraction=0.1)


def tiny_overrides(data_dir: Path, out_dir: Path, **extra) -> list[str]:
    """Overrides for a model that trains a few steps in about a second."""
    values = {
        "data.path": str(data_dir),
        "model.n_layers": 2,
        "model.d_model": 32,
        "model.n_heads": 2,
        "model.max_seq_len": 64,
        "train.seq_len": 32,
        "train.batch_size": 4,
        "train.max_steps": 8,
        "train.log_every": 1,
        "train.save_every": 4,
        "train.out_dir": str(out_dir),
        "train.precision": "fp32",
        "optim.warmup_steps": 2,
        "eval.every": 4,
        "eval.batches": 2,
        "eval.batch_size": 4,
        "demo.every": 4,
        "demo.max_new_tokens": 8,
        "demo.prompts": "['def ']",
        "log.progress": "lines",
        # The tests' tiny runs keep the plain recipe (AdamW, no QK-norm, no zero-init, clip 1: the doctor's
        # calibrations, FSDP, the optimizer-state layouts); the preset's Muon recipe is tested on its own
        # (test_optim.py, the export's qk-norm case, and the slow end-to-end default run).
        "optim.name": "adamw",
        "model.qk_norm": "false",
        "model.zero_init_out": "false",
        "train.clip.max_norm": 1.0,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def quiet():
    """A console that prints nowhere (the tests read the run dir, not the screen)."""
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))


def run_tiny(data_dir: Path, out_dir: Path, **extra):
    """Train the tiny model for a few steps through the library entry point; returns the TrainResult."""
    from scratchlab.config import load_config
    from scratchlab.train import train

    return train(load_config("tiny-lm", tiny_overrides(data_dir, out_dir, **extra)), console=quiet())


# Run records (compare / report / runs): env.json's git state pinned, so a strict A/B does not depend on
# whether the checkout running the tests happens to be dirty.
PINNED_GIT = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False, "diff_sha256": None}


def run_pinned(data_dir: Path, out_dir: Path, crash_at_eval: bool = False, **extra) -> Path:
    """A tiny real run with a pinned git state; ``crash_at_eval`` makes its first eval raise (a real crashed run)."""
    from scratchlab.train.loop import Trainer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("scratchlab.runs.store.git_info", lambda cwd=None: dict(PINNED_GIT))
        if not crash_at_eval:
            return run_tiny(data_dir, out_dir, **extra).run_dir

        def boom(self, *args, **kwargs):
            raise RuntimeError("simulated crash in eval")

        mp.setattr(Trainer, "evaluate", boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_tiny(data_dir, out_dir, **extra)
        return max(Path(out_dir).iterdir(), key=lambda p: p.name)


@pytest.fixture(scope="session")
def record_runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Real tiny runs shared by the run-record tests: `a` and `b` differ only in optim.lr; `crashed` died at step 4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "a": run_pinned(data_dir, tmp_path_factory.mktemp("runs_a"), optim__lr=3e-3),
            "b": run_pinned(data_dir, tmp_path_factory.mktemp("runs_b"), optim__lr=1e-3),
            "crashed": run_pinned(data_dir, tmp_path_factory.mktemp("runs_c"), crash_at_eval=True, optim__lr=3e-3,
                                  train__name="crashed"),  # its own name: never the same dir name as `a`
        }
    finally:
        torch.set_num_threads(threads)


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def copy_cut_after(run: Path, to: Path, checkpoint: str = "step_000004") -> Path:
    """A copy of ``run`` as if it had been killed right after ``checkpoint``: the later checkpoints and best dropped."""
    import shutil

    from scratchlab.runs.checkpoint import step_checkpoints

    shutil.copytree(run, to)
    for ckpt in step_checkpoints(to / "checkpoints"):
        if ckpt.name != checkpoint:
            shutil.rmtree(ckpt)
    shutil.rmtree(to / "checkpoints" / "best")
    return to
