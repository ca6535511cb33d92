"""Delay-aware, KV-cached sampling of multi-codebook codes, with classifier-free guidance.

Generation runs over the delay-interleaved stream S (patterns.py): step t feeds row S[t-1]
(an all-BOS row at t=0) and predicts all K codebooks of row S[t]. Where the pattern
dictates, tokens are forced rather than sampled, exactly as the data layer lays them out
in training:

- t < delay_k: BOS on codebook k (the codebook has not started yet);
- codebook 0 (the first to start) ends the clip by emitting EOS at frame T; codebook k then
  gets EOS at t = T + delay_k and PAD after it (the staggered EOS);
- elsewhere only real codes (< codebook_size) may be sampled, and EOS only on codebook 0.

Classifier-free guidance doubles the batch (conditional rows, then unconditional rows
with the empty condition) and samples from ``uncond + scale * (cond - uncond)``; both
halves are fed the same sampled tokens. Scale 1 is the conditional model exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlab.models.codec_lm import COND_VOCAB
from scratchlab.sample import next_token

COND_BOS, COND_PAD = COND_VOCAB - 2, COND_VOCAB - 1


def empty_condition(n: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional condition: COND_BOS then padding (what train.uncond_prob trains)."""
    ids = torch.full((n, width), COND_PAD, dtype=torch.long, device=device)
    ids[:, 0] = COND_BOS
    mask = torch.zeros(n, width, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return ids, mask


@torch.no_grad()
def generate_codes(
    model: nn.Module,
    delays: list[int],
    max_frames: int,
    *,
    cond_ids: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    n: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample ``n`` clips of at most ``max_frames`` frames.

    Returns (codes, stream): per sample the reverted codes [T_i, K] (T_i frames before its
    EOS, or max_frames), and the raw delayed stream [n, L, K] as generated (BOS/PAD/EOS included).
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        K, cs = len(delays), model.cfg.codec.codebook_size
        bos, pad, eos = cs, cs + 1, cs + 2
        if K != model.n_codebooks:
            raise ValueError(f"{K} delays for a model with {model.n_codebooks} codebooks")
        if delays[0] != min(delays):
            raise ValueError(f"codebook 0 must start first (delays {delays}): it carries the EOS")
        max_delay = max(delays)
        length = max_frames + 1 + max_delay  # the stream of a clip of max_frames frames, EOS included
        if length > model.cfg.max_seq_len:
            raise ValueError(f"{max_frames} frames need {length} stream positions > model.max_seq_len="
                             f"{model.cfg.max_seq_len}; ask for fewer frames")
        guided = cfg_scale != 1.0 and model.conditioned
        if model.conditioned:
            if cond_ids is None:
                cond_ids, cond_mask = empty_condition(n, 1, device)
            cond_ids, cond_mask = cond_ids.to(device), cond_mask.to(device)
            if guided:
                empty_ids, empty_mask = empty_condition(n, cond_ids.shape[1], device)
                cond_ids, cond_mask = torch.cat([cond_ids, empty_ids]), torch.cat([cond_mask, empty_mask])
        rows = 2 * n if guided else n
        delay = torch.tensor(delays, device=device)
        stream = torch.full((n, length, K), pad, dtype=torch.long, device=device)
        end = torch.full((n,), -1, dtype=torch.long, device=device)  # frames before EOS, -1 = not yet
        cache = model.new_cache(rows, length) if use_cache else None
        step_input = torch.full((rows, 1, K), bos, dtype=torch.long, device=device)
        history = step_input
        for t in range(length):
            if use_cache:
                logits = model(step_input, cond_ids, cond_mask, cache=cache)[:, -1]
            else:
                logits = model(history, cond_ids, cond_mask)[:, -1]
            logits = logits.float()  # [rows, K, V]
            if guided:
                cond, uncond = logits[:n], logits[n:]
                logits = uncond + cfg_scale * (cond - uncond)
            frame = t - delay  # [K]: the frame each codebook is at
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed[..., :cs] = True
            allowed[:, 0, eos] = True  # only codebook 0 may end the clip
            if t - delays[0] >= max_frames:  # out of room: end now
                allowed[:, 0, :] = False
                allowed[:, 0, eos] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
            token = next_token(logits.reshape(n * K, -1), temperature, top_k, top_p, generator).view(n, K)
            # Forced positions (pattern): before a codebook's delay, and after the clip's end.
            token = torch.where((frame < 0)[None, :], torch.full_like(token, bos), token)
            new_end = (end < 0) & (token[:, 0] == eos)
            end = torch.where(new_end, frame[0].expand_as(end), end)
            ended = end[:, None] >= 0  # then EOS at each codebook's own frame `end`, PAD after it
            token = torch.where(ended & (frame[None, :] == end[:, None]), torch.full_like(token, eos), token)
            token = torch.where(ended & (frame[None, :] > end[:, None]), torch.full_like(token, pad), token)
            stream[:, t] = token
            if bool((end >= 0).all()) and t >= int(end.max()) + max_delay:
                stream = stream[:, : t + 1]
                break
            step_input = torch.cat([token, token]) if guided else token
            step_input = step_input[:, None, :]
            if not use_cache:
                history = torch.cat([history, step_input], dim=1)
        frames = [int(e) if e >= 0 else max_frames for e in end.tolist()]
        codes = [
            torch.stack([stream[i, delays[k] : delays[k] + frames[i], k] for k in range(K)], dim=-1)
            for i in range(n)
        ]
        return codes, stream
    finally:
        model.train(was_training)


def codebook_coverage(codes: list[torch.Tensor], codebook_size: int) -> list[float]:
    """Per codebook, the fraction of its entries used anywhere in ``codes`` (a collapse shows as a tiny fraction)."""
    if not codes:
        return []
    K = codes[0].shape[-1]
    used = [set() for _ in range(K)]
    for c in codes:
        for k in range(K):
            used[k].update(c[:, k].tolist())
    return [len(u) / codebook_size for u in used]
