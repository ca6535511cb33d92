"""Choosing the next token from logits: temperature (0 = greedy), top-k, top-p. Shared by every sampler."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scratchlab.errors import UserError


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits [B, V] outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row of logits [B, V].

    ``temperature`` is one number or one per row (a [B] tensor: batched demos mix temperatures);
    a row at temperature 0 takes its argmax (greedy), exactly as a batch of one would.
    """
    if not isinstance(temperature, torch.Tensor):
        if temperature <= 0:
            return logits.argmax(-1)
        probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    temperature = temperature.to(device=logits.device, dtype=torch.float32).reshape(-1)
    greedy = temperature <= 0
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]  # greedy rows: any finite scale
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)


def row_temperatures(
    temperature: float | Sequence[float] | torch.Tensor, rows: int, device
) -> float | torch.Tensor:
    """Temperatures for ``rows`` rows from one number or one per row: one float when all rows share it
    (``next_token``'s scalar path: a greedy batch never touches a random generator), else a [rows] tensor."""
    values = [float(v) for v in torch.as_tensor(temperature, dtype=torch.float64).reshape(-1).tolist()]
    if len(values) not in (1, rows):
        raise ValueError(f"{len(values)} temperatures for {rows} rows; give one, or one per row")
    if len(set(values)) == 1:
        return values[0]
    return torch.tensor(values, dtype=torch.float32, device=device)


def check_sampling_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Sampling options a person typed: each bad one is a one-line UserError."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, 0 meaning greedy (got {temperature})")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0, 0 meaning off (got {top_k})")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], 1 meaning off (got {top_p})")
