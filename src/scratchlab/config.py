"""Typed run configuration: presets, YAML files and dotted command-line overrides.

A config is built in one way only: `load_config(source, overrides)`. The source is
a preset name shipped with the package (``tiny-lm``) or a path to a YAML file; the
overrides are ``section.key=value`` strings whose values are parsed as YAML
scalars (``optim.lr=3e-4``, ``model.bias=false``, ``demo.temperatures=[0,1]``).
Unknown keys fail with a did-you-mean; wrong types name the field.
"""

from __future__ import annotations

import difflib
import types
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from scratchlab.errors import UserError, shorten

MAX_OVERRIDE_CHARS = 10_000  # one key=value on the command line
MAX_CONFIG_BYTES = 1 << 20  # a YAML config file
MAX_NAME = 100  # train.name (the run dir name adds a timestamp)


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored. No float may be inf or nan
    # (optim.lr=inf would train on nothing but NaN): every float field is finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    path: str = Field(
        "stdlib",
        description="A data dir made by `scratchlab data text`, or 'stdlib' for the "
        "built-in corpus (this interpreter's standard-library source, prepared and cached on first use).",
    )
    vocab_size: int = Field(4096, ge=260, description="BPE vocabulary size when preparing the stdlib corpus.")
    max_mb: float = Field(0.0, ge=0, description="Cap on the stdlib corpus in MB of text (0 = all of it).")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Codes/feature folders: fraction of clips held out for validation (by file name)."
    )
    shuffle_tags: bool = Field(True, description="Codec LM: shuffle each clip's tag order per training sample.")


class MoEConfig(_Section):
    n_routed_experts: int = Field(0, ge=0, description="Routed experts per MoE FFN (0 = dense FFN).")
    n_shared_experts: int = Field(0, ge=0, description="Always-on experts.")
    top_k: int = Field(2, ge=1)
    expert_ffn: Literal["gelu", "swiglu"] = "gelu"
    expert_mult: float = Field(1.0, gt=0, description="Each expert's hidden width / d_model.")
    score: Literal["softmax", "sigmoid"] = "softmax"
    balance: Literal["aux_loss", "bias"] = Field(
        "aux_loss", description="aux_loss: Switch load-balance loss; bias: DeepSeek-V3 aux-loss-free bias."
    )
    aux_loss_coef: float = Field(0.01, ge=0)
    bias_update_rate: float = Field(1e-3, ge=0)
    capacity_factor: float = Field(0.0, ge=0, description="Drop assignments beyond cf * N * k / E per expert (0 = off).")

    @model_validator(mode="after")
    def _check_top_k(self) -> "MoEConfig":
        if self.n_routed_experts and self.top_k > self.n_routed_experts:
            raise ValueError(
                f"model.moe.top_k ({self.top_k}) is above model.moe.n_routed_experts ({self.n_routed_experts})"
            )
        return self


class MLAConfig(_Section):
    """Multi-head latent attention (DeepSeek-V2): low-rank queries, compressed keys/values, decoupled RoPE."""

    q_lora_rank: int = Field(0, ge=0, description="Query latent width (0 = full-rank queries).")
    kv_lora_rank: int = Field(64, ge=1, description="Compressed key/value latent width (what the KV cache stores).")
    qk_nope_head_dim: int = Field(32, ge=1, description="Per-head content (no RoPE) part of queries/keys.")
    qk_rope_head_dim: int = Field(16, ge=2, description="Per-head RoPE part; the rope key is shared by all heads.")
    v_head_dim: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check_rope(self) -> "MLAConfig":
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.mla.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE")
        return self


class CodecConfig(_Section):
    """The ``codec_lm`` family: K codebooks of audio-codec tokens, delay-interleaved (families/codec/patterns.py)."""

    n_codebooks: int | None = Field(None, ge=1, description="K; defaults to the data's.")
    codebook_size: int | None = Field(None, ge=2, description="Entries per codebook; defaults to the data's.")
    pattern: Literal["parallel", "musicgen", "dia", "custom"] = "musicgen"
    delays: list[int] | None = Field(None, description="pattern=custom: one delay per codebook (frames).")
    codebook_weights: list[float] | None = Field(
        None, description="Loss weight per codebook (e.g. [4,1,1,...]); None = equal."
    )
    conditioning: Literal["text", "none"] = Field(
        "text", description="text: cross-attention to a byte-level encoder of the manifest text and tags."
    )
    text_layers: int = Field(2, ge=1, description="Byte text encoder depth.")
    text_d_model: int = Field(128, ge=8, description="Byte text encoder width.")
    text_heads: int = Field(4, ge=1)
    max_text_bytes: int = Field(128, ge=2, description="Condition length in bytes (longer text is cut).")
    frame_rate: float | None = Field(None, gt=0, description="Codec frames per second; defaults to the data's.")

    @model_validator(mode="after")
    def _check(self) -> "CodecConfig":
        if self.pattern == "custom" and not self.delays:
            raise ValueError("model.codec.pattern=custom needs model.codec.delays (one per codebook)")
        if self.delays and any(d < 0 for d in self.delays):
            raise ValueError(f"model.codec.delays must be >= 0 (got {self.delays})")
        if self.codebook_weights and any(w < 0 for w in self.codebook_weights):
            raise ValueError(f"model.codec.codebook_weights must be >= 0 (got {self.codebook_weights})")
        if self.text_d_model % self.text_heads:
            raise ValueError(
                f"model.codec.text_d_model ({self.text_d_model}) must be divisible by model.codec.text_heads "
                f"({self.text_heads})"
            )
        return self


