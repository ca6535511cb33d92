"""The ONE loss function, used by training and evaluation alike.

Field note: special tokens were removed from the training loss but the eval loss
still counted them, because train and eval had their own loss code. Here both call
`token_loss`; which targets count is decided by the batch's ``labels`` (-100 =
ignored), made once in the data layer.
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


def z_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PaLM's auxiliary z-loss: mean of logsumexp(logits)^2 over the targets in the loss.

    It keeps the softmax normaliser near 1, so the output logits cannot drift upwards
    (a cause of late loss spikes). Added to the loss as ``train.z_loss * z_loss`` and
    logged on its own; the reported loss stays the cross-entropy.
    """
    lse = logits.reshape(-1, logits.shape[-1]).float().logsumexp(dim=-1)
    kept = labels.reshape(-1) != IGNORE_INDEX
    return lse[kept].pow(2).mean()


def codebook_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: list[float] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multi-codebook loss: ``token_loss`` per codebook, then their weighted mean.

    ``logits`` [B, T, K, V], ``labels`` [B, T, K]. Returns (weighted mean, per-codebook losses);
    a codebook with no target in the batch contributes 0 and no weight (never NaN).
    """
    K = labels.shape[-1]
    weights = weights or [1.0] * K
    if len(weights) != K:
        raise ValueError(f"{len(weights)} codebook weights for {K} codebooks")
    per_cb, total, weight_sum = [], logits.new_zeros((), dtype=torch.float32), 0.0
    for k in range(K):
        labels_k = labels[..., k]
        if bool((labels_k != IGNORE_INDEX).any()):
            loss_k = token_loss(logits[..., k, :], labels_k)
            total, weight_sum = total + weights[k] * loss_k, weight_sum + weights[k]
        else:
            loss_k = logits.new_zeros((), dtype=torch.float32)
        per_cb.append(loss_k)
    return total / max(weight_sum, 1e-12), per_cb
