"""KV-cached sampling throughput (batch 1 and 8) and the wall time of one eval's demos, batched vs one after another.

Usage::

    python benchmarks/sampling.py [--new-tokens 128] [--frames 50] [--repeats 3] [--device auto] [--precision auto] [--threads N] [--json]

- lm: the `tiny-lm` preset's model (vocab 4096), random weights, a prompt of 8 tokens, ``--new-tokens``
  sampled at temperature 1 (no EOS): new tokens/s over all rows.
- codec: the `dia-tiny` preset's model (K = 9, codebook 64, text-conditioned), random weights, EOS held
  back so every row runs ``--frames`` frames: frames/s and codes/s (frames x K) over all rows, CFG off.
- demos: one eval's demos as the presets configure them (tiny-lm: 3 prompts x 3 temperatures, 64 new
  tokens; dia-tiny: 2 conditions x 3 temperatures x 2 CFG scales, 1 s = 50 frames, EOS held back),
  generated as one batch (what training does) and one after another (what it did before), in this run.

Medians of ``--repeats`` after one warmup. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from scratchlab.config import load_config
from scratchlab.families.codec.conditioning import collate_conditions, condition_ids
from scratchlab.families.codec.patterns import SpecialIds, pattern_for
from scratchlab.families.codec.sampler import generate_codes
from scratchlab.families.lm.sampler import generate_batch
from scratchlab.families.registry import build_model
from scratchlab.runtime import autocast, resolve_device, resolve_precision


class NoEOS(nn.Module):
    """The codec model with EOS never drawn (so each row runs the frames asked for: a fixed amount of work)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.n_codebooks, self.conditioned = model.n_codebooks, model.conditioned
        self.eos = SpecialIds.for_codebook(model.cfg.codec.codebook_size).eos

    def new_cache(self, batch: int, max_len: int | None = None):
        return self.model.new_cache(batch, max_len)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        logits = self.model(*args, **kwargs).clone()
        logits[..., self.eos] = -1e4  # finite: at max_frames the pattern still forces it
        return logits


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warmup."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128, help="lm tokens per row")
    parser.add_argument("--frames", type=int, default=50, help="codec frames per row (dia-tiny holds at most 112)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="autocast precision, as train.precision (auto: the device's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(0)
    results: dict[str, object] = {"device": str(device), "precision": precision, "torch": torch.__version__,
                                  "threads": torch.get_num_threads(),
                                  "command": " ".join(["python", "benchmarks/sampling.py", *sys.argv[1:]])}

    # -- lm
    lm_cfg = load_config("tiny-lm", ["model.vocab_size=4096"])
    torch.manual_seed(0)
    lm = build_model(lm_cfg.model).to(device).eval()
    prompt = torch.randint(0, 4096, (8,)).tolist()
    for batch in (1, 8):
        def run_lm(batch=batch):
            with autocast(device, precision):
                generate_batch(lm, [prompt] * batch, args.new_tokens, temperature=1.0, generator=generator)
        seconds = timed(run_lm, args.repeats, sync)
        results[f"lm_tokens_per_s_b{batch}"] = batch * args.new_tokens / seconds

    # -- codec (dia-tiny)
    dia_cfg = load_config("dia-tiny", ["model.codec.n_codebooks=9", "model.codec.codebook_size=64",
                                       "model.codec.frame_rate=50"])
    torch.manual_seed(0)
    codec = NoEOS(build_model(dia_cfg.model).to(device).eval())
    pattern = pattern_for(dia_cfg.model.codec, 9)
    K = pattern.n_codebooks
    for batch in (1, 8):
        ids, mask = collate_conditions([condition_ids("a calm piano loop, tags: calm", (), 48)] * batch)

        def run_codec(ids=ids, mask=mask):
            with autocast(device, precision):
                generate_codes(codec, pattern, args.frames, cond_ids=ids, cond_mask=mask, temperature=1.0,
                               generator=generator)
        seconds = timed(run_codec, args.repeats, sync)
        results[f"codec_frames_per_s_b{batch}"] = batch * args.frames / seconds
        results[f"codec_codes_per_s_b{batch}"] = batch * args.frames * K / seconds

    # -- one eval's demos: batched vs one after another
    d = lm_cfg.demo
    lm_rows = [(lm_prompt, t) for lm_prompt in [prompt[:4], prompt[:2], prompt[:6]] for t in d.temperatures]

    def lm_batched():
        with autocast(device, precision):
            generate_batch(lm, [p for p, _ in lm_rows], d.max_new_tokens, temperature=[t for _, t in lm_rows],
                           generator=generator)

    def lm_serial():
        with autocast(device, precision):
            for p, t in lm_rows:
                generate_batch(lm, [p], d.max_new_tokens, temperature=t, generator=generator)

    dd, frames = dia_cfg.demo, int(round(dia_cfg.demo.seconds * 50))
    codec_rows = [(text, t, s) for text in ("a fast dark loop, tags: dark", "a calm piano loop, tags: calm")
                  for t in dd.temperatures for s in dd.cfg_scales]

    def codec_batched():
        ids, mask = collate_conditions([condition_ids(text, (), 48) for text, _, _ in codec_rows])
        with autocast(device, precision):
            generate_codes(codec, pattern, frames, cond_ids=ids, cond_mask=mask, temperature=[t for _, t, _ in codec_rows],
                           cfg_scale=[s for _, _, s in codec_rows], generator=generator)

    def codec_serial():
        with autocast(device, precision):
            for text, t, s in codec_rows:
                ids, mask = collate_conditions([condition_ids(text, (), 48)])
                generate_codes(codec, pattern, frames, cond_ids=ids, cond_mask=mask, temperature=t, cfg_scale=s,
                               generator=generator)

    for name, batched, serial, rows in (("lm", lm_batched, lm_serial, len(lm_rows)),
                                        ("codec", codec_batched, codec_serial, len(codec_rows))):
        b, s = timed(batched, args.repeats, sync), timed(serial, args.repeats, sync)
        results[f"{name}_demo_rows"] = rows
        results[f"{name}_demo_batched_s"] = b
        results[f"{name}_demo_serial_s"] = s
        results[f"{name}_demo_speedup"] = s / b

    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"device {device}, precision {precision}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"rerun: {results['command']}")
    print(f"lm (tiny-lm, {args.new_tokens} new tokens)    tokens/s  batch 1: {results['lm_tokens_per_s_b1']:9,.0f}"
          f"   batch 8: {results['lm_tokens_per_s_b8']:9,.0f}"
          f"   (x{results['lm_tokens_per_s_b8'] / results['lm_tokens_per_s_b1']:.2f})")
    for what in ("frames", "codes"):
        b1, b8 = results[f"codec_{what}_per_s_b1"], results[f"codec_{what}_per_s_b8"]
        print(f"codec (dia-tiny, {args.frames} frames) {what:>6}/s  batch 1: {b1:9,.0f}   batch 8: {b8:9,.0f}"
              f"   (x{b8 / b1:.2f})")
    for name in ("lm", "codec"):
        print(f"{name} demos of one eval ({results[f'{name}_demo_rows']} rows): batched "
              f"{results[f'{name}_demo_batched_s']:.2f} s, one after another {results[f'{name}_demo_serial_s']:.2f} s "
              f"-> batched is x{results[f'{name}_demo_speedup']:.2f} faster")


if __name__ == "__main__":
    main()
