"""How the doctor's checks run a model: fp32 outputs of any output shape, forwards and losses under a fixed
seed (identical dropout masks), and the caller's RNG states preserved."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], Any]  # (model, batch) -> PreflightLoss / LossOutput


def model_outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` in fp32, unwrapping ``.logits`` / ``["logits"]`` / a tuple's first item."""
    out = model(ids)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if logits is None:
        logits = out
    if not torch.is_tensor(logits):
        raise TypeError(f"forward returned {type(out).__name__}; expected logits or an object with .logits")
    if ids.is_floating_point():  # continuous frames [B, T, F] -> outputs [B, T', F'] on the same time axis
        if logits.ndim != ids.ndim or logits.shape[0] != ids.shape[0]:
            raise ValueError(f"outputs of shape {tuple(logits.shape)} for continuous inputs of shape "
                             f"{tuple(ids.shape)}; expected [B, T, F] for [B, T, F]")
        return logits.float()
    if logits.ndim != ids.ndim + 1 or tuple(logits.shape[: ids.ndim]) != tuple(ids.shape):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for input_ids of shape {tuple(ids.shape)}; "
                         "expected [B, T, V] for [B, T] or [B, T, K, V] for [B, T, K]")
    return logits.float()


def rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Everything inside may draw random numbers; the caller's torch, numpy and random states come back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=rng_devices(device)):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def seeded_forward(model: nn.Module, ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A forward with the same RNG state every time, so two forwards draw identical dropout masks."""
    with torch.random.fork_rng(devices=rng_devices(ids.device)):
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: it would queue CUDA seeding
        if ids.device.type == "cuda":
            with torch.cuda.device(ids.device):
                torch.cuda.manual_seed(seed)
        return model_outputs(model, ids)


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return fallback


def seeded_loss(loss_fn: LossFn, model: nn.Module, batch: Mapping[str, torch.Tensor], seed: int = 0) -> Any:
    """``loss_fn`` with the same RNG state every time (identical dropout masks), like `seeded_forward`."""
    device = model_device(model, torch.device("cpu"))
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        return loss_fn(model, batch)