class CascadeConfig(_Section):
    """The ``cascade`` family: stages of decoder blocks over continuous frames (docs/cascade.md)."""

    n_stages: int = Field(2, ge=1, description="Transformer stages, each of model.n_layers blocks.")
    residual_weights: list[float] = Field(
        [1.0, 0.1], description="Per stage, the weight of its residual: the previous stage's output (stage 1: the input)."
    )
    n_features: int | None = Field(None, ge=1, description="Features per frame; defaults to the data's.")
    rms_scaling: Literal["fixed", "learnable"] = Field(
        "fixed", description="Output RMS = sqrt((input_rms^2 + target_rms^2)/2) (fixed), or with learnable gain/mix."
    )
    scale_lr_mult: float = Field(0.1, gt=0, description="learnable: the scaling scalars' LR = optim.lr x this.")
    scale_max_norm: float = Field(0.1, ge=0, description="learnable: the scaling scalars' own grad clip (0 = off).")
    recon: Literal["mse", "l1"] = Field("mse", description="Reconstruction loss (the logged `loss` / `val_loss`).")
    novelty_weight: float = Field(0.85, ge=0, description="Weight of the novelty term in the objective.")
    target: Literal["next_frame", "next_segment"] = Field(
        "next_frame", description="next_frame: predict frame t+1; next_segment: frame t+segment_len."
    )
    segment_len: int = Field(4, ge=1, description="next_segment: the horizon in frames.")

    @model_validator(mode="after")
    def _check_weights(self) -> "CascadeConfig":
        if len(self.residual_weights) != self.n_stages:
            raise ValueError(
                f"model.cascade.residual_weights has {len(self.residual_weights)} values for "
                f"model.cascade.n_stages={self.n_stages}; give one weight per stage"
            )
        return self


# model.<section> -> the one family it belongs to. A family's own settings are refused for every other
# family (a codec setting on an lm run must never be silently ignored). The family folders name their
# section in FamilySpec.config_section (tests/test_config.py checks the two agree); config sits below
# the families and does not import them.
FAMILY_SECTIONS: dict[str, str] = {"codec": "codec_lm", "cascade": "cascade"}


