"""Delay-aware, KV-cached sampling of multi-codebook codes, batched, with classifier-free guidance.

Generation runs over the delay-interleaved stream S (families/codec/patterns.py): step t feeds row S[t-1]
(an all-BOS row at t=0) and predicts all K codebooks of row S[t]. What is forced and what may be
sampled comes from the pattern itself (``DelayPattern.forced_ids`` / ``allowed_mask``, batched over
the rows), the same module that lays out the training stream, and the codes come back through
``DelayPattern.revert``: BOS before each codebook's delay, EOS drawn on the EOS codebook only,
then EOS staggered over the codebooks and PAD after it, exactly as training places them.

One call generates every row together: each row has its own condition, temperature (0 = greedy)
and guidance scale. Classifier-free guidance adds one unconditional row (the empty condition) per
guided row and samples from ``uncond + scale * (cond - uncond)``; both are fed the same sampled
tokens. A row at scale 1 is the conditional model exactly (it gets no unconditional twin).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scratchlab.families.base import LoadedRun, SampleRequest
from scratchlab.families.codec.conditioning import COND_BOS, COND_PAD
from scratchlab.families.codec.patterns import NOT_ENDED, DelayPattern, SpecialIds
from scratchlab.layers.sampling import next_token, row_temperatures

DONE_CHECK_EVERY = 8  # steps between checks that every row has ended (each check is a host sync)


def empty_condition(n: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional condition: COND_BOS then padding (what train.uncond_prob trains)."""
    ids = torch.full((n, width), COND_PAD, dtype=torch.long, device=device)
    ids[:, 0] = COND_BOS
    mask = torch.zeros(n, width, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return ids, mask


def _per_row(value: float | Sequence[float] | torch.Tensor, rows: int, name: str) -> list[float]:
    values = [float(v) for v in torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()]
    if len(values) == 1:
        return values * rows
    if len(values) != rows:
        raise ValueError(f"{len(values)} {name} values for {rows} rows; give one, or one per row")
    return values


@torch.no_grad()
def generate_codes(
    model: nn.Module,
    pattern: DelayPattern | Sequence[int],
    max_frames: int,
    *,
    cond_ids: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    n: int | None = None,
    temperature: float | Sequence[float] | torch.Tensor = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float | Sequence[float] | torch.Tensor = 1.0,
    guidance: bool | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sample ``n`` clips of at most ``max_frames`` frames together, in one batched generation.

    ``pattern`` is the run's DelayPattern (or its delays). ``cond_ids`` / ``cond_mask`` hold one
    condition per row (or one for all); ``n`` defaults to their rows (1 without a condition).
    ``temperature`` and ``cfg_scale`` are one number or one per row. ``guidance`` runs the
    unconditional twin rows even at scale 1 (None = only for rows whose scale is not 1).

    Returns (codes, stream): per row the reverted codes [T_i, K] (T_i frames before its EOS, at
    most max_frames), and the raw delayed stream [n, L, K] as generated (BOS/PAD/EOS included;
    a row that ended earlier than the longest is PAD after its last EOS).
    """
    pattern = pattern if isinstance(pattern, DelayPattern) else DelayPattern(list(pattern))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        K, special = pattern.n_codebooks, SpecialIds.for_codebook(model.cfg.codec.codebook_size)
        if K != model.n_codebooks:
            raise ValueError(f"{K} delays for a model with {model.n_codebooks} codebooks")
        if pattern.eos_codebook != 0:
            raise ValueError(f"codebook 0 must start first (delays {list(pattern.delays)}): it carries the EOS")
        length = pattern.stream_length(max_frames)  # the stream of a clip of max_frames frames, EOS included
        if length > model.cfg.max_seq_len:
            raise ValueError(f"{max_frames} frames need {length} stream positions > model.max_seq_len="
                             f"{model.cfg.max_seq_len}; ask for fewer frames")
        if n is None:
            n = len(cond_ids) if cond_ids is not None else 1
        temperatures = row_temperatures(temperature, n, device)
        if isinstance(temperatures, torch.Tensor):  # one per (row, codebook), as the logits are flattened
            temperatures = temperatures.repeat_interleave(K)
        scales = _per_row(cfg_scale, n, "cfg_scale")
        conditioned = model.conditioned
        if conditioned:
            if cond_ids is None:
                cond_ids, cond_mask = empty_condition(n, 1, device)
            cond_ids, cond_mask = cond_ids.to(device), cond_mask.to(device)
            if len(cond_ids) == 1 and n > 1:
                cond_ids, cond_mask = cond_ids.expand(n, -1), cond_mask.expand(n, -1)
            if len(cond_ids) != n:
                raise ValueError(f"{len(cond_ids)} conditions for {n} rows; give one, or one per row")
        # Rows with guidance get an unconditional twin, appended after the n conditional rows.
        twins = [i for i, s in enumerate(scales) if conditioned and (s != 1.0 if guidance is None else guidance)]
        twin_index = torch.tensor(twins, dtype=torch.long, device=device)
        twin_scale = torch.tensor([scales[i] for i in twins], dtype=torch.float32, device=device)[:, None, None]
        if twins:
            empty_ids, empty_mask = empty_condition(len(twins), cond_ids.shape[1], device)
            cond_ids, cond_mask = torch.cat([cond_ids, empty_ids]), torch.cat([cond_mask, empty_mask])
        rows = n + len(twins)
        stream = torch.full((n, length, K), special.pad, dtype=torch.long, device=device)
        eos_frame = torch.full((n,), NOT_ENDED, dtype=torch.long, device=device)
        cache = model.new_cache(rows, length) if use_cache else None
        step_input = torch.full((rows, 1, K), special.bos, dtype=torch.long, device=device)
        history = step_input
        last = length - 1
        for t in range(length):
            if use_cache:
                logits = model(step_input, cond_ids, cond_mask, cache=cache)[:, -1]
            else:
                logits = model(history, cond_ids, cond_mask)[:, -1]
            logits = logits.float()  # [rows, K, V]
            if twins:
                cond, uncond = logits[:n], logits[n:]
                guided = uncond + twin_scale * (cond[twin_index] - uncond)
                logits = cond.index_copy(0, twin_index, guided)
            # Phase 1: the model samples where the pattern leaves the choice, among the classes it allows.
            allowed = pattern.allowed_mask(t, special, eos_frame, max_frames)
            logits = logits.masked_fill(~allowed, float("-inf"))
            token = next_token(logits.reshape(n * K, -1), temperatures, top_k, top_p, generator).view(n, K)
            forced = pattern.forced_ids(t, special, eos_frame)
            token = torch.where(forced >= 0, forced, token)
            # Phase 2: EOS drawn on the EOS codebook ends the row; the pattern then forces this step again.
            ended_now = (eos_frame < 0) & (token[:, pattern.eos_codebook] == special.eos)
            eos_frame = torch.where(ended_now, pattern.eos_frame_at(t), eos_frame)
            forced = pattern.forced_ids(t, special, eos_frame)
            token = torch.where(forced >= 0, forced, token)
            stream[:, t] = token
            if t % DONE_CHECK_EVERY == DONE_CHECK_EVERY - 1 and bool(pattern.complete(t, eos_frame).all()):
                last = t
                break
            step_input = (torch.cat([token, token[twin_index]]) if twins else token)[:, None, :]
            if not use_cache:
                history = torch.cat([history, step_input], dim=1)
        frames = eos_frame.tolist()  # every row has ended: EOS is forced at max_frames
        # Rows are complete at their EOS frame + max_delay; the steps after the last one are all PAD.
        stream = stream[:, : min(last, max(frames) + pattern.max_delay) + 1]
        reverted = pattern.revert(stream, n_frames=max(frames))  # [n, max(frames), K]
        codes = [reverted[i, : frames[i]] for i in range(n)]
        return codes, stream
    finally:
        model.train(was_training)


def write_wav(path: Path, audio: np.ndarray, sampling_rate: int) -> None:
    """Mono float audio in [-1, 1] as a 16-bit PCM .wav (stdlib ``wave``: every player and tracker reads it)."""
    import wave

    pcm = (np.clip(np.nan_to_num(np.asarray(audio, dtype=np.float32).reshape(-1)), -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(int(sampling_rate))
        out.writeframes(pcm.tobytes())


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
    codes, _ = generate_codes(model, pattern, frames, cond_ids=ids, cond_mask=mask, n=n,
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
