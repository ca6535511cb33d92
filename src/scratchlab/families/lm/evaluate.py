"""The lm family's eval figures, added to the one eval loop (`families.base.evaluate_task`).

The loop computes ``val_loss`` with the family loss (the mean over every target of the fixed windows);
these add, per batch and then once:

- ``val_bpb``: bits per byte, counting only targets that are text (special tokens have 0 bytes and are
  left out of both sums), so the figure does not depend on the tokenizer. It needs the loss of each
  target: `loss.token_loss` (the family loss's function) with ``reduction="none"`` on the same logits.
- ``val_entropy``: the mean entropy (nats) of the predicted distribution over the targets in the loss,
  and ``val_logit_max``: the mean over windows of each window's max |logit| (both on every
  STATS_STRIDE-th position; the doctor's entropy_collapse and logit_growth monitors read them);
- ``val_attn_logit_max``: a model's ``attention_logit_max`` probe on the first batch, when it has one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from scratchlab.doctor.probes import output_stats
from scratchlab.loss import token_loss
from scratchlab.runtime import autocast


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, byte_table: torch.Tensor) -> dict[str, Any]:
    """One batch's share of the lm figures (summed over the batches by the loop)."""
    losses = token_loss(logits, labels, reduction="none")
    nbytes = byte_table[labels.reshape(-1)]
    entropy, counted, logit_max = output_stats(logits, labels)
    return {"text_nats": losses[nbytes > 0].sum(), "text_bytes": nbytes.sum(), "entropy": entropy,
            "entropy_count": counted, "logit_max": logit_max, "windows": labels.shape[0]}


def metrics(sums: dict[str, float], model: nn.Module, first_batch: Callable[[], dict[str, torch.Tensor]],
            device: torch.device, precision: str) -> dict[str, float]:
    """``val_bpb``, ``val_entropy``, ``val_logit_max`` from the sums, and ``val_attn_logit_max`` when measured."""
    row = {
        "val_bpb": sums["text_nats"] / math.log(2) / max(1, sums["text_bytes"]),
        "val_entropy": sums["entropy"] / max(1, sums["entropy_count"]),
        "val_logit_max": sums["logit_max"] / max(1, sums["windows"]),
    }
    probe = getattr(model, "attention_logit_max", None)
    if callable(probe):  # one batch of the same fixed windows is enough to watch the trend
        with autocast(device, precision):
            row["val_attn_logit_max"] = probe(first_batch()["input_ids"].to(device))
    return row


def byte_table(token_bytes: np.ndarray, device: torch.device) -> torch.Tensor:
    """UTF-8 bytes per token id (0 for special tokens), on ``device``."""
    return torch.from_numpy(token_bytes.astype(np.int64)).to(device)
