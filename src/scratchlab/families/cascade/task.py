"""The continuous-signal cascade family (`model.family: cascade`): frames in, frames out, no tokens.

The one loss (`signal_losses`), used by training, evaluation and preflight alike:

- reconstruction: MSE (or L1, ``model.cascade.recon``) of the prediction against the target frame.
  It is the logged ``loss`` / ``val_loss``: the figure comparable across runs and with the
  copy-last-frame baseline (``val_copy_baseline``: the same loss of predicting the last input frame).
- novelty: 1 - cos(prediction - last input frame, target - last input frame), the cosine over
  features, averaged over frames. It asks for the right *direction of change* whatever its size:
  0 when the change is predicted, 1 when it is not (a copy, whose predicted change is 0, scores 1).
  It differs from the reconstruction term, which an MSE on the changes would merely duplicate.

The objective is ``recon + model.cascade.novelty_weight x novelty``; both terms are logged
(``recon``, ``novelty``; ``val_recon``, ``val_novelty``).

Eval rows also carry the monitors' measurements (families/cascade/monitors.py, thresholds doctor.signal):
``val_rms_ratio`` (output RMS / target RMS), ``val_output_std_ratio`` (std over time of the output /
of the target, per window and feature), ``val_input_corr`` (correlation of the output with the last
input frame, per window and feature, centred over time; ``val_target_input_corr`` is the same for the
target, the level a perfect predictor shows), ``val_grad_norm`` and ``grad_top`` (the global gradient
norm of the objective on the first eval batch and the top 5 parameters by gradient norm: the
attribution the findings carry).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scratchlab.config import Config
from scratchlab.families.cascade.data import (
    SignalData,
    get_pairs,
    horizon_of,
    load_signals,
    usable_clips,
    window_of,
)
from scratchlab.doctor.findings import Finding
from scratchlab.doctor.preflight import preflight
from scratchlab.families.cascade.checks import preflight_checks
from scratchlab.errors import UserError
from scratchlab.runs.store import RunDir
from scratchlab.families.base import Batch, LossOutput, Task
from scratchlab.runtime import autocast

GRAD_TOP = 5
EPS = 1e-12


def signal_losses(pred: torch.Tensor, batch: Batch, recon: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, novelty) of predictions [B, T, F] for a batch from `signals.make_pairs`, in fp32."""
    pred, inputs, targets = pred.float(), batch["inputs"].float(), batch["targets"].float()
    rec = F.mse_loss(pred, targets) if recon == "mse" else F.l1_loss(pred, targets)
    novelty = 1 - F.cosine_similarity(pred - inputs, targets - inputs, dim=-1, eps=1e-8).mean()
    return rec, novelty


