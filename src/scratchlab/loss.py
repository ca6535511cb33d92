"""The ONE loss function, used by training and evaluation alike.

Field note: special tokens were removed from the training loss but the eval loss
still counted them, because train and eval had their own loss code. Here both call
`token_loss`; which targets count is decided by the batch's ``labels`` (-100 =
ignored), made once in the data layer.

Everything here is free of host syncs and of data-dependent shapes (no ``.item()``, no
boolean-mask indexing, no ``if tensor``), so that the trainer compiles the whole loss with
the model (one graph, no graph break) and a training step never waits on the device.
The ``.float()`` upcasts are fused by ``torch.compile`` into the cross-entropy kernel: the
compiled step never holds an fp32 copy of the full logits (eager mode does, as before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in fp32 over every label that is not IGNORE_INDEX.

    ``logits`` [..., V] and ``labels`` [...] (any leading shape). ``reduction`` is
    ``mean``, ``sum`` or ``none`` (per-target losses, 0 where ignored).
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``token_loss(hidden @ weight.T, labels)`` without the full logits: torch's chunked ``linear_cross_entropy``.

    The chunked path (``LinearCrossEntropyOptions``, torch >= 2.13) computes the logits a chunk of rows
    at a time in forward and backward. It is opaque to ``torch.compile`` (a graph break at the op) and,
    measured with ``benchmarks/train_throughput.py --ce 1024x256x50304`` (fp32, one CPU thread), it
    takes 5.7 s where the compiled plain path (``token_loss`` on the logits, inside the compiled loss)
    takes 1.7 s: so the trainer does not use it. Kept, tested equal to the plain path, for measuring
    it on a GPU (``--ce 16384x768x50304``), where it saves the logits' memory.
    """
    return F.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
        ignore_index=IGNORE_INDEX, options=torch.nn.LinearCrossEntropyOptions(),
    )


def z_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PaLM's auxiliary z-loss: mean of logsumexp(logits)^2 over the targets in the loss.

    It keeps the softmax normaliser near 1, so the output logits cannot drift upwards
    (a cause of late loss spikes). Added to the loss as ``train.z_loss * z_loss`` and
    logged on its own; the reported loss stays the cross-entropy. (A masked sum over a
    count, not ``lse[kept]``: the same mean without a data-dependent shape.)
    """
    lse = logits.reshape(-1, logits.shape[-1]).float().logsumexp(dim=-1)
    kept = labels.reshape(-1) != IGNORE_INDEX
    return (lse.pow(2) * kept).sum() / kept.sum().clamp(min=1)


def codebook_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: list[float] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multi-codebook loss: ``token_loss`` per codebook, then their weighted mean.

    ``logits`` [B, T, K, V], ``labels`` [B, T, K]. Returns (weighted mean, per-codebook losses);
    a codebook with no target in the batch contributes 0 and no weight (never NaN). One
    cross-entropy over all codebooks, summed per codebook and divided by its target count:
    the same figures as K ``token_loss`` calls, without a host read per codebook.
    """
    K, V = labels.shape[-1], logits.shape[-1]
    weights = weights or [1.0] * K
    if len(weights) != K:
        raise ValueError(f"{len(weights)} codebook weights for {K} codebooks")
    flat_labels = labels.reshape(-1, K)
    per_target = token_loss(logits.reshape(-1, K, V), flat_labels, reduction="none").view(-1, K)
    counts = (flat_labels != IGNORE_INDEX).sum(dim=0)
    per_cb = per_target.sum(dim=0) / counts.clamp(min=1)  # 0 for a codebook without targets
    present = torch.tensor(weights, dtype=torch.float32, device=logits.device) * (counts > 0)
    total = (present * per_cb).sum() / present.sum().clamp(min=1e-12)
    return total, list(per_cb.unbind(0))
