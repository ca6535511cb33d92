"""What the trainer needs from a model family: its data, its batches, its one loss, its eval and demos.

The trainer (train/loop.py) owns everything family-independent: the optimizer, the
schedule, clipping, checkpoints, the metrics logger, the doctor's monitors, resume.
A `Task` owns everything that depends on what the tokens (or frames) are:

- ``configure``: fill the model config from the data (vocabulary size, codebooks, ...);
- ``train_batch``: one random training batch (from the one windowing function);
- ``loss``: the ONE loss function, used by training, evaluation and preflight;
- ``val_batch`` + ``eval_sums`` / ``eval_metrics``: validation on fixed batches through the one eval
  loop (`evaluate_task`: ``loss`` on every batch, ``val_loss`` a mean over targets, the family's extras);
- ``demo``: samples written under the run's ``demos/`` (never raises into training);
- ``describe_batch``: what ``data_step0.txt`` shows, so people look at step 0's data;
- ``write_assets``: what the run dir needs to sample on its own (tokenizer, data.json);
- ``preflight``: the doctor's checks that apply to this family.

A family is one folder under families/ whose ``__init__`` defines a ``FamilySpec`` (model builder,
task, sampler, exporters, extra monitors); families/registry.py maps ``model.family`` to it
(docs/families.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlab.config import Config, ModelConfig
from scratchlab.doctor.findings import Finding
from scratchlab.doctor.preflight import preflight
from scratchlab.loss import IGNORE_INDEX
from scratchlab.runs.store import RunDir

Batch = dict[str, torch.Tensor]


@dataclass
class LossOutput:
    """The result of the one loss function on one batch.

    ``loss`` is the figure people read (logged as ``loss`` in training, ``val_loss`` in eval);
    ``objective`` is what is back-propagated (``loss`` plus weighted auxiliary terms such as
    z-loss); ``logged`` holds extras logged under their own names (``z_loss``, ``loss_cb0``, ...)
    as detached 0-dim tensors ON THE DEVICE, averaged over micro-batches by the trainer and read
    to the host once per log row (never ``.item()`` here: a host sync per step, and a graph break
    in the compiled loss). Consumers outside training convert with ``float()``.
    """

    loss: torch.Tensor
    objective: torch.Tensor
    logged: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: torch.Tensor | None = None  # logits or predictions, for eval statistics


class Task(ABC):
    """A model family's side of training. Built once per run, from the resolved config."""

    family: str = ""

    def __init__(self, cfg: Config, announce: Any = None) -> None:
        self.cfg = cfg
        self.announce = announce  # callable(str) for progress lines, or None

    # -- set-up

    @abstractmethod
    def configure(self, cfg: Config) -> Config:
        """The config with data-dependent model fields filled in (or checked against the data)."""

    @property
    @abstractmethod
    def tokens_per_sample(self) -> int:
        """How many tokens (or frames) one training sample counts for in ``tokens`` and tokens/s."""

    @abstractmethod
    def data_summary(self) -> str:
        """One line about the data for the run's log."""

    @abstractmethod
    def write_assets(self, run: RunDir) -> None:
        """Files the run dir needs to be used on its own (tokenizer, data.json, ...)."""

    # -- batches and the loss

    @abstractmethod
    def train_batch(self, batch_size: int, generator: torch.Generator, rows: slice | None = None) -> Batch:
        """A random training batch of ``batch_size`` rows on the CPU; advances ``generator`` (the data position).

        ``rows``: build only these rows of it (a data-parallel rank's block). The generator advances
        exactly as for the whole batch (every random draw of every row is made; only the tokens of
        the other rows are not gathered), so the data position is the same on every rank and the
        rows are those a single process would see.
        """

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, precision: str = "fp32") -> LossOutput:
        """The one loss function: training, evaluation and preflight all call this.

        ``batch`` is already on the model's device. Run the forward under
        ``train.device.autocast(device, precision)`` and the loss itself in fp32. The trainer
        compiles this function whole (``train.compile``): no host reads (``.item()``, ``float()``,
        ``if tensor``) and no data-dependent shapes in it (tests/train/test_compile.py counts graph breaks).
        """

    def describe_batch(self, batch: Batch) -> str:
        """Human-readable view of a batch for data_step0.txt."""
        return "\n".join(f"{k}: shape {tuple(v.shape)} dtype {v.dtype}" for k, v in batch.items())

    # -- evaluation, demos, checks

    @abstractmethod
    def val_batch(self, index: int) -> Batch:
        """The ``index``-th fixed validation batch (of ``cfg.eval.batches``), on the CPU; the same on every call."""

    def eval_targets(self, batch: Batch) -> torch.Tensor | float:
        """What one batch's ``loss`` is a mean over: ``val_loss`` = sum(loss x targets) / sum(targets).

        Default: the targets in the loss (labels not IGNORE_INDEX), so ``val_loss`` is the mean over every
        target of every batch (as the training loss is over one batch's); 1 without labels (a mean of batch means).
        """
        return (batch["labels"] != IGNORE_INDEX).sum() if "labels" in batch else 1.0

    def eval_sums(self, batch: Batch, out: LossOutput) -> dict[str, Any]:
        """The family's per-batch figures to be summed over the batches (tensors or numbers: the loop
        converts each to a float once, at the end); ``out`` is ``loss`` on ``batch`` in eval mode."""
        return {}

    def eval_metrics(
        self, sums: dict[str, float], model: nn.Module, device: torch.device, precision: str
    ) -> dict[str, Any]:
        """The family's eval figures from the summed ``eval_sums`` (and anything measured once, still in eval
        mode without gradients); a ``val_loss`` here replaces the loop's (a family that pools differently)."""
        return {}

    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, Any]:
        """Validation metrics on the fixed batches (``val_loss`` first): the one eval loop, `evaluate_task`."""
        return evaluate_task(self, model, device, precision)

    def demo(self, model: nn.Module, step: int, out_dir: Path, device: torch.device, precision: str) -> str | None:
        """Write demo samples for ``step`` under ``out_dir``; return text to show, or None."""
        return None

    def demo_metrics(self) -> dict[str, Any]:
        """Figures measured on the last demo (e.g. codebook coverage), logged as a metrics row; a
        ``demo_audio`` list names the demo's .wav files in demos/, which the sinks log as audio."""
        return {}

    def preflight_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """The one loss as preflight calls it: on the doctor's fp32 copy of the model, in fp32."""
        return self.loss(model, batch, "fp32")

    def preflight(self, model: nn.Module, batch: Batch) -> list[Finding]:
        """The doctor's checks before step 0 that apply to this family (default: every generic check, with
        the family's loss). A family composes its own list from the doctor's units (``doctor.preflight.Check``).

        ``batch`` is the first training batch cut to a few samples (the trainer's PREFLIGHT_SAMPLES), on the device.
        """
        return preflight(model, batch, loss=self.preflight_loss, overfit_steps=self.cfg.doctor.overfit_steps)