class ModelConfig(_Section):
    family: str = Field(
        "lm", description="The model family (families/registry.py): lm, codec_lm, cascade, or a registered one."
    )
    n_layers: int = Field(4, ge=1)
    d_model: int = Field(256, ge=8)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="Fewer than n_heads = grouped-query attention.")
    ffn: Literal["swiglu", "gelu", "gelu_affine", "relu2"] = Field(
        "swiglu", description="gelu_affine: gelu(a*x+b) with learned per-channel a, b; relu2: relu(x)^2 (modded-nanogpt)."
    )
    ffn_mult: float = Field(4.0, gt=0, description="Hidden width / d_model (SwiGLU uses 2/3 of it, as in LLaMA).")
    bias: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = Field(1024, ge=1, description="Longest context the model supports (RoPE table size).")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init: Literal["normal", "xavier", "depth_scaled", "truncated_normal"] = "depth_scaled"
    init_std: float = Field(0.02, gt=0)
    logits_scale: float = Field(1.0, gt=0, description="Fixed multiplier on the output logits.")
    qk_norm: bool = Field(False, description="RMSNorm on each head's queries and keys.")
    attn_softcap: float = Field(0.0, ge=0, description="tanh soft-cap of attention logits (0 = off).")
    logit_softcap: float = Field(0.0, ge=0, description="tanh soft-cap of the output logits (0 = off).")
    vocab_size: int | None = Field(None, ge=2, description="Defaults to the data's vocabulary size.")
    zero_init_out: bool = Field(
        False, description="Attention out-projections and FFN down-projections start at 0 (each block starts as identity)."
    )
    value_embed: bool = Field(
        False, description="lm family, mha: a token embedding (shared by all layers) added to attention values."
    )
    moe: MoEConfig = MoEConfig()
    attention: Literal["mha", "mla"] = Field("mha", description="mha: MHA/GQA (n_kv_heads); mla: latent attention.")
    mla: MLAConfig = MLAConfig()
    codec: CodecConfig | None = Field(None, description="model.family=codec_lm only (filled with its defaults there).")
    cascade: CascadeConfig | None = Field(None, description="model.family=cascade only (filled with its defaults there).")

    # A validator on the raw mapping rather than a discriminated union of one ModelConfig per family:
    # the union would need a callable discriminator for the default family, would give `cfg.model` a
    # different class per family (and pydantic's union errors name the variant, not the field), and a
    # new family without a section would still need a variant here. One check keeps one class, one
    # error line, and a registry-only family (no section) needs nothing in this file.
    @model_validator(mode="before")
    @classmethod
    def _family_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        family = data.get("family", "lm")
        data = dict(data)
        for section, owner in FAMILY_SECTIONS.items():
            given = data.get(section)
            if family == owner:
                if given is None:  # the family's own section: its defaults unless given
                    # An instance, not {}: on attribute assignment pydantic keeps the other fields as
                    # this validator returns them, unvalidated.
                    data[section] = _section_class(section)()
            elif given is not None:
                if _is_legacy_default_dump(section, given):
                    # Run records written before sections were per-family hold every section with its
                    # defaults; such a section says nothing, and the run must still load and resume.
                    del data[section]
                    continue
                raise PydanticCustomError(
                    "family_section",
                    "model.{section} is only valid for model.family={owner} (this config has "
                    "model.family={family}); remove it or set model.family",
                    {"section": section, "owner": owner, "family": family},
                )
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.attention == "mla":  # MLA sets its own head dims (model.mla.*)
            return self
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("model.d_model / model.n_heads must be even for RoPE")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({kv})")
        return self


class ClipConfig(_Section):
    max_norm: float = Field(1.0, ge=0, description="Gradient-norm clip threshold (0 = no clipping).")
    warmup_steps: int = Field(0, ge=0, description="Steps over which the threshold rises from start_frac*max_norm.")
    start_frac: float = Field(0.1, gt=0, le=1)


class TrainConfig(_Section):
    name: str = Field("run", min_length=1, max_length=MAX_NAME, description="Run name (the run dir's suffix).")
    out_dir: str = Field("runs", min_length=1, max_length=4096)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast where the device has fast bf16 matmuls, else fp32."
    )
    seed: int = 1337
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=2)
    log_every: int = Field(10, ge=1)
    save_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    clip: ClipConfig = ClipConfig()
    z_loss: float = Field(0.0, ge=0, description="Coefficient of the auxiliary z-loss (logsumexp^2); 0 = off.")
    uncond_prob: float = Field(
        0.0, ge=0, le=1, description="Codec LM: fraction of samples trained with the empty condition (enables CFG)."
    )
    # Scale-out (docs/distributed.md). Under torchrun, batch_size stays the GLOBAL batch per micro-step.
    parallel: Literal["none", "ddp", "fsdp", "auto"] = Field(
        "none", description="Under torchrun: ddp | fsdp (FSDP2 fully_shard) | auto (= ddp); ignored in one process."
    )
    compile: bool = Field(False, description="torch.compile the model (falls back to eager, with a warning, if it fails).")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward (lm, codec_lm): less memory, ~1/3 more compute."
    )


