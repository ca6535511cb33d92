"""Delay-aware, KV-cached sampling of multi-codebook codes, with classifier-free guidance.

Generation runs over the delay-interleaved stream S (families/codec/patterns.py): step t feeds row S[t-1]
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

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scratchlab.families.base import LoadedRun, SampleRequest
from scratchlab.families.codec.conditioning import COND_BOS, COND_PAD
from scratchlab.layers.sampling import next_token


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
    guidance: bool | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample ``n`` clips of at most ``max_frames`` frames.

    ``guidance`` runs the doubled (cond, uncond) batch; None = when ``cfg_scale != 1``.

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
        guided = (cfg_scale != 1.0 if guidance is None else guidance) and model.conditioned
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


def sample_codes(
    loaded: LoadedRun,
    text: str = "",
    *,
    seconds: float = 5.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    n: int = 1,
    seed: int | None = None,
    out: str | Path | None = None,
    audio: bool = False,
    warn=None,
) -> list[Path]:
    """Sample ``n`` clips from a codec_lm run and save each as ``[T, K]`` int32 codes (.npy); returns the paths.

    ``audio`` also decodes each clip to a .wav with the codec that made the run's codes (the
    codes dir's codec.json; needs the audio extra and, for pretrained codecs, their weights).

    ``text`` is the condition (text and tags as in the manifest; empty = unconditional).
    ``warn`` (callable) receives warnings, e.g. CFG on a model never trained unconditionally.
    """
    from scratchlab.families.codec.conditioning import collate_conditions, condition_ids
    from scratchlab.errors import UserError
    from scratchlab.layers.sampling import check_sampling_options
    from scratchlab.families.codec.patterns import pattern_for
    check_sampling_options(1, temperature, top_k, top_p)
    if seconds <= 0 or n < 1:
        raise UserError(f"--seconds must be > 0 and --n >= 1 (got {seconds}, {n})")
    cfg, model, run_dir = loaded.cfg, loaded.model, loaded.path
    c = cfg.model.codec
    if cfg_scale != 1.0 and cfg.train.uncond_prob == 0 and warn is not None:
        warn(f"warning: --cfg-scale {cfg_scale} on a model trained with train.uncond_prob=0: the unconditional branch "
             "was never trained, so guidance extrapolates from noise; retrain with train.uncond_prob=0.1-0.2 or use "
             "--cfg-scale 1")
    if text and c.conditioning == "none" and warn is not None:
        warn("warning: this model is unconditioned (model.codec.conditioning=none); --text is ignored")
    pattern = pattern_for(c, c.n_codebooks)
    frame_rate = c.frame_rate or 50.0
    frames = max(1, int(round(seconds * frame_rate)))
    room = cfg.model.max_seq_len - 1 - pattern.max_delay
    if frames > room:
        raise UserError(f"--seconds {seconds} is {frames} frames; the model's context holds {room} "
                        f"({room / frame_rate:.2f} s at {frame_rate:g} frames/s); ask for less")
    ids, mask = collate_conditions([condition_ids(text, (), c.max_text_bytes)] * n)
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    codes, _ = generate_codes(model, list(pattern.delays), frames, cond_ids=ids, cond_mask=mask, n=n,
                              temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                              generator=generator)
    out_dir = Path(out) if out is not None else Path(run_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    codec = None
    if audio:
        import json

        from scratchlab.families.codec.encode import codec_for_codes

        data_path = json.loads((Path(run_dir) / "data.json").read_text()).get("path", "")
        codec = codec_for_codes(data_path)
    paths = []
    for i, clip in enumerate(codes):
        path = out_dir / f"{stamp}_{i}.npy"
        np.save(path, clip.cpu().numpy().astype(np.int32))
        paths.append(path)
        if codec is not None and clip.shape[0] > 0:  # a clip that ended at once has no audio
            import soundfile

            wav = path.with_suffix(".wav")
            soundfile.write(wav, codec.decode(clip.cpu().numpy()), codec.info.sampling_rate)
            paths.append(wav)
    return paths


def sample(loaded: LoadedRun, request: SampleRequest) -> list[str]:
    """The codec family's `scratchlab sample`: ``request.n`` clips of codes (and .wav with ``audio``)."""
    paths = sample_codes(loaded, request.prompt, seconds=request.seconds or 5.0, temperature=request.temperature,
                         top_k=request.top_k, top_p=request.top_p, cfg_scale=request.cfg_scale, n=request.n,
                         seed=request.seed, out=request.out, audio=request.audio, warn=request.warn)
    return [f"wrote {path}" for path in paths]
