"""What the trainer needs from a model family: its data, its batches, its one loss, its eval and demos.

The trainer (train/loop.py) owns everything family-independent: the optimizer, the
schedule, clipping, checkpoints, the metrics logger, the doctor's monitors, resume.
A `Task` owns everything that depends on what the tokens (or frames) are:

- ``configure``: fill the model config from the data (vocabulary size, codebooks, ...);
- ``train_batch``: one random training batch (from the one windowing function);
- ``loss``: the ONE loss function, used by training, evaluation and preflight;
- ``evaluate``: validation figures on fixed windows (``val_loss`` and family extras);
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
from scratchlab.runs.store import RunDir

Batch = dict[str, torch.Tensor]


@dataclass
class LossOutput:
    """The result of the one loss function on one batch.

    ``loss`` is the figure people read (logged as ``loss`` in training, ``val_loss`` in eval);
    ``objective`` is what is back-propagated (``loss`` plus weighted auxiliary terms such as
    z-loss); ``logged`` holds detached extras logged under their own names (``z_loss``,
    ``loss_cb0``, ...), averaged over micro-batches by the trainer.
    """

    loss: torch.Tensor
    objective: torch.Tensor
    logged: dict[str, float] = field(default_factory=dict)
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
    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A random training batch on the CPU; advances ``generator`` (the data position)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, precision: str = "fp32") -> LossOutput:
        """The one loss function: training, evaluation and preflight all call this.

        ``batch`` is already on the model's device. Run the forward under
        ``train.device.autocast(device, precision)`` and the loss itself in fp32.
        """

    def describe_batch(self, batch: Batch) -> str:
        """Human-readable view of a batch for data_step0.txt."""
        return "\n".join(f"{k}: shape {tuple(v.shape)} dtype {v.dtype}" for k, v in batch.items())

    # -- evaluation, demos, checks

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        """Validation metrics on fixed windows; must include ``val_loss``."""

    def demo(self, model: nn.Module, step: int, out_dir: Path, device: torch.device, precision: str) -> str | None:
        """Write demo samples for ``step`` under ``out_dir``; return text to show, or None."""
        return None

    def demo_metrics(self) -> dict[str, Any]:
        """Figures measured on the last demo (e.g. codebook coverage), logged as a metrics row; a
        ``demo_audio`` list names the demo's .wav files in demos/, which the sinks log as audio."""
        return {}

    def preflight(self, model: nn.Module, batch: Batch) -> list[Finding]:
        """The doctor's checks before step 0 that apply to this family.

        ``batch`` is the first training batch cut to a few samples (the trainer's PREFLIGHT_SAMPLES), on the device.
        """
        return []


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
    ``monitors`` builds the family's extra in-training monitors from the config.
    """

    name: str
    model: Callable[[ModelConfig], nn.Module]
    task: type[Task]
    sample: Callable[[LoadedRun, SampleRequest], list[str]]
    config_section: str | None = None  # model.<section> valid only for this family (codec, cascade)
    exporters: dict[str, Exporter] = field(default_factory=dict)
    monitors: Callable[[Config], list] | None = None
    description: str = ""
