"""Evaluation on fixed validation windows, with the training loss function."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from scratchlab.data.windows import get_batch
from scratchlab.doctor.probes import output_stats
from scratchlab.loss import token_loss
from scratchlab.runtime import autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    device: torch.device,
    precision: str = "fp32",
    stats: dict[str, float] | None = None,
) -> tuple[float, float]:
    """Mean loss (nats/token) and bits per byte on fixed windows, with the training loss function.

    Bits per byte counts only targets that are text (special tokens have 0 bytes and are
    left out of both sums), so the figure does not depend on the tokenizer.

    If ``stats`` is given it is filled with the output statistics of the same windows (the
    doctor's entropy_collapse and logit_growth monitors read them from the eval rows):
    ``val_entropy``, the mean entropy (nats) of the predicted distribution over the targets
    in the loss, and ``val_logit_max``, the mean over windows of each window's max |logit|
    (both on every STATS_STRIDE-th position of the windows).
    """
    was_training = model.training
    model.eval()
    nats, targets, text_nats, text_bytes = 0.0, 0, 0.0, 0
    entropy_sum, entropy_count, logit_max_sum, windows = 0.0, 0, 0.0, 0
    byte_table = torch.from_numpy(token_bytes.astype(np.int64)).to(device)
    for i in range(n_batches):
        batch = get_batch(tokens, seq_len, batch_size, "fixed", batch_index=i, count=n_batches * batch_size)
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with autocast(device, precision):
            logits = model(input_ids)
        losses = token_loss(logits, labels, reduction="none")
        nats += losses.sum().item()
        targets += labels.numel()
        nbytes = byte_table[labels.reshape(-1)]
        text_nats += losses[nbytes > 0].sum().item()
        text_bytes += int(nbytes.sum().item())
        if stats is not None:
            entropy, counted, logit_max = output_stats(logits, labels)
            entropy_sum, entropy_count = entropy_sum + entropy, entropy_count + counted
            logit_max_sum, windows = logit_max_sum + logit_max, windows + labels.shape[0]
    if stats is not None:
        stats["val_entropy"] = entropy_sum / max(1, entropy_count)
        stats["val_logit_max"] = logit_max_sum / max(1, windows)
        probe = getattr(model, "attention_logit_max", None)
        if callable(probe):  # one batch of the same fixed windows is enough to watch the trend
            first = get_batch(tokens, seq_len, batch_size, "fixed", batch_index=0, count=n_batches * batch_size)
            with autocast(device, precision):
                stats["val_attn_logit_max"] = probe(first["input_ids"].to(device))
    model.train(was_training)
    return nats / targets, text_nats / math.log(2) / max(1, text_bytes)
