"""Autoregressive sampling with a KV cache: temperature (0 = greedy), top-k, top-p, EOS stop."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

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
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row of logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue one prompt; returns the new token ids (stops after EOS, which is not returned).

    ``generator`` makes sampling reproducible without touching the global RNG (so demos
    inside a training run do not change the run's randomness).
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).view(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty; give at least one token")
        max_len = model.cfg.max_seq_len
        budget = min(max_new_tokens, max_len - ids.shape[1])
        if budget <= 0:
            raise ValueError(f"prompt of {ids.shape[1]} tokens leaves no room in model.max_seq_len={max_len}")
        cache = model.new_cache(1, ids.shape[1] + budget) if use_cache else None
        out: list[int] = []
        context = ids
        logits = model(context, cache=cache)[:, -1]
        for _ in range(budget):
            token = next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None and int(token) == eos_id:
                break
            out.append(int(token))
            if len(out) == budget:
                break
            if use_cache:
                logits = model(token.view(1, 1), cache=cache)[:, -1]
            else:
                context = torch.cat([context, token.view(1, 1)], dim=1)
                logits = model(context)[:, -1]
        return out
    finally:
        model.train(was_training)


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


def sample_run(
    run_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    checkpoint: str | None = None,
) -> str:
    """Load a run's best (or latest, or named) checkpoint and continue ``prompt``; returns the text."""
    from scratchlab.train.loop import load_run_model

    check_sampling_options(max_new_tokens, temperature, top_k, top_p)
    model, tokenizer, eos_id = load_run_model(run_dir, checkpoint=checkpoint)
    # Documents are separated by EOS in training, so an empty prompt starts a new document.
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id]
    if len(ids) >= model.cfg.max_seq_len:
        raise UserError(
            f"--prompt is {len(ids)} tokens, the model's context is {model.cfg.max_seq_len}; shorten the prompt"
        )
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    new = generate(
        model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, generator=generator
    )
    return prompt + tokenizer.decode(new)
