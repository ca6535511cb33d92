"""Autoregressive sampling with a KV cache, batched: temperature per row (0 = greedy), top-k, top-p, EOS stop.

Several prompts continue together in one generation (`generate_batch`): prompts of different
lengths are left-padded and the cache's key mask hides the padding (``KVCache.key_mask``), so each
row attends to its own tokens only. RoPE makes attention depend on relative positions, so a row's
result is the one of its prompt alone (to float rounding: greedy rows are tested equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scratchlab.data.text import EOS_TOKEN, load_tokenizer
from scratchlab.errors import UserError
from scratchlab.families.base import LoadedRun, SampleRequest
from scratchlab.layers.sampling import check_sampling_options, next_token, row_temperatures

DONE_CHECK_EVERY = 8  # steps between checks that every row has drawn EOS (each check is a host sync)


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float | Sequence[float] | torch.Tensor = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue every prompt in one batched generation; returns each row's new ids (up to its EOS, not included).

    ``temperature`` is one number or one per prompt. Every row gets the same budget:
    ``max_new_tokens``, or less when the longest prompt leaves less room in ``model.max_seq_len``.
    ``generator`` makes sampling reproducible without touching the global RNG (so demos inside a
    training run do not change the run's randomness).
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        rows = [torch.as_tensor(p, dtype=torch.long, device=device).reshape(-1) for p in prompts]
        if not rows:
            raise ValueError("no prompt given")
        if min(len(r) for r in rows) == 0:
            raise ValueError("a prompt is empty; give at least one token")
        B, longest = len(rows), max(len(r) for r in rows)
        max_len = model.cfg.max_seq_len
        budget = min(max_new_tokens, max_len - longest)
        if budget <= 0:
            raise ValueError(f"prompt of {longest} tokens leaves no room in model.max_seq_len={max_len}")
        temperatures = row_temperatures(temperature, B, device)
        # Left-padding: every row ends at slot `longest`, so all rows decode at the same cache position.
        ids = torch.zeros(B, longest, dtype=torch.long, device=device)
        key_mask = torch.zeros(B, longest + budget, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):  # once per prompt, before generation
            ids[i, longest - len(row) :] = row
            key_mask[i, longest - len(row) :] = True
        padded = any(len(row) < longest for row in rows)

        def fresh_cache():
            cache = model.new_cache(B, longest + budget)
            cache.key_mask = key_mask if padded else None
            return cache

        cache = fresh_cache() if use_cache else None
        context = ids
        # Without a cache the context is recomputed at every step (through a fresh masked cache when padded).
        logits = model(context, cache=cache if use_cache else (fresh_cache() if padded else None))[:, -1]
        out = torch.empty(B, budget, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        steps = budget
        for j in range(budget):
            token = next_token(logits, temperatures, top_k, top_p, generator)
            out[:, j] = token
            if eos_id is not None:
                done |= token == eos_id
                if (B == 1 or j % DONE_CHECK_EVERY == DONE_CHECK_EVERY - 1) and bool(done.all()):
                    steps = j + 1
                    break
            if j == budget - 1:
                break
            if use_cache:
                logits = model(token[:, None], cache=cache)[:, -1]
            else:
                context = torch.cat([context, token[:, None]], dim=1)
                logits = model(context, cache=fresh_cache() if padded else None)[:, -1]
        result = []
        for row in out[:, :steps].tolist():
            result.append(row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row)
        return result
    finally:
        model.train(was_training)


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

    ``generate_batch`` with one row.
    """
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_id=eos_id, use_cache=use_cache, generator=generator)[0]


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


def sample_texts(
    loaded: LoadedRun,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Continue every prompt with a loaded text LM run, in one batched generation; returns each prompt and its continuation."""
    check_sampling_options(max_new_tokens, temperature, top_k, top_p)
    model, tokenizer, eos_id = text_model(loaded)
    # Documents are separated by EOS in training, so an empty prompt starts a new document.
    ids = [tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id] for prompt in prompts]
    for prompt_ids in ids:
        if len(prompt_ids) >= model.cfg.max_seq_len:
            raise UserError(
                f"--prompt is {len(prompt_ids)} tokens, the model's context is {model.cfg.max_seq_len}; shorten the prompt"
            )
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    new = generate_batch(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=eos_id, generator=generator)
    return [prompt + tokenizer.decode(row) for prompt, row in zip(prompts, new)]


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
    return sample_texts(loaded, [prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed)[0]


def sample(loaded: LoadedRun, request: SampleRequest) -> list[str]:
    """The lm family's `scratchlab sample`: a continuation of each prompt, all generated together."""
    prompts = request.all_prompts()
    texts = sample_texts(loaded, prompts, max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                         top_k=request.top_k, top_p=request.top_p, seed=request.seed)
    if len(texts) == 1:
        return texts
    lines = []
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        lines += [f"--- prompt {i + 1}/{len(texts)}: {prompt!r}", text]
    return lines