def _floats(values: list[Any]) -> list[float]:
    """Per-batch figures as floats: tensors come to the host once (one stack), numbers as they are."""
    if values and all(torch.is_tensor(v) for v in values):
        return [float(v) for v in torch.stack([v.detach().reshape(()) for v in values]).tolist()]
    return [float(v) for v in values]


@torch.no_grad()
def evaluate_task(task: Task, model: nn.Module, device: torch.device, precision: str) -> dict[str, Any]:
    """The one eval loop of every family: ``task.loss`` on each fixed validation batch, in eval mode.

    ``val_loss`` is the mean of the batches' losses weighted by their ``eval_targets``: with the default,
    the mean over every target of every batch (not a mean of batch means). The family adds its figures:
    ``eval_sums`` per batch (summed), then ``eval_metrics`` once (lm: bits per byte and output statistics;
    codec: per-codebook losses; cascade: the copy baseline, RMS ratio, ...). The model's train/eval mode is
    restored. Values reach the host once, at the end.
    """
    was_training = model.training
    model.eval()
    try:
        losses: list[Any] = []
        targets: list[Any] = []
        sums: dict[str, list[Any]] = {}
        for index in range(task.cfg.eval.batches):
            batch = {k: v.to(device) for k, v in task.val_batch(index).items()}
            out = task.loss(model, batch, precision)
            losses.append(out.loss.detach())
            targets.append(task.eval_targets(batch))
            for key, value in task.eval_sums(batch, out).items():
                sums.setdefault(key, []).append(value)
        # Sums in float64, in batch order, once everything has run.
        counts = _floats(targets)
        weighted = sum(loss * n for loss, n in zip(_floats(losses), counts))
        row: dict[str, Any] = {"val_loss": weighted / max(sum(counts), 1e-12)}
        totals = {key: sum(_floats(values)) for key, values in sums.items()}
        row.update(task.eval_metrics(totals, model, device, precision))
    finally:
        model.train(was_training)
    return row


@dataclass
class LoadedRun:
    """A run dir with its config and a model restored from one of its checkpoints (eval mode)."""

    run: RunDir
    cfg: Config
    model: nn.Module
    checkpoint: Path

    @property
    def path(self) -> Path:
        return self.run.path


@dataclass
class SampleRequest:
    """What ``scratchlab sample`` asks of a family's sampler; each family reads the fields it uses."""

    prompt: str = ""  # lm: the text to continue; codec: the condition (text and tags)
    prompts: list[str] = field(default_factory=list)  # lm: several texts, continued in one batched generation
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    seconds: float | None = None  # codec / cascade: how much to generate
    cfg_scale: float = 1.0  # codec: classifier-free guidance
    n: int = 1
    out: str | Path | None = None  # where files go (default RUN/samples)
    audio: bool = False  # codec: also decode to .wav with the data's codec
    warn: Callable[[str], None] | None = None

    def all_prompts(self) -> list[str]:
        """``prompts`` when given, else the one ``prompt``."""
        return list(self.prompts) or [self.prompt]


@dataclass(frozen=True)
class Exporter:
    """One export format of a family: ``check`` refuses from the config alone (before any weights are
    read), ``write`` exports a loaded run and returns the line to show."""

    check: Callable[[Config, Path], None]
    write: Callable[[LoadedRun, Path], str]


@dataclass(frozen=True)
class FamilySpec:
    """Everything scratchlab needs to know about one model family; the registry's only content.

    ``sample`` turns a loaded run and a request into lines to print (text, or the paths it wrote);
    ``exporters`` maps a format name (``hf``) to its Exporter;
    ``monitors`` builds the family's own monitor units (doctor.monitors.Monitor) from the config; they run
    after the generic ones, in training and in ``scratchlab doctor`` (registry.build_monitor).
    """

    name: str
    model: Callable[[ModelConfig], nn.Module]
    task: type[Task]
    sample: Callable[[LoadedRun, SampleRequest], list[str]]
    config_section: str | None = None  # model.<section> valid only for this family (codec, cascade)
    exporters: dict[str, Exporter] = field(default_factory=dict)
    monitors: Callable[[Config], list] | None = None
    description: str = ""
