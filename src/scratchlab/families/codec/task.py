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

import numpy as np
import torch
from torch import nn

from scratchlab.config import Config
from scratchlab.families.codec.conditioning import decode_condition
from scratchlab.doctor.findings import Finding
from scratchlab.errors import UserError
from scratchlab.loss import IGNORE_INDEX, codebook_loss, token_loss
from scratchlab.runs.store import RunDir
from scratchlab.families.base import Batch, LossOutput, Task
from scratchlab.families.codec.patterns import pattern_for
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
        self._demo_metrics: dict[str, float] = {}

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

    def _batch(self, split: str, batch_size: int, mode: str, generator=None, batch_index: int = 0) -> Batch:
        cfg = self.cfg
        uncond = cfg.train.uncond_prob if split == "train" else 0.0
        return self.data.batch(split, batch_size, cfg.train.seq_len, mode, generator=generator,
                               batch_index=batch_index, pattern=self.pattern, uncond_prob=uncond,
                               shuffle_tags=cfg.data.shuffle_tags and split == "train",
                               max_text_bytes=cfg.model.codec.max_text_bytes)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        return self._batch("train", batch_size, "random", generator=generator)

    def _forward(self, model: nn.Module, batch: Batch, precision: str) -> torch.Tensor:
        with autocast(batch["labels"].device, precision):
            return model(batch["input_ids"], batch.get("cond_ids"), batch.get("cond_mask"))

    def loss(self, model: nn.Module, batch: Batch, precision: str = "fp32") -> LossOutput:
        logits = self._forward(model, batch, precision)
        loss, per_cb = codebook_loss(logits, batch["labels"], self.cfg.model.codec.codebook_weights)
        logged = {f"loss_cb{k}": v.item() for k, v in enumerate(per_cb)}
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

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, precision: str) -> dict[str, float]:
        """Per-codebook val loss (nats per target) and output entropy on fixed windows; val_loss is their weighted mean."""
        was_training = model.training
        model.eval()
        e, K = self.cfg.eval, self.cfg.model.codec.n_codebooks
        nats, counts, entropy = np.zeros(K), np.zeros(K), np.zeros(K)
        for i in range(e.batches):
            batch = {k: v.to(device) for k, v in self._batch("val", e.batch_size, "fixed", batch_index=i).items()}
            logits = self._forward(model, batch, precision).float()
            labels = batch["labels"]
            for k in range(K):
                kept = labels[..., k] != IGNORE_INDEX
                losses = token_loss(logits[..., k, :], labels[..., k], reduction="none")
                nats[k] += float(losses.sum())
                counts[k] += int(kept.sum())
                logp = torch.log_softmax(logits[..., k, :][kept], dim=-1)
                entropy[k] += float(-(logp.exp() * logp).sum())
        model.train(was_training)
        per_cb = nats / np.maximum(counts, 1)
        weights = np.array(self.cfg.model.codec.codebook_weights or [1.0] * K)
        present = counts > 0
        val_loss = float((weights * per_cb)[present].sum() / max(weights[present].sum(), 1e-12))
        out = {"val_loss": val_loss}
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
        generator = torch.Generator(device=device)
        all_codes, index = [], {}
        for p, text in enumerate(self.demo_conditions()):
            cond_ids, cond_mask = collate_conditions([condition_ids(text, (), c.max_text_bytes)])
            for t, temperature in enumerate(cfg.demo.temperatures):
                for s, scale in enumerate(scales):
                    generator.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + p * 101 + t * 11 + s)
                    with autocast(device, precision):
                        codes, _ = generate_codes(model, list(self.pattern.delays), frames, cond_ids=cond_ids,
                                                  cond_mask=cond_mask, temperature=temperature, top_k=cfg.demo.top_k,
                                                  top_p=cfg.demo.top_p, cfg_scale=scale, generator=generator)
                    name = f"step_{step:06d}_c{p}_t{temperature:g}_cfg{scale:g}.npy"
                    np.save(out_dir / name, codes[0].cpu().numpy().astype(np.int32))
                    all_codes.append(codes[0].cpu())
                    coverage = codebook_coverage(codes, c.codebook_size)
                    index[name] = {"condition": text, "temperature": temperature, "cfg_scale": scale,
                                   "frames": int(codes[0].shape[0]), "coverage": coverage}
                    lines.append(f"{name}: condition={text!r} frames={codes[0].shape[0]} coverage per codebook "
                                 f"{[round(x, 3) for x in coverage]}")
        (out_dir / f"step_{step:06d}.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
        text = "\n".join(lines) + "\n"
        (out_dir / f"step_{step:06d}.txt").write_text(text, encoding="utf-8")
        coverage = codebook_coverage(all_codes, c.codebook_size)
        self._demo_metrics = {f"demo_coverage_cb{k}": v for k, v in enumerate(coverage)}
        self._demo_metrics["demo_coverage"] = float(np.mean(coverage)) if coverage else math.nan
        return text

    def demo_metrics(self) -> dict[str, float]:
        return self._demo_metrics

    def preflight(self, model: nn.Module, batch: Batch) -> list[Finding]:
        """The doctor's model and batch checks on the decoder (the condition held fixed: unconditional)."""
        from scratchlab.doctor.preflight import preflight

        from scratchlab.doctor.preflight import check_deterministic_windows

        special = [self.cfg.model.codec.codebook_size + i for i in range(3)]
        # BOS/PAD may never be targets; EOS is a real target (the data layer keeps it), so only BOS/PAD are checked.
        findings = preflight(_Unconditioned(model), {"input_ids": batch["input_ids"], "labels": batch["labels"]},
                             special_token_ids=special[:2], overfit_steps=self.cfg.doctor.overfit_steps)
        # Field note: an inverted crop flag fed every clip's first seconds. Test the crop training uses.
        findings += check_deterministic_windows(CropProbe(self.data, self.cfg.train.seq_len, self.pattern,
                                                          self.cfg.train.seed))
        return findings


class CropProbe:
    """The training split's crops as a dataset (index = clip), for preflight's deterministic_windows check."""

    def __init__(self, data, window: int, pattern, seed: int) -> None:
        self.data, self.window, self.pattern = data, window, pattern
        self.ids = data.splits["train"]
        self.generator = torch.Generator().manual_seed(seed + 1)  # never the run's data generator

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return self.data.random_window(self.ids[index], self.window, self.pattern, self.generator)


class _Unconditioned(nn.Module):
    """The model as ids -> logits (what the generic checks call), with the empty condition."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model(codes)
