"""`scratchlab export --format hf`: real runs exported, loaded with transformers, compared with scratchlab.

The export must give the same logits (fp32, max abs diff < 1e-4) and the same greedy continuation,
through AutoModelForCausalLM and AutoTokenizer; every architecture Llama (Qwen3 with QK-norm) cannot express
is refused.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_tiny, tiny_overrides
from scratchlab.families.lm import export as export_module
from scratchlab.cli import main
from scratchlab.config import load_config, to_yaml
from scratchlab.errors import UserError
from scratchlab.export import export_run
from scratchlab.families.lm.export import export_hf, unmapped_features
from scratchlab.families.lm.sampler import generate
from scratchlab.families.lm.sampler import text_model
from scratchlab.runs.load import load_run


def load_run_model(run):
    return text_model(load_run(run))

TEXT = 'def main(argv=None):\n    """Run it."""\n    return 0\n'

# The tiny test lm (MHA, tied embeddings, no bias: a Llama), the same with QK-norm as the default preset has (a
# Qwen3), and a Llama with GQA, untied head, biases and another RoPE base.
ARCHITECTURES = {
    "default": {},
    "qk-norm": dict(model__qk_norm="true"),
    "gqa-untied-bias": dict(model__n_heads=4, model__n_kv_heads=2, model__tie_embeddings="false", model__bias="true",
                            model__rope_theta=500.0),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def exported(request, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # More steps than the fixture default so the weights are far from init (a mapping error shows).
        run = run_tiny(data_dir, root / "runs", train__max_steps=30, eval__every=15, demo__every=1000,
                       train__save_every=15, **ARCHITECTURES[request.param]).run_dir
        result = export_hf(load_run(run), root / "hf")
    finally:
        torch.set_num_threads(threads)
    return run, result


def test_transformers_gives_the_same_logits(exported):
    run, result = exported
    model, tokenizer, eos_id = load_run_model(run)
    hf = AutoModelForCausalLM.from_pretrained(str(result.out_dir)).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(result.out_dir))
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if model.cfg.qk_norm else "LlamaForCausalLM")
    assert next(hf.parameters()).dtype == torch.float32
    assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings
    assert hf.num_parameters() == model.num_params() == result.n_params

    ids = hf_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tokenizer.encode(TEXT, add_special_tokens=False).ids  # no BOS added, same BPE
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    assert ours.abs().max() > 1  # trained logits, not a near-uniform init where anything would match
    assert (ours - theirs).abs().max().item() < 1e-4
    assert result.max_abs_diff < 1e-4


def test_transformers_greedy_generation_matches(exported):
    run, result = exported
    model, tokenizer, eos_id = load_run_model(run)
    hf = AutoModelForCausalLM.from_pretrained(str(result.out_dir)).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(result.out_dir))
    assert hf_tokenizer.eos_token_id == eos_id == hf.generation_config.eos_token_id
    for prompt in ("def ", "import os\n"):
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        ours = generate(model, ids, 12, temperature=0.0, eos_id=eos_id)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        theirs = out[: out.index(eos_id)] if eos_id in out else out  # scratchlab does not return the EOS
        assert ours == theirs and len(ours) > 0
        assert hf_tokenizer.decode(theirs) == tokenizer.decode(ours)


def test_export_dir_contents(exported):
    run, result = exported
    files = {p.name for p in result.out_dir.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "scratchlab_export.json"}
    config = json.loads((result.out_dir / "config.json").read_text())
    cfg = load_run_model(run)[0].cfg
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == cfg.rope_theta
    assert config["num_key_value_heads"] == (cfg.n_kv_heads or cfg.n_heads)
    record = json.loads((result.out_dir / "scratchlab_export.json").read_text())
    assert record["checkpoint"] == "best" and record["step"] == result.step == 30
    assert not list(result.out_dir.parent.glob(".tmp-*"))


# ---------------------------------------------------------------- refusals


def config_only_run(tmp_path, data_dir, **overrides):
    """A run dir holding only config.yaml: export reads the config before anything else."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tiny-lm", tiny_overrides(data_dir, tmp_path, model__vocab_size=400, **overrides))
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


@pytest.mark.parametrize("overrides,named", [
    (dict(model__attention="mla"), "model.attention=mla"),
    (dict(model__moe__n_routed_experts=4), "model.moe.n_routed_experts=4"),
    (dict(model__ffn="gelu"), "model.ffn=gelu"),
    (dict(model__ffn="gelu_affine"), "model.ffn=gelu_affine"),
    (dict(model__qk_norm="true", model__bias="true"), "model.qk_norm=true with model.bias=true"),
    (dict(model__attn_softcap=30.0), "model.attn_softcap=30.0"),
    (dict(model__logit_softcap=15.0), "model.logit_softcap=15.0"),
    (dict(model__logits_scale=0.5), "model.logits_scale=0.5"),
])
def test_unmapped_features_are_refused(overrides, named, tmp_path, data_dir):
    run = config_only_run(tmp_path, data_dir, **overrides)
    with pytest.raises(UserError) as info:
        export_run(run, tmp_path / "hf")
    message = str(info.value)
    assert "\n" not in message and named in message and "cannot export" in message
    assert not (tmp_path / "hf").exists()


def test_other_families_are_refused():
    from scratchlab.config import ModelConfig

    assert unmapped_features(ModelConfig(family="codec_lm"))[0].startswith("model.family=codec_lm")
    assert unmapped_features(ModelConfig()) == []
    assert unmapped_features(ModelConfig(qk_norm=True)) == []  # a Qwen3
    assert len(unmapped_features(ModelConfig(qk_norm=True, bias=True, logits_scale=2.0))) == 2  # all are named


def test_cli_refuses_a_real_run_in_one_line(data_dir, tmp_path, capsys):
    run = run_tiny(data_dir, tmp_path / "runs", model__qk_norm="true", model__bias="true", train__max_steps=2).run_dir
    code = main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: cannot export")
    assert "model.qk_norm=true with model.bias=true (Qwen3, Llama with QK-norm, has no MLP biases)" in err
    assert not (tmp_path / "hf").exists()


def test_a_wrong_mapping_is_caught_by_the_logit_check(data_dir, tmp_path, monkeypatch):
    run = run_tiny(data_dir, tmp_path / "runs", train__max_steps=4).run_dir
    right = export_module.llama_state_dict

    def swapped_gate_and_up(model, cfg):  # the classic SwiGLU mistake
        weights = right(model, cfg)
        gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        weights[gate], weights[up] = weights[up], weights[gate]
        return weights

    monkeypatch.setattr(export_module, "llama_state_dict", swapped_gate_and_up)
    with pytest.raises(UserError, match="logits differ from scratchlab's"):
        export_hf(load_run(run), tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".tmp-*"))


def test_out_dir_and_extra_checks(data_dir, tmp_path, monkeypatch, capsys):
    run = config_only_run(tmp_path, data_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        export_run(run, tmp_path / "taken")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the hf extra were not installed
    code = main(["export", str(run), "--out", str(tmp_path / "hf")])
    assert code == 2
    assert capsys.readouterr().err == "error: scratchlab export --format hf needs the hf extra: pip install -e '.[hf]'\n"
