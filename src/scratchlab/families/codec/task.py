"""The codec LM family (`model.family: codec_lm`): delay-interleaved multi-codebook codes, text conditioning.

Windows: ``train.seq_len`` is the window in codec FRAMES of the un-delayed clip; the model
sees that window delay-interleaved (``seq_len + 1 + max_delay`` stream positions with the
EOS), so ``model.max_seq_len`` must hold that. ``tokens`` count real codes: frames x K.
The loss mask is the data layer's (labels = -100 on BOS/PAD); the loss is
`loss.codebook_loss`, logged per codebook as ``loss_cb{k}`` / ``val_loss_cb{k}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scratchlab.config import Config
from scratchlab.families.codec.conditioning import decode_condition
from scratchlab.doctor.findings import Finding
from scratchlab.doctor.data_checks import check_deterministic_windows
from scratchlab.doctor.preflight import LABEL_SHIFT, MODEL_CHECKS, SPECIAL_TOKENS, Check, preflight
from scratchlab.errors import UserError
from scratchlab.loss import IGNORE_INDEX, codebook_loss
from scratchlab.runs.sinks import DEMO_AUDIO
from scratchlab.runs.store import RunDir
from scratchlab.families.base import Batch, LossOutput, Task
from scratchlab.families.codec.patterns import SpecialIds, pattern_for
from scratchlab.runtime import autocast

SYNTHETIC_PREFIX = "synthetic"  # data.path=synthetic[:K=4,codebook=64,...]: a generated, learnable codes set
MAX_DEMO_CONDITIONS = 2


def synthetic_codes_dir(spec: str) -> Path:
    """``synthetic`` or ``synthetic:clips=64,frames=200,K=4,codebook=64,seed=0`` -> a cached generated codes dir."""
    from scratchlab.families.codec.data import write_synthetic_codes
    from scratchlab.data.text import cache_dir

    options = {"clips": 64, "frames": 160, "K": 4, "codebook": 64, "seed": 0}
    _, _, rest = spec.partition(":")
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in options or not value.isdigit():
            raise UserError(f"data.path={spec!r}: expected synthetic[:clips=N,frames=N,K=N,codebook=N,seed=N]")
        options[key] = int(value)
    out = cache_dir() / "synthetic-codes-{clips}x{frames}-K{K}-cb{codebook}-s{seed}".format(**options)
    if not (out / "manifest.jsonl").exists():
        write_synthetic_codes(out, n_clips=options["clips"], T=options["frames"], K=options["K"],
                              codebook_size=options["codebook"], seed=options["seed"])
    return out


class CodecTask(Task):
    family = "codec_lm"

    def __init__(self, cfg: Config, announce=None) -> None:
        from scratchlab.families.codec.data import open_codes_data

        super().__init__(cfg, announce)
        path = cfg.data.path
        if path == "stdlib":
            raise UserError("model.family=codec_lm needs codes: set data.path to a codes dir (see `scratchlab data codes`) "
                            "or data.path=synthetic for a generated one")
        if path.startswith(SYNTHETIC_PREFIX):
            path = str(synthetic_codes_dir(path))
        self.data = open_codes_data(path, codebook_size=cfg.model.codec.codebook_size,
                                    val_fraction=cfg.data.val_fraction, announce=announce)
        self.pattern = None
        self._demo_metrics: dict[str, Any] = {}
        self._codec = None  # the data's codec for audio demos: None = not looked for yet, False = none

    # -- set-up

    def configure(self, cfg: Config) -> Config:
        c, data = cfg.model.codec, self.data
        K, size = data.n_codebooks, data.codebook_size
        if c.n_codebooks is not None and c.n_codebooks != K:
            raise UserError(f"model.codec.n_codebooks={c.n_codebooks} but the codes in {data.root} have K={K}; "
                            "remove the setting or use matching data")
        if c.codebook_size is not None and c.codebook_size < size:
            raise UserError(f"model.codec.codebook_size={c.codebook_size} but the codes in {data.root} reach "
                            f"{size}; raise it or remove it to use the data's")
        update = {"n_codebooks": K, "codebook_size": c.codebook_size or size,
                  "frame_rate": c.frame_rate or data.frame_rate}
        if c.codebook_weights is not None and len(c.codebook_weights) != K:
            raise UserError(f"model.codec.codebook_weights has {len(c.codebook_weights)} entries for {K} codebooks")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"codec": c.model_copy(update=update)})})
        self.pattern = pattern_for(cfg.model.codec, K)
        needed = cfg.train.seq_len + 1 + self.pattern.max_delay
        if needed > cfg.model.max_seq_len:
            raise UserError(f"train.seq_len={cfg.train.seq_len} frames with delays up to {self.pattern.max_delay} need "
                            f"{needed} positions > model.max_seq_len={cfg.model.max_seq_len}; raise model.max_seq_len "
                            f"to {needed} or lower train.seq_len")
        if cfg.train.uncond_prob > 0 and cfg.model.codec.conditioning == "none":
            raise UserError("train.uncond_prob > 0 needs model.codec.conditioning=text (there is no condition to drop)")
        self.cfg = cfg
        return cfg

    @property
    def tokens_per_sample(self) -> int:
        return self.cfg.train.seq_len * self.cfg.model.codec.n_codebooks

    def data_summary(self) -> str:
        d = self.data
        return (f"{d.n_clips('train')} train / {d.n_clips('val')} val clips, K={d.n_codebooks}, codebook "
                f"{self.cfg.model.codec.codebook_size}, pattern {self.cfg.model.codec.pattern} "
                f"delays {list(self.pattern.delays)}")

    def write_assets(self, run: RunDir) -> None:
        run.write_json("data.json", {"path": str(self.data.root), **self.data.meta})

    # -- batches and the loss

    def _batch(self, split: str, batch_size: int, mode: str, generator=None, batch_index: int = 0,
               rows: slice | None = None) -> Batch:
        cfg = self.cfg
        uncond = cfg.train.uncond_prob if split == "train" else 0.0
        return self.data.batch(split, batch_size, cfg.train.seq_len, mode, generator=generator,
                               batch_index=batch_index, pattern=self.pattern, uncond_prob=uncond,
                               shuffle_tags=cfg.data.shuffle_tags and split == "train",
                               max_text_bytes=cfg.model.codec.max_text_bytes, rows=rows)

    def train_batch(self, batch_size: int, generator: torch.Generator, rows: slice | None = None) -> Batch:
        return self._batch("train", batch_size, "random", generator=generator, rows=rows)

    def _forward(self, model: nn.Module, batch: Batch, precision: str) -> torch.Tensor:
        with autocast(batch["labels"].device, precision):
            return model(batch["input_ids"], batch.get("cond_ids"), batch.get("cond_mask"))

    def loss(self, model: nn.Module, batch: Batch, precision: str = "fp32") -> LossOutput:
        logits = self._forward(model, batch, precision)
        loss, per_cb = codebook_loss(logits, batch["labels"], self.cfg.model.codec.codebook_weights)
        logged = {f"loss_cb{k}": v.detach() for k, v in enumerate(per_cb)}
        return LossOutput(loss=loss, objective=loss, logged=logged, outputs=logits)

    def describe_batch(self, batch: Batch, n_samples: int = 2, n_frames: int = 20) -> str:
        ids, labels = batch["input_ids"], batch["labels"]
        lines = [f"# the first training batch: input_ids {tuple(ids.shape)} [batch, stream position, codebook]; "
                 f"pattern {self.cfg.model.codec.pattern} delays {list(self.pattern.delays)}",
                 f"# ids >= {self.cfg.model.codec.codebook_size} are BOS/PAD/EOS (+0/+1/+2); labels -100 are not in the loss"]
        for i in range(min(n_samples, len(ids))):
            kept = labels[i] != IGNORE_INDEX
            lines.append(f"\n## sample {i}: {int(kept.sum())}/{kept.numel()} targets in the loss")
            if "cond_ids" in batch:
                text = decode_condition(batch["cond_ids"][i][batch["cond_mask"][i]].tolist())
                lines.append(f"condition: {text!r}" if text else "condition: (empty: unconditional)")
            for k in range(ids.shape[-1]):
                lines.append(f"cb{k} input  {ids[i, :n_frames, k].tolist()}")
                lines.append(f"cb{k} labels {labels[i, :n_frames, k].tolist()}")
        return "\n".join(lines) + "\n"

    # -- evaluation, demos, checks

    def val_batch(self, index: int) -> Batch:
        return self._batch("val", self.cfg.eval.batch_size, "fixed", batch_index=index)

    def eval_sums(self, batch: Batch, out: LossOutput) -> dict:
        """Per codebook: the family loss's ``loss_cb{k}`` times its targets (nats), the targets, the entropy sum."""
        logits, labels = out.outputs.float(), batch["labels"]
        sums = {}
        for k in range(labels.shape[-1]):
            kept = labels[..., k] != IGNORE_INDEX
            count = kept.sum()
            sums[f"nats_cb{k}"] = out.logged[f"loss_cb{k}"] * count
            sums[f"targets_cb{k}"] = count
            logp = torch.log_softmax(logits[..., k, :][kept], dim=-1)
            sums[f"entropy_cb{k}"] = -(logp.exp() * logp).sum()
        return sums

    def eval_metrics(self, sums: dict[str, float], model: nn.Module, device: torch.device, precision: str) -> dict:
        """Per-codebook val loss (nats per target) and output entropy; val_loss is their weighted mean (pooled
        over every batch, weighted like the loss: ``model.codec.codebook_weights``)."""
        K = self.cfg.model.codec.n_codebooks
        nats, counts, entropy = (np.array([sums[f"{name}_cb{k}"] for k in range(K)])
                                 for name in ("nats", "targets", "entropy"))
        per_cb = nats / np.maximum(counts, 1)
        weights = np.array(self.cfg.model.codec.codebook_weights or [1.0] * K)
        present = counts > 0
        out = {"val_loss": float((weights * per_cb)[present].sum() / max(weights[present].sum(), 1e-12))}
        out.update({f"val_loss_cb{k}": float(per_cb[k]) for k in range(K)})
        out.update({f"val_entropy_cb{k}": float(entropy[k] / max(counts[k], 1)) for k in range(K)})
        out["val_entropy"] = float(entropy.sum() / max(counts.sum(), 1))
        return out

    def demo_conditions(self) -> list[str]:
        """Condition texts for demos: the first validation clips' (empty when the model is unconditioned)."""
        if self.cfg.model.codec.conditioning == "none":
            return [""]
        return [self.data.condition_text("val", i) for i in range(min(MAX_DEMO_CONDITIONS, self.data.n_clips("val")))] or [""]

    def demo(self, model: nn.Module, step: int, out_dir: Path, device: torch.device, precision: str) -> str | None:
        """Conditions x temperatures x CFG scales, generated together (one batched, KV-cached generation);
        each clip saved as codes and, when the data's codec is known, decoded to a .wav beside it."""
        from scratchlab.families.codec.conditioning import collate_conditions, condition_ids
        from scratchlab.families.codec.sampler import codebook_coverage, generate_codes

        cfg, c = self.cfg, self.cfg.model.codec
        frames = max(1, int(round(cfg.demo.seconds * (c.frame_rate or 50.0))))
        frames = min(frames, cfg.model.max_seq_len - 1 - self.pattern.max_delay)
        scales = list(cfg.demo.cfg_scales) if c.conditioning == "text" else [1.0]
        lines = [f"# step {step}: {frames} frames per demo"]
        if cfg.train.uncond_prob == 0 and any(s != 1.0 for s in scales):
            lines.append("# CFG scales != 1 skipped: train.uncond_prob=0, the unconditional branch was never trained")
            scales = [1.0]
        rows = [(p, text, temperature, scale) for p, text in enumerate(self.demo_conditions())
                for temperature in cfg.demo.temperatures for scale in scales]
        cond_ids, cond_mask = collate_conditions([condition_ids(text, (), c.max_text_bytes) for _, text, _, _ in rows])
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.train.seed * 1_000_003 + step * 1009)  # reproducible per step
        with autocast(device, precision):
            codes, _ = generate_codes(model, self.pattern, frames, cond_ids=cond_ids, cond_mask=cond_mask,
                                      temperature=[t for _, _, t, _ in rows], top_k=cfg.demo.top_k,
                                      top_p=cfg.demo.top_p, cfg_scale=[s for _, _, _, s in rows], generator=generator)
        codes = [clip.cpu() for clip in codes]
        index, names = {}, []
        for (p, text, temperature, scale), clip in zip(rows, codes):
            name = f"step_{step:06d}_c{p}_t{temperature:g}_cfg{scale:g}.npy"
            np.save(out_dir / name, clip.numpy().astype(np.int32))
            names.append(name)
            coverage = codebook_coverage([clip], c.codebook_size)
            index[name] = {"condition": text, "temperature": temperature, "cfg_scale": scale,
                           "frames": int(clip.shape[0]), "coverage": coverage}
            lines.append(f"{name}: condition={text!r} frames={clip.shape[0]} coverage per codebook "
                         f"{[round(x, 3) for x in coverage]}")
        audio, warning = self._demo_audio(out_dir, names, codes, device)
        if warning:
            lines.append(f"# {warning}")
        for name, wav in audio.items():
            index[name]["audio"] = wav
        (out_dir / f"step_{step:06d}.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
        text = "\n".join(lines) + "\n"
        (out_dir / f"step_{step:06d}.txt").write_text(text, encoding="utf-8")
        coverage = codebook_coverage(codes, c.codebook_size)
        self._demo_metrics = {f"demo_coverage_cb{k}": v for k, v in enumerate(coverage)}
        self._demo_metrics["demo_coverage"] = float(np.mean(coverage)) if coverage else math.nan
        if audio:  # the sinks log these files as audio (runs/sinks.py)
            self._demo_metrics[DEMO_AUDIO] = list(audio.values())
        return text

    def _demo_audio(self, out_dir: Path, names: list[str], codes: list[torch.Tensor],
                    device: torch.device) -> tuple[dict[str, str], str | None]:
        """Decode each demo clip to a .wav beside its codes with the data's codec (codes dir's codec.json).

        Returns ({codes file: wav file name}, a warning or None). Never raises: a demo that cannot be
        heard is still saved as codes, and training goes on.
        """
        from scratchlab.families.codec.sampler import write_wav

        if self._codec is None:  # loaded once per run, at the first demo
            self._codec = False
            if (self.data.root / "codec.json").is_file():
                from scratchlab.families.codec.encode import codec_for_codes

                try:
                    self._codec = codec_for_codes(self.data.root, device=str(device))
                except Exception as exc:  # noqa: BLE001 - weights, extras: the demos stay codes
                    self._warn(f"warning: demos are not decoded to audio: the data's codec did not load "
                               f"({type(exc).__name__}: {exc})")
        if not self._codec:
            return {}, None
        written, failed = {}, []
        for name, clip in zip(names, codes):
            if clip.shape[0] == 0:  # a clip that ended at once has no audio
                continue
            wav = Path(name).with_suffix(".wav").name
            try:
                write_wav(out_dir / wav, self._codec.decode(clip.numpy()), self._codec.info.sampling_rate)
                written[name] = wav
            except Exception as exc:  # noqa: BLE001 - one clip that does not decode never stops training
                failed.append(f"{name} ({type(exc).__name__}: {exc})")
        if failed:
            warning = f"warning: {len(failed)} demo(s) not decoded to audio: {failed[0]}"
            self._warn(warning)
            return written, warning
        return written, None

    def _warn(self, message: str) -> None:
        info = getattr(self.announce, "info", None)
        if info is not None:
            info(message, style="yellow")
        elif callable(self.announce):
            self.announce(message)

    def demo_metrics(self) -> dict[str, Any]:
        """Codebook coverage of the last demo, and ``demo_audio``: its .wav files (names in demos/)."""
        return self._demo_metrics

    def preflight(self, model: nn.Module, batch: Batch) -> list[Finding]:
        """The generic batch and model checks with the family loss (codebook weights, the batch's conditions; the
        leak checks perturb the codes with the condition left out), then the crop that training uses."""
        special = SpecialIds.for_codebook(self.cfg.model.codec.codebook_size)
        # Field note: an inverted crop flag fed every clip's first seconds. Test the crop training uses.
        crops = CropProbe(self.data, self.cfg.train.seq_len, self.pattern, self.cfg.train.seed)
        checks = (LABEL_SHIFT, SPECIAL_TOKENS, *MODEL_CHECKS,
                  Check("deterministic_windows", lambda _: check_deterministic_windows(crops)))
        # BOS/PAD may never be targets; EOS is a real target (the data layer keeps it), so only BOS/PAD are checked.
        return preflight(model, batch, loss=self.preflight_loss, special_token_ids=(special.bos, special.pad),
                         overfit_steps=self.cfg.doctor.overfit_steps, checks=checks)


class CropProbe:
    """The training split's crops as a dataset (index = clip), for preflight's deterministic_windows check."""

    def __init__(self, data, window: int, pattern, seed: int) -> None:
        self.data, self.window, self.pattern = data, window, pattern
        self.ids = data.splits["train"]
        self.generator = torch.Generator().manual_seed(seed + 1)  # never the run's data generator

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        item = self.data.random_window(self.ids[index], self.window, self.pattern, self.generator)
        return {**item, "crop_len": self.window}  # the frames a crop covers (the stream adds delays and EOS)