class OptimConfig(_Section):
    """The optimizer by parameter role (train/optim.py): hidden matrices, embeddings, output head, vectors/scalars.

    Every group's LR is its own base LR below x the schedule's factor (warmup, cosine / wsd / constant).
    """

    name: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw: AdamW for every parameter. muon: torch.optim.Muon for the hidden matrices "
        "(attention, FFN, MoE experts, MLA, cascade stages), AdamW for embeddings, output heads, norms, "
        "biases and scalars.",
    )
    lr: float = Field(
        3e-3, gt=0, description="AdamW's LR: every parameter (adamw), the AdamW side's default (muon)."
    )
    min_lr_frac: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr (cosine / wsd).")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd: fraction of steps spent decaying.")
    # Per-role LRs of the AdamW groups (None = optim.lr). Set under adamw too, they split the group out.
    embed_lr: float | None = Field(None, gt=0, description="LR of the input embeddings (None = optim.lr).")
    head_lr: float | None = Field(
        None, gt=0, description="LR of an untied output head (model.tie_embeddings=false; None = optim.lr)."
    )
    scalar_lr: float | None = Field(
        None, gt=0, description="LR of norms, biases and other vector/scalar parameters (None = optim.lr)."
    )
    # Muon (optim.name=muon): the hidden matrices only.
    muon_lr: float = Field(
        0.02, gt=0, description="muon: base LR of the hidden matrices, before the shape rule of muon_adjust_lr."
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: momentum of the orthogonalised update.")
    muon_nesterov: bool = Field(True, description="muon: Nesterov momentum.")
    muon_ns_steps: int = Field(5, ge=1, le=20, description="muon: Newton-Schulz iterations per step.")
    muon_weight_decay: float = Field(
        0.0, ge=0, description="muon: decoupled weight decay of the hidden matrices (W -= muon_lr x this x W)."
    )
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = Field(
        "original",
        description="muon: LR scale by matrix shape [A, B]: original = sqrt(max(1, A/B)) (Keller Jordan; "
        "muon_lr ~0.02); match_rms_adamw = 0.2 sqrt(max(A, B)) (Moonshot; update RMS like AdamW's, "
        "muon_lr ~ an AdamW LR).",
    )


class EvalConfig(_Section):
    every: int = Field(250, ge=1)
    batches: int = Field(8, ge=1, description="Fixed validation batches per evaluation.")
    batch_size: int = Field(16, ge=1)


class DemoConfig(_Section):
    every: int = Field(500, ge=1)
    prompts: list[str] = ["def ", "import ", "class "]
    temperatures: list[Annotated[float, Field(ge=0)]] = Field([0.0, 0.5, 1.0], description="0 = greedy.")
    max_new_tokens: int = Field(64, ge=1)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    cfg_scales: list[Annotated[float, Field(ge=0)]] = Field(
        [1.0, 3.0], description="Codec LM: classifier-free guidance scales for demos."
    )
    seconds: float = Field(2.0, gt=0, description="Codec LM: demo length in seconds (frames = seconds * frame_rate).")


class LogConfig(_Section):
    progress: Literal["auto", "bar", "lines"] = "auto"
    # Experiment-tracker sinks (runs/sinks.py): copies of metrics.jsonl, the config and the findings.
    tensorboard: bool = Field(False, description="Also write TensorBoard events to RUN/tensorboard (extra: tensorboard).")
    wandb: bool = Field(False, description="Also log to a Weights & Biases run in RUN/wandb (extra: wandb).")
    wandb_project: str = Field("scratchlab", description="W&B project name.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: no network, upload later with `wandb sync RUN/wandb/offline-run-*`."
    )
    mlflow: bool = Field(False, description="Also log to an MLflow run (extra: mlflow).")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite under RUN/mlflow).")
    mlflow_experiment: str = Field("scratchlab", description="MLflow experiment name.")


class SignalMonitorConfig(_Section):
    """Thresholds of the monitors of continuous outputs (eval rows of the cascade family; docs/cascade.md)."""

    rms_ratio_low: float = Field(0.8, gt=0, description="output_rms_off: output RMS / target RMS below this.")
    rms_ratio_high: float = Field(1.2, gt=0, description="output_rms_off: output RMS / target RMS above this.")
    constant_std: float = Field(
        0.1, ge=0, description="output_constant: output std over time / target std over time below this."
    )
    copy_corr: float = Field(0.3, ge=-1, le=1, description="output_copies_input: correlation with the input above this")
    copy_novelty: float = Field(0.9, ge=0, description="... while val_novelty (1 = change not predicted) is above this.")
    grad_norm_max: float | None = Field(
        None, ge=0, description="grad_explosion: global grad norm above this; None = 100 for cascade, off otherwise; 0 = off."
    )


class DoctorConfig(_Section):
    preflight: bool = Field(True, description="Check the model and a real batch before step 0.")
    allow_errors: bool = Field(False, description="Start training even when preflight reports errors.")
    overfit_steps: int = Field(0, ge=0, description="Preflight also tries to overfit one batch for this many steps.")
    monitors: bool = Field(True, description="Watch the metrics while training (clip saturation, spikes, ...).")
    signal: SignalMonitorConfig = SignalMonitorConfig()


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    demo: DemoConfig = DemoConfig()
    log: LogConfig = LogConfig()
    doctor: DoctorConfig = DoctorConfig()

    @model_validator(mode="after")
    def _check_context(self) -> "Config":
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) is above model.max_seq_len ({self.model.max_seq_len}): "
                "lower train.seq_len or raise model.max_seq_len"
            )
        return self


