"""The ``cascade`` family: stages of causal decoder blocks over continuous frames (no tokens).

    stage 1:  concat(input, context)          -> Linear -> n_layers x Block -> RMSNorm -> Linear -> + w1 x input
    stage k:  concat(input, out_{k-1}, context) -> ... same ...                                 -> + wk x out_{k-1}
    each stage's output is then RMS-scaled (below); the last stage's output is the prediction.

The **residual** of a stage is the previous stage's (scaled) output, and the input frames for stage 1:
with w1 = 1.0 stage 1 predicts the change from the current frame; with w2 = 0.1 the last stage keeps
only a small direct path to the earlier outputs ("reduces leakage" in the field notes).

**RMS scaling** is causal: every RMS is a running one over frames 0..t (and all features), so the
output at t never depends on a later frame. With r_in, r_ctx the running RMS of the input and of the
known context (the context's first ``horizon`` frames are unknown zeros; until one is known r_ctx = r_in),
and r_raw that of the stage's raw output:

    fixed:      out = raw * sqrt((r_in^2 + r_ctx^2) / 2) / r_raw
    learnable:  out = raw * exp(log_gain) * sqrt(mix_in * r_in^2 + mix_ctx * r_ctx^2) / r_raw

The learnable scalars (``*.rms_scale.*``: log_gain from 0, mix from 0.5) are the field notes' failure:
their gradients sum over every output value, 100-10,000x those of a matrix entry. They get their own
optimizer group (``param_groups_hint``: model.cascade.scale_lr_mult, scale_max_norm).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scratchlab.config import ModelConfig
from scratchlab.layers.blocks import RMSNorm, rope_tables
from scratchlab.layers.decoder import Block, require_dense_blocks
from scratchlab.layers.init import init_weights

EPS = 1e-8


def running_ms(x: torch.Tensor, known_from: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(running mean square over frames known_from..t and features [B, T, 1], count of frames in it [1, T, 1])."""
    per_frame = x.float().pow(2).mean(dim=-1, keepdim=True)
    if known_from:
        per_frame = per_frame.clone()
        per_frame[:, :known_from] = 0
    count = (torch.arange(x.shape[1], device=x.device) + 1 - known_from).clamp_min(0).view(1, -1, 1)
    return per_frame.cumsum(dim=1) / count.clamp_min(1), count


class RMSScale(nn.Module):
    """Scales a stage's raw output to the reference RMS of its input and context (causal, see the module doc)."""

    def __init__(self, learnable: bool) -> None:
        super().__init__()
        self.learnable = learnable
        if learnable:
            self.log_gain = nn.Parameter(torch.zeros(()))
            self.mix = nn.Parameter(torch.full((2,), 0.5))

    def forward(self, raw: torch.Tensor, ms_in: torch.Tensor, ms_ctx: torch.Tensor) -> torch.Tensor:
        ms_raw, _ = running_ms(raw)
        if self.learnable:
            ref = self.mix[0] * ms_in + self.mix[1] * ms_ctx
            gain = self.log_gain.exp()
        else:
            ref, gain = 0.5 * (ms_in + ms_ctx), 1.0
        # No clamp on ref: learnable mix weights that go negative make NaN, as in the field notes;
        # the monitors are there to catch the run before that.
        return (raw.float() * gain * torch.sqrt(ref / (ms_raw + EPS))).to(raw.dtype)


class CascadeStage(nn.Module):
    def __init__(self, cfg: ModelConfig, n_inputs: int, n_features: int, learnable: bool) -> None:
        super().__init__()
        self.proj_in = nn.Linear(n_inputs * n_features, cfg.d_model, bias=cfg.bias)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, n_features, bias=cfg.bias)
        self.rms_scale = RMSScale(learnable)

    def forward(self, parts: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(torch.cat(parts, dim=-1))
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.head(self.norm(h))


class CascadeModel(nn.Module):
    """forward(inputs [B, T, F], context [B, T, F]) -> predictions [B, T, F] of the targets (signals.make_pairs)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.cascade
        if c.n_features is None:
            raise ValueError("model.cascade.n_features must be set (the trainer fills it from the data)")
        require_dense_blocks(cfg, "cascade")
        self.cfg = cfg
        self.n_features = c.n_features
        self.horizon = c.segment_len if c.target == "next_segment" else 1
        self.residual_weights = list(c.residual_weights)
        learnable = c.rms_scaling == "learnable"
        # Stage 1 sees (input, context); later stages also the previous stage's output.
        self.stages = nn.ModuleList(
            CascadeStage(cfg, 2 if k == 0 else 3, c.n_features, learnable) for k in range(c.n_stages)
        )
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg.init, cfg.init_std, cfg.n_layers * c.n_stages)

    def stage_outputs(self, inputs: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's scaled output, first to last."""
        T = inputs.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} frames exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        ms_in, _ = running_ms(inputs)
        ms_ctx, known = running_ms(context, known_from=self.horizon)
        ms_ctx = torch.where(known > 0, ms_ctx, ms_in)  # no target known yet: the input alone sets the level
        outputs, previous = [], inputs
        for k, (stage, weight) in enumerate(zip(self.stages, self.residual_weights)):
            parts = [inputs, context] if k == 0 else [inputs, previous, context]
            raw = stage(parts, cos, sin) + weight * previous
            previous = stage.rms_scale(raw, ms_in, ms_ctx)
            outputs.append(previous)
        return outputs

    def forward(self, inputs: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.stage_outputs(inputs, context)[-1]

    # -- what the trainer and the doctor ask of a model

    def param_groups_hint(self) -> list[dict]:
        """Parameters that need their own optimizer group: the learnable RMS scalars (lower LR, own clip)."""
        scalars = [p for n, p in self.named_parameters() if ".rms_scale." in n]
        if not scalars:
            return []
        c = self.cfg.cascade
        return [{"name": "rms_scale", "params": scalars, "lr_mult": c.scale_lr_mult, "max_norm": c.scale_max_norm,
                 "weight_decay": 0.0}]

    def rms_scalars(self) -> dict[str, torch.Tensor]:
        """The learnable scalars' values of the last stage (logged), {} when scaling is fixed.

        0-dim device tensors (the trainer reads them once per log row; no host sync in the loss)."""
        scale = self.stages[-1].rms_scale
        if not scale.learnable:
            return {}
        mix = scale.mix.detach().float().reshape(-1)
        gain = scale.log_gain.detach().float().reshape(()).exp()
        # The output RMS over the fixed scaling's (equal input and context levels): 1 at init; NaN if the mix is < 0.
        total = mix.sum()
        factor = torch.where(total >= 0, gain * total.clamp(min=0).sqrt(), torch.full_like(total, math.nan))
        return {"rms_gain": gain, "rms_mix_in": mix[0], "rms_mix_ctx": mix[1], "rms_scale_factor": factor}

    def num_params(self, exclude_embeddings: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per frame: 6 x params + attention (as the lm family counts them)."""
        layers = self.cfg.n_layers * len(self.stages)
        return 6 * self.num_params() + 12 * layers * self.cfg.d_model * seq_len
