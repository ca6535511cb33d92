"""Autoregressive sampling with a KV cache: temperature (0 = greedy), top-k, top-p, EOS stop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scratchlab.data.text import EOS_TOKEN, load_tokenizer
from scratchlab.errors import UserError
from scratchlab.families.base import LoadedRun, SampleRequest
from scratchlab.layers.sampling import check_sampling_options, next_token


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


def text_model(loaded: LoadedRun) -> tuple[nn.Module, Any, int]:
    """(model, tokenizer, eos_id) of a loaded text LM run; the tokenizer must fit the model's vocabulary."""
    run, cfg = loaded.run, loaded.cfg
    tokenizer = load_tokenizer(run.tokenizer_file)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(
            f"{run.tokenizer_file} has {tokenizer.get_vocab_size()} tokens but the model only {cfg.model.vocab_size}: "
            "tokenizer/vocab mismatch; use the tokenizer the run was trained with"
        )
    return loaded.model, tokenizer, tokenizer.token_to_id(EOS_TOKEN)


def sample_text(
    loaded: LoadedRun,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """Continue ``prompt`` with a loaded text LM run; returns the prompt and its continuation."""
    check_sampling_options(max_new_tokens, temperature, top_k, top_p)
    model, tokenizer, eos_id = text_model(loaded)
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


def sample(loaded: LoadedRun, request: SampleRequest) -> list[str]:
    """The lm family's `scratchlab sample`: one continuation of ``request.prompt``."""
    return [sample_text(loaded, request.prompt, max_new_tokens=request.max_new_tokens,
                        temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=request.seed)]
