"""Export a dense `lm` run as a Hugging Face `transformers` Llama directory (Qwen3 with QK-norm).

scratchlab's `lm` block is Llama's when the run uses what Llama has: RMSNorm, rotary embeddings
(both rotate the two halves of the head dim, so q/k need no permutation), SwiGLU, MHA/GQA, biases or
none, tied or untied embeddings, and plain logits. With `model.qk_norm` (the default preset) it is
Qwen3's: Llama plus an RMSNorm over each head's queries and keys before the rotation, as ours (Qwen3
has no MLP biases, so QK-norm with biases is refused). Anything else is refused with the settings that
have no equivalent. The export is written to a temporary folder, loaded back with
`AutoModelForCausalLM`, checked against scratchlab's own logits, and only then renamed into place.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from scratchlab.config import Config, ModelConfig
from scratchlab.data.text import EOS_TOKEN
from scratchlab.errors import UserError
from scratchlab.families.base import Exporter, LoadedRun
from scratchlab.families.lm.sampler import text_model
from scratchlab.runs.checkpoint import read_state
VERIFY_TOKENS = 32  # positions compared at export time
VERIFY_RTOL = 1e-3  # max |logit diff| allowed, relative to max |logit| (a wrong mapping is off by O(1))


@dataclass
class ExportResult:
    out_dir: Path
    checkpoint: Path
    step: int | None
    n_params: int
    max_abs_diff: float  # scratchlab vs transformers logits on the check input


def unmapped_features(cfg: ModelConfig) -> list[str]:
    """The settings of ``cfg`` that a Llama model cannot express (empty when the export is exact)."""
    out = []
    if cfg.family != "lm":
        out.append(f"model.family={cfg.family} (only the text `lm` family is a Llama)")
        return out  # the rest of the checks describe the lm block
    if cfg.attention != "mha":
        out.append(f"model.attention={cfg.attention} (Llama has MHA/GQA attention only)")
    if cfg.moe.n_routed_experts:
        out.append(f"model.moe.n_routed_experts={cfg.moe.n_routed_experts} (mixture of experts; Llama's FFN is dense)")
    if cfg.ffn != "swiglu":
        out.append(f"model.ffn={cfg.ffn} (Llama's FFN is SwiGLU)")
    if cfg.qk_norm and cfg.bias:
        out.append("model.qk_norm=true with model.bias=true (Qwen3, Llama with QK-norm, has no MLP biases)")
    if cfg.value_embed:
        out.append("model.value_embed=true (Llama has no value embeddings)")
    if cfg.attn_softcap:
        out.append(f"model.attn_softcap={cfg.attn_softcap} (Llama has no attention soft-cap)")
    if cfg.logit_softcap:
        out.append(f"model.logit_softcap={cfg.logit_softcap} (Llama has no logit soft-cap)")
    if cfg.logits_scale != 1.0:
        out.append(f"model.logits_scale={cfg.logits_scale} (Llama's logits are not scaled)")
    return out


def llama_config(cfg: ModelConfig, eos_id: int) -> dict:
    """config.json of the equivalent LlamaForCausalLM (Qwen3ForCausalLM with QK-norm)."""
    from scratchlab.layers.blocks import ffn_hidden

    head_dim = cfg.d_model // cfg.n_heads
    qwen3 = {  # Llama + q_norm / k_norm; every layer full attention
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": cfg.n_layers, "layer_types": ["full_attention"] * cfg.n_layers,
    } if cfg.qk_norm else {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden(cfg.d_model, cfg.ffn, cfg.ffn_mult),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        # GPT-2 style: <|endoftext|> ends each document and stands in for BOS (scratchlab's empty prompt).
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": "float32",  # transformers 4.x's key; 5.x reads "dtype"
        "dtype": "float32",
        **qwen3,
    }


def llama_state_dict(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """scratchlab `TransformerLM` weights under LlamaForCausalLM names.

    Every parameter must be consumed: one left over is a feature this mapping does not know, and refused.
    """
    params = dict(model.named_parameters())  # tied weights appear once, as tok_emb.weight
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return params[name].detach().float()

    n_q = cfg.n_heads * (cfg.d_model // cfg.n_heads)
    n_kv = (cfg.n_kv_heads or cfg.n_heads) * (cfg.d_model // cfg.n_heads)
    out = {"model.embed_tokens.weight": take("tok_emb.weight"), "model.norm.weight": take("norm.weight")}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        out[f"{dst}.input_layernorm.weight"] = take(f"{src}.attn_norm.weight")
        out[f"{dst}.post_attention_layernorm.weight"] = take(f"{src}.ffn_norm.weight")
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            # qkv rows: all query heads, then the key heads, then the value heads (each head-major).
            q, k, v = take(f"{src}.attn.qkv.{kind}").split([n_q, n_kv, n_kv], dim=0)
            gate, up = take(f"{src}.ffn.gate_up.{kind}").chunk(2, dim=0)  # SwiGLU: silu(first half) * second
            out.update({
                f"{dst}.self_attn.q_proj.{kind}": q,
                f"{dst}.self_attn.k_proj.{kind}": k,
                f"{dst}.self_attn.v_proj.{kind}": v,
                f"{dst}.self_attn.o_proj.{kind}": take(f"{src}.attn.proj.{kind}"),
                f"{dst}.mlp.gate_proj.{kind}": gate,
                f"{dst}.mlp.up_proj.{kind}": up,
                f"{dst}.mlp.down_proj.{kind}": take(f"{src}.ffn.down.{kind}"),
            })
        if cfg.qk_norm:
            out[f"{dst}.self_attn.q_norm.weight"] = take(f"{src}.attn.q_norm.weight")
            out[f"{dst}.self_attn.k_norm.weight"] = take(f"{src}.attn.k_norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("head.weight")
    left = sorted(set(params) - used)
    if left:
        raise UserError(f"cannot export to Hugging Face Llama: parameters with no Llama equivalent: {', '.join(left[:5])}")
    return {name: t.clone() for name, t in out.items()}  # own storage each: safetensors refuses shared memory


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new path or remove it")


def _write_tokenizer(tokenizer, folder: Path, max_len: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   model_max_length=max_len, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(folder))
    # transformers 5 writes its own class name; PreTrainedTokenizerFast loads in 4.x and 5.x alike.
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _verify(model: torch.nn.Module, folder: Path, vocab_size: int, max_len: int) -> float:
    """Max |logit difference| between scratchlab's model and the export loaded by transformers."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for loading a few files is noise on the console
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(folder))  # fp32: the weights' and config.json's dtype
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    hf.eval()
    ids = torch.randint(0, vocab_size, (2, min(VERIFY_TOKENS, max_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).float()
        theirs = hf(input_ids=ids).logits.float()
    diff = float((ours - theirs).abs().max())
    if not math.isfinite(diff) or diff > VERIFY_RTOL * max(1.0, float(ours.abs().max())):
        raise UserError(
            f"the exported model's logits differ from scratchlab's by {diff:.3g} (max abs): the architecture does not "
            "map exactly; please report it with the run's config.yaml"
        )
    return diff


def check_hf_export(cfg: Config, out_dir: Path, name: str = "this run") -> None:
    """Refuse, from the config alone, a run that cannot become a Llama directory at ``out_dir``."""
    missing = unmapped_features(cfg.model)
    if missing:
        raise UserError(
            f"cannot export {name} as a Hugging Face Llama model: {'; '.join(missing)}; only dense `lm` runs "
            "with SwiGLU, MHA/GQA and plain logits map (QK-norm: as Qwen3)"
        )
    if importlib.util.find_spec("transformers") is None:
        raise UserError("scratchlab export --format hf needs the hf extra: pip install -e '.[hf]'")
    _check_out_dir(Path(out_dir))


def export_hf(loaded: LoadedRun, out_dir: str | Path) -> ExportResult:
    """Write a loaded lm run's checkpoint as a Llama model directory.

    ``out_dir`` gets config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json and scratchlab_export.json (where it came from, and the logit check).
    """
    run, cfg, ckpt = loaded.run, loaded.cfg, loaded.checkpoint
    out = Path(out_dir)
    check_hf_export(cfg, out, run.path.name)

    from safetensors.torch import save_file
    from transformers import GenerationConfig

    model, tokenizer, eos_id = text_model(loaded)
    weights = llama_state_dict(model, cfg.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(llama_config(cfg.model, eos_id), indent=2) + "\n")
        GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(str(tmp))
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors writes 0600 (a temp file renamed); give the weights the same mode as the other files.
        os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
        _write_tokenizer(tokenizer, tmp, cfg.model.max_seq_len)
        diff = _verify(model, tmp, cfg.model.vocab_size, cfg.model.max_seq_len)
        step = read_state(ckpt).get("step") if (ckpt / "state.json").exists() else None
        n_params = sum(t.numel() for t in weights.values())
        (tmp / "scratchlab_export.json").write_text(json.dumps({
            "run": str(run.path.resolve()), "checkpoint": ckpt.name, "step": step, "format": "hf-llama",
            "n_params": n_params, "max_abs_logit_diff": diff,
        }, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir=out, checkpoint=ckpt, step=step, n_params=n_params, max_abs_diff=diff)


def export_hf_line(loaded: LoadedRun, out_dir: Path) -> str:
    """The lm family's `scratchlab export --format hf`: export, then say what was written."""
    result = export_hf(loaded, out_dir)
    return (
        f"wrote {result.out_dir}: Llama model ({result.n_params:,} params) from {result.checkpoint.name} "
        f"(step {result.step}), tokenizer and config; transformers' logits match scratchlab's within "
        f"{result.max_abs_diff:.1e}\nload it with: AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})"
    )


HF_EXPORTER = Exporter(check=lambda cfg, out: check_hf_export(cfg, out), write=export_hf_line)
