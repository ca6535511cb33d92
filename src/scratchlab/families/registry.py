"""The family registry: ``model.family`` -> its FamilySpec. The only place that names the families.

Adding a family is one folder under families/ with a ``SPEC`` in its ``__init__`` and one line here
(docs/families.md).
"""

from __future__ import annotations

import difflib

from torch import nn

from scratchlab.config import Config, ModelConfig
from scratchlab.doctor.monitors import MonitorConfig, RunMonitor, configured_monitors
from scratchlab.errors import UserError
from scratchlab.families import cascade, codec, lm
from scratchlab.families.base import FamilySpec, Task

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (lm.SPEC, codec.SPEC, cascade.SPEC)}


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        hint = difflib.get_close_matches(name, FAMILIES, n=1)
        guess = f"did you mean '{hint[0]}'? " if hint else ""
        raise UserError(f"unknown model.family {name!r}; {guess}known: {', '.join(sorted(FAMILIES))}") from None


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg.family``, freshly initialised."""
    return get_family(cfg.family).model(cfg)


def build_task(cfg: Config, announce=None) -> tuple[Config, Task]:
    """The family's task (its data loaded) and the config with data-dependent model fields filled in."""
    task = get_family(cfg.model.family).task(cfg, announce)
    return task.configure(cfg), task


def build_monitor(cfg: Config) -> RunMonitor:
    """The run's monitors: the generic ones (thresholds from the config's warmups), those its config turns
    on, then its family's own units (``FamilySpec.monitors``)."""
    spec = get_family(cfg.model.family)
    family = spec.monitors(cfg) if spec.monitors is not None else []
    return RunMonitor(MonitorConfig.from_config(cfg), extra=[*configured_monitors(cfg), *family])
