"""Model families by name: ``model.family`` in the config picks the builder."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from scratchlab.config import ModelConfig
from scratchlab.models.cascade import CascadeModel
from scratchlab.models.codec_lm import CodecLM
from scratchlab.models.lm import TransformerLM

FAMILIES: dict[str, Callable[[ModelConfig], nn.Module]] = {"lm": TransformerLM, "codec_lm": CodecLM,
                                                          "cascade": CascadeModel}


def build_model(cfg: ModelConfig) -> nn.Module:
    try:
        builder = FAMILIES[cfg.family]
    except KeyError:
        raise ValueError(f"unknown model.family {cfg.family!r}; known: {sorted(FAMILIES)}") from None
    return builder(cfg)