def _is_legacy_default_dump(section: str, given: Any) -> bool:
    """True when ``given`` is exactly what ``to_yaml`` wrote for an unused section before sections
    became per-family: every field, each at its default."""
    return given == _section_class(section)().model_dump(mode="json")


def _section_class(section: str) -> type[_Section]:
    return {"codec": CodecConfig, "cascade": CascadeConfig}[section]


# ---------------------------------------------------------------- loading


def preset_names() -> list[str]:
    folder = resources.files("scratchlab") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors/aliases: a few bytes of aliases can expand into gigabytes (a 'YAML bomb')."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in configs; "
                                              "write the value out", event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """yaml.safe_load, refusing aliases (no expansion into huge values)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = safe_yaml(text)
    except RecursionError as exc:
        raise UserError(f"{where}: nested too deeply to be a config") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{where}: invalid YAML{at}: {getattr(exc, 'problem', exc)}; fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of sections (data:, model:, train:, ...), got {type(data).__name__}")
    return data


def read_source(source: str | Path) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML path."""
    text_source = str(source)
    if text_source in preset_names():
        text = (resources.files("scratchlab") / "presets" / f"{text_source}.yaml").read_text()
        return _read_yaml(text, f"preset {text_source}")
    path = Path(text_source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file {path} not found; give a YAML path or a preset ({', '.join(preset_names())})")
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise UserError(f"config file {path} is {path.stat().st_size:,} bytes; a config is under "
                                f"{MAX_CONFIG_BYTES:,}: is it the right file?")
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"config file {path} is not UTF-8 text (byte {exc.start}); fix or restore it") from exc
        except OSError as exc:
            raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        return _read_yaml(text, str(path))
    hint = difflib.get_close_matches(text_source[:200], preset_names(), n=1)
    extra = f"; did you mean '{hint[0]}'?" if hint else f"; presets: {', '.join(preset_names())}"
    raise UserError(f"unknown preset or config file {shorten(text_source)}{extra}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "model.bias=true"]`` -> nested dict with YAML-typed values."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {shorten(item)} must look like section.key=value (e.g. optim.lr=3e-4)")
        if len(item) > MAX_OVERRIDE_CHARS:
            raise UserError(f"override {shorten(key, 80)}=... is {len(item):,} characters; an override is under "
                            f"{MAX_OVERRIDE_CHARS:,} (put long values in a YAML config file)")
        try:
            value = safe_yaml(raw) if raw != "" else ""
        except yaml.composer.ComposerError as exc:
            raise UserError(f"override {shorten(key, 80)}: YAML aliases (*name) are not allowed; write the value "
                            "out") from exc
        except (yaml.YAMLError, RecursionError):
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {shorten(item)} conflicts with an earlier override of "
                                f"{shorten(part, 80)}")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field's annotation: ``CodecConfig`` for ``CodecConfig | None`` too."""
    if get_origin(annotation) in (Union, types.UnionType):
        found = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return found[0] if len(found) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _known_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        section = _section_model(field.annotation) if field is not None else None
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def _explain(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    if err["type"] == "family_section":  # names its own field and fix
        return err["msg"]
    if err["type"] == "extra_forbidden":
        known = _known_keys(Config, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f"did you mean '{'.'.join(loc[:-1] + (hint[0],))}'?" if hint else f"known keys: {', '.join(known)}"
        return f"unknown config key {shorten(dotted, 120)}; {suggestion}"
    if not loc:  # a model-level validator: its message already names the fields
        return err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {shorten(got)})"
    return f"config field '{dotted[:120]}': {err['msg'].removeprefix('Value error, ')[:300]}{got_text}"


def build_config(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_explain(exc)) from exc


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a preset or YAML file plus dotted overrides into a validated Config."""
    raw = read_source(source) if source is not None else read_source("tiny-lm")
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return build_config(raw)


def config_record(config: Config) -> dict[str, Any]:
    """The config as plain data, as runs record it (config.yaml, the trackers); ``build_config``
    reads it back to the same Config.

    Sections of other families are None and left out: written as ``codec: null`` they would only
    clutter the record (and a reader of an older scratchlab would take null for a bad value).
    """
    raw = config.model_dump(mode="json")
    for section in FAMILY_SECTIONS:
        if raw["model"].get(section) is None:
            raw["model"].pop(section, None)
    return raw


def to_yaml(config: Config) -> str:
    """The config as YAML, as each run's config.yaml (``config_record``)."""
    return yaml.safe_dump(config_record(config), sort_keys=False)