def grad_top(model: nn.Module, objective: torch.Tensor, k: int = GRAD_TOP) -> tuple[float, list[dict]]:
    """(global grad norm, top k parameters by grad norm) of ``objective``; the model's .grad is untouched."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(objective, [p for _, p in named], allow_unused=True)
    norms = [(n, float(g.float().norm())) for (n, _), g in zip(named, grads) if g is not None]
    total = math.sqrt(sum(v * v for _, v in norms)) if all(math.isfinite(v) for _, v in norms) else math.inf
    norms.sort(key=lambda item: -item[1] if math.isfinite(item[1]) else -math.inf)
    return total, [{"name": n, "grad_norm": v if math.isfinite(v) else str(v)} for n, v in norms[:k]]


class CascadeTask(Task):
    family = "cascade"

    def __init__(self, cfg: Config, announce=None) -> None:
        super().__init__(cfg, announce)
        self.data: SignalData = load_signals(cfg.data.path, cfg.data.val_fraction)
        c = cfg.model.cascade
        self.horizon = horizon_of(c.target, c.segment_len)
        window = cfg.train.seq_len + self.horizon
        for split, clips in (("train", self.data.train), ("val", self.data.val)):
            if usable_clips(clips, window) == 0:
                raise UserError(f"no {split} clip holds train.seq_len + horizon = {window} frames (longest: "
                                f"{max((len(x) for x in clips), default=0)}); lower train.seq_len or add longer clips")
        self._demo_metrics: dict[str, float] = {}

    # -- set-up

    def configure(self, cfg: Config) -> Config:
        """Set model.cascade.n_features from the data, or check the configured one against it."""
        c, n = cfg.model.cascade, self.data.n_features
        if c.n_features is None:
            cascade = c.model_copy(update={"n_features": n})
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"cascade": cascade})})
        elif c.n_features != n:
            raise UserError(f"model.cascade.n_features ({c.n_features}) does not match the data's {n} features per "
                            f"frame ({self.data.source}); remove it to use the data's")
        self.cfg = cfg
        return cfg

    @property
    def tokens_per_sample(self) -> int:
        return self.cfg.train.seq_len  # frames

    def data_summary(self) -> str:
        s = self.data.summary()
        window = self.cfg.train.seq_len + self.horizon
        short = len(self.data.train) - usable_clips(self.data.train, window)
        note = f" ({short} train clips shorter than a window of {window} are not used)" if short else ""
        return (f"{s['train']['clips']} train / {s['val']['clips']} val clips, {s['train']['frames']:,} / "
                f"{s['val']['frames']:,} frames of {s['n_features']} features from {s['source']}{note}")

    def write_assets(self, run: RunDir) -> None:
        run.write_json("data.json", {"path": self.data.source, "horizon": self.horizon, **self.data.summary(),
                                     "val_clips": self.data.val_names})

    # -- batches and the loss

    def train_batch(self, batch_size: int, generator: torch.Generator, rows: slice | None = None) -> Batch:
        return get_pairs(self.data.train, self.cfg.train.seq_len, self.horizon, batch_size, "random",
                         generator=generator, rows=rows)

    def val_batch(self, index: int) -> Batch:
        e = self.cfg.eval
        return get_pairs(self.data.val, self.cfg.train.seq_len, self.horizon, e.batch_size, "fixed",
                         batch_index=index, count=e.batches * e.batch_size)

    def loss(self, model: nn.Module, batch: Batch, precision: str = "fp32") -> LossOutput:
        c = self.cfg.model.cascade
        with autocast(batch["inputs"].device, precision):
            pred = model(batch["inputs"], batch["context"])
        recon, novelty = signal_losses(pred, batch, c.recon)
        objective = recon + c.novelty_weight * novelty
        logged = {"recon": recon.detach(), "novelty": novelty.detach()}
        scalars = getattr(model, "rms_scalars", None)
        if callable(scalars):  # learnable RMS scaling: watch the scalars the field notes saw explode
            logged.update(scalars())
        return LossOutput(loss=recon, objective=objective, logged=logged, outputs=pred)

    def describe_batch(self, batch: Batch, n_samples: int = 2, n_frames: int = 6, n_features: int = 4) -> str:
        h = self.horizon
        x, y, ctx = batch["inputs"], batch["targets"], batch["context"]
        shifted = bool(torch.equal(y[:, : x.shape[1] - h], x[:, h:])) if x.shape[1] > h else None
        lines = [f"# the first training batch: inputs/targets/context {tuple(x.shape)} (B, T, F), horizon {h}",
                 f"# targets[:, t] == inputs[:, t + {h}]: {shifted}; context[:, t] == targets[:, t - {h}] "
                 f"(zeros for t < {h}): {bool(torch.equal(ctx[:, h:], y[:, :-h])) and not bool(ctx[:, :h].any())}"]
        np.set_printoptions(precision=3, suppress=True, linewidth=120)
        for i in range(min(n_samples, x.shape[0])):
            lines.append(f"\n## sample {i}: first {n_frames} frames, first {n_features} features")
            for name, t in (("inputs", x), ("targets", y), ("context", ctx)):
                lines.append(f"{name}:\n{t[i, :n_frames, :n_features].float().numpy()}")
        return "\n".join(lines) + "\n"

    # -- evaluation, demos, checks

    def eval_targets(self, batch: Batch) -> float:
        return 1.0  # val_loss is the mean of the batches' reconstruction losses

    def eval_sums(self, batch: Batch, out: LossOutput) -> dict:
        pred, x, y = out.outputs.float(), batch["inputs"].float(), batch["targets"].float()
        copy_rec, _ = signal_losses(x, batch, self.cfg.model.cascade.recon)
        # Correlation with the last input frame, per window and feature, centred over time.
        pc, xc, yc = (t - t.mean(dim=1, keepdim=True) for t in (pred, x, y))
        return dict(recon=out.loss, novelty=out.logged["novelty"], copy=copy_rec, pred_sq=pred.pow(2).mean(),
                    tgt_sq=y.pow(2).mean(), pred_std=pred.std(dim=1).mean(), tgt_std=y.std(dim=1).mean(),
                    xy=(pc * xc).sum(), xx=xc.pow(2).sum(), pp=pc.pow(2).sum(), tx=(yc * xc).sum(),
                    tt=yc.pow(2).sum())

    def eval_metrics(self, sums: dict[str, float], model: nn.Module, device: torch.device, precision: str) -> dict:
        n = self.cfg.eval.batches
        row = {
            "val_recon": sums["recon"] / n,
            "val_novelty": sums["novelty"] / n,
            "val_copy_baseline": sums["copy"] / n,
            "val_rms_ratio": math.sqrt(sums["pred_sq"] / max(sums["tgt_sq"], EPS)),
            "val_output_std": sums["pred_std"] / n,
            "val_output_std_ratio": sums["pred_std"] / max(sums["tgt_std"], EPS),
            "val_input_corr": sums["xy"] / max(math.sqrt(sums["xx"] * sums["pp"]), EPS),
            "val_target_input_corr": sums["tx"] / max(math.sqrt(sums["xx"] * sums["tt"]), EPS),
        }
        # Gradient attribution on the first eval batch (autograd.grad: the trainer's .grad is untouched).
        batch = {k: v.to(device) for k, v in self.val_batch(0).items()}
        with torch.enable_grad():
            norm, top = grad_top(model, self.loss(model, batch, precision).objective)
        row["val_grad_norm"] = norm
        row["grad_top"] = top
        scalars = getattr(model, "rms_scalars", None)
        if callable(scalars):
            row.update({k: float(v) for k, v in scalars().items()})
        return row

    def demo(self, model: nn.Module, step: int, out_dir: Path, device: torch.device, precision: str) -> str | None:
        """A rollout from the first val clip: .npy of the predicted frames and a PNG against the truth."""
        from scratchlab.families.cascade.sampler import continue_clip

        try:
            T = self.cfg.train.seq_len
            clip = max(self.data.val, key=len)
            n_prompt = min(T, len(clip) // 2)
            n_new = min(T, len(clip) - n_prompt)
            result = continue_clip(model, clip, n_prompt, n_new, self.horizon, T, device, precision,
                                   out_dir / f"step_{step:06d}", title=f"step {step}")
        except Exception as exc:  # noqa: BLE001 - a demo never stops training
            return f"demo at step {step} failed ({type(exc).__name__}: {exc})"
        self._demo_metrics = {"demo_rollout_mse": result["rollout_mse"], "demo_hold_mse": result["hold_mse"]}
        return (f"demo step {step}: rollout of {n_new} frames after {n_prompt}: MSE {result['rollout_mse']:.4f} "
                f"(holding the last prompt frame: {result['hold_mse']:.4f}) -> {result['npy'].name}")

    def demo_metrics(self) -> dict[str, float]:
        return dict(self._demo_metrics)

    def preflight(self, model: nn.Module, batch: Batch) -> list[Finding]:
        """causal_leak and batch_leak through `make_pairs` (frames in, predictions out), then one backward of
        the family loss: non-finite values and gradient outliers among scalars (the learnable RMS scalars)."""
        return preflight(model, batch, loss=self.preflight_loss, checks=preflight_checks(self.horizon),
                         neg_inf_bad=True)
