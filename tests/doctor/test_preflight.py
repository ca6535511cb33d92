"""Preflight model checks: for every code a small buggy model that triggers it (code, severity and the
key evidence asserted), and healthy controls (scratchlab's lm, a hand-written GPT with and without
dropout, a codebook model, a model returning an object with `.logits`) that must stay silent.

Batches are random tokens (V = 64) with correctly shifted labels, unless a test says otherwise. The
batch / label / dataset checks are in test_preflight_data.py.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scratchlab.config import ModelConfig
from scratchlab.doctor.findings import Finding
from scratchlab.doctor.preflight import (
    CAUSAL_LEAK,
    LABEL_SHIFT,
    Check,
    PreflightLoss,
    preflight,
    token_cross_entropy,
)
from scratchlab.families.registry import build_model

V, T, B = 64, 32, 4


# ---------------------------------------------------------------- helpers


def text_batch(batch: int = B, seq: int = T, vocab: int = V, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def codebook_batch(batch: int = B, seq: int = T, k: int = 4, vocab: int = 32, first_vocab: int | None = None):
    tokens = torch.randint(0, vocab, (batch, seq + 1, k), generator=torch.Generator().manual_seed(0))
    if first_vocab:
        tokens[..., 0] %= first_vocab
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def run(model: nn.Module, batch: dict, **kwargs) -> dict[str, Finding]:
    """preflight, with the invariants every finding must meet; findings by code."""
    findings = preflight(model, batch, **kwargs)
    for f in findings:
        json.dumps(f.to_json(), allow_nan=False)  # evidence is plain JSON: numbers, names, positions
        assert "\n" not in f.message and f.message
    codes = [f.code for f in findings if f.code != "check_failed"]
    assert len(codes) == len(set(codes)), codes  # one finding per code
    return {f.code: f for f in findings}


def problems(found: dict[str, Finding]) -> list[str]:
    return [str(f) for f in found.values() if f.severity != "info" or f.code == "check_failed"]


def lm(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=64, **overrides))


# ---------------------------------------------------------------- test models


class Attention(nn.Module):
    """Hand-written multi-head attention whose bugs are switches: no mask, softmax over another axis."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0, causal: bool = True, softmax_dim: int = -1,
                 mask_value: float = float("-inf")):
        super().__init__()
        self.heads, self.dropout, self.causal = heads, dropout, causal
        self.softmax_dim, self.mask_value = softmax_dim, mask_value
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bx, Tx, D = x.shape
        q, k, v = self.qkv(x).view(Bx, Tx, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, T, E]
        att = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        if self.causal:
            att = att.masked_fill(torch.ones(Tx, Tx, dtype=torch.bool).triu(1), self.mask_value)
        att = F.dropout(att.softmax(self.softmax_dim), self.dropout, self.training)
        return self.proj((att @ v).transpose(1, 2).reshape(Bx, Tx, D))


class TinyGPT(nn.Module):
    """A GPT-2-style model (learned positions, LayerNorm, GELU MLP, optional dropout)."""

    def __init__(self, vocab: int = V, d: int = 32, heads: int = 4, layers: int = 1, dropout: float = 0.0, **attn):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(64, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.attn = nn.ModuleList(Attention(d, heads, dropout, **attn) for _ in range(layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
            for _ in range(layers)
        )
        self.drop, self.norm, self.head = nn.Dropout(dropout), nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1]))

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(ids))
        for norm, attn, mlp in zip(self.norms, self.attn, self.mlp):
            x = x + attn(norm(x))
            x = x + mlp(x)
        return self.norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids))


class CodebookLM(nn.Module):
    """K codebooks per frame: sum of K embeddings -> causal SDPA block -> K heads; [B,T,K] -> [B,T,K,V]."""

    def __init__(self, vocab: int = 32, codebooks: int = 4, d: int = 32, heads: int = 4, lookahead: bool = False,
                 first_vocab: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.heads_n, self.lookahead = heads, lookahead
        sizes = [first_vocab or vocab] + [vocab] * (codebooks - 1)  # e.g. a small semantic codebook first
        self.emb = nn.ModuleList(nn.Embedding(n, d) for n in sizes)
        self.pos = nn.Embedding(64, d)
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = nn.ModuleList(nn.Linear(d, vocab) for _ in range(codebooks))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = sum(emb(codes[..., k]) for k, emb in enumerate(self.emb)) + self.pos(torch.arange(codes.shape[1]))
        if self.lookahead:  # bug: the next frame is added in (an undone delay pattern shifted the wrong way)
            x = x + x.roll(-1, dims=1)
        Bx, Tx, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(Bx, Tx, 3, self.heads_n, D // self.heads_n).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bx, Tx, D))
        x = x + self.mlp(self.norm2(x))
        return torch.stack([head(x) for head in self.heads], dim=2)


@dataclass
class Output:
    logits: torch.Tensor
    aux: float = 0.0


class WithOutput(nn.Module):
    """A HuggingFace-style model: forward returns an object with `.logits`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> Output:
        return Output(self.inner(ids))


class MeanOverTime(TinyGPT):
    """Bug: a 'global context' feature, the mean over the whole sequence, added at every position."""

    def embed(self, ids):
        x = super().embed(ids)
        return x + x.mean(dim=1, keepdim=True)


class LastTokenSummary(TinyGPT):
    """Bug: the last token's embedding (a 'summary' token) added everywhere: only the last input leaks."""

    def embed(self, ids):
        x = super().embed(ids)
        return x + x[:, -1:]


class BatchNormGPT(TinyGPT):
    """Bug: BatchNorm1d over the features normalises with statistics over the batch (and time)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.bn = nn.BatchNorm1d(self.tok.embedding_dim)

    def embed(self, ids):
        return self.bn(super().embed(ids).transpose(1, 2)).transpose(1, 2)


class LogOfZero(TinyGPT):
    """Bug: log-probabilities taken as log(relu(h)): log(0) = -inf on targets."""

    def forward(self, ids):
        return torch.log(F.relu(super().forward(ids)))


class MaskedLogits(TinyGPT):
    """Healthy: the logit of id 0 (never a target) is masked to -inf, as samplers of constrained vocabularies do."""

    def forward(self, ids):
        logits = super().forward(ids)
        return logits.masked_fill(torch.arange(logits.shape[-1]) == 0, float("-inf"))


class BigLogits(TinyGPT):
    def forward(self, ids):
        return super().forward(ids) * 50


class Unused(TinyGPT):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.unused = nn.Linear(32, 32)  # bug: built, never called


class ZeroHead(TinyGPT):
    """Healthy: a zero-initialised output layer blocks every other gradient at step 0 only."""

    def __init__(self, **kw):
        super().__init__(**kw)
        nn.init.zeros_(self.head.weight)


class LogScale(TinyGPT):
    """Bug (field notes): a learnable log-scale through exp() over a wide activation (the logits)."""

    def __init__(self):
        super().__init__(d=64)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return super().forward(ids) * torch.exp(self.log_scale)


class BiasOnly(nn.Module):
    """Bug: ignores its input; the best it can do is the unigram distribution of the targets."""

    def __init__(self, vocab: int = V):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids):
        return self.bias.expand(*ids.shape, self.bias.shape[0])


class Detached(TinyGPT):
    def forward(self, ids):
        return super().forward(ids).detach()  # bug: nothing upstream gets a gradient


class Raises(TinyGPT):
    def forward(self, ids):
        raise RuntimeError("forward needs an attention_mask")


class WrongShape(TinyGPT):
    def forward(self, ids):
        return super().forward(ids)[:, -1]  # [B, V]: only the last position


# ---------------------------------------------------------------- healthy controls


HEALTHY = {
    "scratchlab_lm": (lm, text_batch),
    "scratchlab_lm_untied_gelu_bias": (lambda: lm(tie_embeddings=False, ffn="gelu", bias=True), text_batch),
    "tiny_gpt": (lambda: TinyGPT(layers=2), text_batch),
    "tiny_gpt_dropout": (lambda: TinyGPT(layers=2, dropout=0.1), text_batch),
    "codebooks": (CodebookLM, codebook_batch),
    # Perturbations must draw each codebook's ids from that codebook (an id >= 8 would crash codebook 0).
    "codebooks_of_different_sizes": (lambda: CodebookLM(first_vocab=8), lambda: codebook_batch(first_vocab=8)),
    "dot_logits": (lambda: WithOutput(TinyGPT(dropout=0.1)), text_batch),
    "zero_init_head": (ZeroHead, text_batch),
}


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_models_are_silent(name):
    make_model, make_batch = HEALTHY[name]
    found = run(make_model(), make_batch(), overfit_steps=100, special_token_ids=(V + 5,))
    assert problems(found) == []


def test_healthy_with_one_sample_constant_tokens_and_masked_logits():
    # B = 1: the batch-leak check pairs the sample with a copy of itself; -inf logits are not NaN.
    assert problems(run(lm(), text_batch(batch=1))) == []
    silence = {"input_ids": torch.full((B, T), 7), "labels": torch.full((B, T), 7)}  # one id: every shift fits
    assert problems(run(lm(), silence)) == []
    assert "causal_leak" in run(TinyGPT(causal=False), silence)  # perturbed with a neighbouring id
    batch = text_batch()
    batch["input_ids"] = batch["input_ids"].clamp(min=1)
    batch["labels"] = batch["labels"].clamp(min=1)
    assert problems(run(MaskedLogits(), batch)) == []


# ---------------------------------------------------------------- causal_leak


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: TinyGPT(causal=False), id="no_mask"),
        pytest.param(lambda: TinyGPT(softmax_dim=-2), id="softmax_over_queries"),
        pytest.param(lambda: TinyGPT(softmax_dim=1, mask_value=-1e9), id="softmax_over_heads"),
        pytest.param(lambda: MeanOverTime(dropout=0.1), id="mean_over_time_with_dropout"),
        pytest.param(lambda: WithOutput(TinyGPT(causal=False)), id="no_mask_dot_logits"),
    ],
)
def test_causal_leak_is_an_error_with_the_earliest_pair(model):
    found = run(model(), text_batch())
    leak = found["causal_leak"]
    assert leak.severity == "error"
    assert (leak.evidence["output_pos"], leak.evidence["input_pos"]) == (0, 1)
    assert leak.evidence["modes"] == ["train", "eval"]  # no BatchNorm: both modes leak
    assert leak.evidence["probed_input_positions"] == [1, T // 2, T - 1]
    assert leak.evidence["relative_diff"] > leak.evidence["tolerance"]
    assert "batch_leak" not in found


def test_causal_leak_names_the_leaking_input_position():
    leak = run(LastTokenSummary(), text_batch())["causal_leak"]
    assert (leak.evidence["output_pos"], leak.evidence["input_pos"]) == (0, T - 1)


def test_causal_leak_in_a_codebook_model():
    found = run(CodebookLM(lookahead=True), codebook_batch())
    leak = found["causal_leak"]
    assert leak.severity == "error" and (leak.evidence["output_pos"], leak.evidence["input_pos"]) == (0, 1)
    assert "causal_leak" not in run(CodebookLM(), codebook_batch())


# ---------------------------------------------------------------- batch_leak


def test_batchnorm_is_a_batch_leak_in_train_mode():
    for batch in (text_batch(), text_batch(batch=1)):
        found = run(BatchNormGPT(), batch)
        leak = found["batch_leak"]
        assert leak.severity == "error"
        assert leak.evidence["modes"] == ["train"]  # eval uses the running statistics
        assert leak.evidence["changed_sample"] == 0 and leak.evidence["first_position"] == 0
        # Statistics over (batch, time) also carry the future into the past, in train mode only.
        assert found["causal_leak"].evidence["modes"] == ["train"]


# ---------------------------------------------------------------- nonfinite, init loss, dead, outliers


def test_nan_weight_is_named():
    model = TinyGPT()
    with torch.no_grad():
        model.mlp[0][1].weight[3, 5] = float("nan")
    f = run(model, text_batch())["nonfinite"]
    assert f.severity == "error"
    assert f.evidence["kind"] == "weight" and f.evidence["tensor"] == "mlp.0.1.weight"
    assert f.evidence["nonfinite_weights"] == ["mlp.0.1.weight"]
    assert f.evidence["logits_nan"] == B * T * V


def test_log_of_zero_is_nonfinite():
    found = run(LogOfZero(), text_batch())
    f = found["nonfinite"]
    assert f.severity == "error" and f.evidence["kind"] == "loss" and f.evidence["loss"] == "inf"
    assert f.evidence["logits_neginf"] > 0 and f.evidence["logits_nan"] == 0
    assert not {"init_loss_high", "dead_params", "grad_outlier"} & set(found)  # meaningless with NaN/Inf


def test_big_init_logits():
    f = run(BigLogits(), text_batch())["init_loss_high"]
    assert f.severity == "warning"
    assert f.evidence["ln_vocab"] == pytest.approx(math.log(V), abs=1e-3)
    assert f.evidence["threshold"] == pytest.approx(math.log(V) + 0.5 * math.log(V), abs=1e-3)
    assert f.evidence["loss"] > 20 and f.evidence["logit_std"] > 20
    assert "init_loss_high" not in run(TinyGPT(), text_batch())


def test_unused_module_is_dead():
    f = run(Unused(), text_batch())["dead_params"]
    assert f.severity == "warning"
    assert f.evidence["names"] == ["unused.weight", "unused.bias"] and f.evidence["count"] == 2
    assert f.evidence["numel"] == 32 * 32 + 32 and f.evidence["no_grad"] == ["unused.weight", "unused.bias"]


def test_detached_forward_is_dead_and_cannot_overfit():
    model = Detached()
    found = run(model, text_batch(), overfit_steps=20)
    dead = found["dead_params"]
    assert dead.evidence["loss_has_grad"] is False
    assert dead.evidence["count"] == len(list(model.parameters()))
    f = found["cannot_overfit"]
    assert f.severity == "error" and f.evidence["reason"] == "no gradient reaches the weights"
    assert f.evidence["start_loss"] == f.evidence["end_loss"]


def test_scalar_log_scale_is_a_grad_outlier():
    found = run(LogScale(), text_batch())
    f = found["grad_outlier"]
    assert f.severity == "warning"
    assert f.evidence["count"] == 1 and f.evidence["top"][0]["name"] == "log_scale"
    assert f.evidence["top"][0]["rms_ratio"] >= 100 and f.evidence["threshold"] == 100
    assert problems(found) == [str(f)]


# ---------------------------------------------------------------- cannot_overfit


def test_input_ignoring_model_cannot_overfit():
    f = run(BiasOnly(), text_batch(), overfit_steps=50)["cannot_overfit"]
    assert f.severity == "error"
    assert f.evidence["start_loss"] == pytest.approx(math.log(V), abs=1e-3)
    assert f.evidence["steps"] == 50 and f.evidence["samples"] == B
    # It can only reach the unigram entropy of 128 random targets, well above half of ln V.
    assert 0.5 * f.evidence["start_loss"] < f.evidence["end_loss"] < f.evidence["start_loss"]


def test_overfit_runs_only_when_asked():
    assert "cannot_overfit" not in run(BiasOnly(), text_batch())


# ---------------------------------------------------------------- robustness and side effects


def test_a_forward_that_raises_gives_check_failed_findings():
    found = preflight(Raises(), text_batch(), overfit_steps=5)
    assert found and all(f.code == "check_failed" and f.severity == "info" for f in found)
    checks = {f.evidence["check"] for f in found}
    assert checks == {"causal_leak", "batch_leak", "gradients", "cannot_overfit"}
    assert all(f.evidence["exception"] == "RuntimeError" for f in found)
    assert all("attention_mask" in f.evidence["error"] and "attention_mask" in f.message for f in found)


def test_wrong_output_shape_gives_check_failed():
    found = preflight(WrongShape(), text_batch())
    assert {f.evidence["check"] for f in found} == {"causal_leak", "batch_leak", "gradients"}
    assert all(f.evidence["exception"] == "ValueError" and "[B, T, V]" in f.message for f in found)


def test_labels_out_of_range_give_check_failed_not_a_crash():
    batch = text_batch()
    batch["labels"] = batch["labels"] + V  # ids the model cannot output (a device assert on CUDA)
    found = preflight(TinyGPT(), batch, overfit_steps=3)
    assert {f.evidence["check"] for f in found} == {"gradients", "cannot_overfit"}
    assert all(f.code == "check_failed" and f"V={V}" in f.message for f in found)


def test_callers_model_and_rng_are_untouched():
    model = BatchNormGPT(dropout=0.1)
    batch = text_batch()
    model(batch["input_ids"]).sum().backward()  # the caller has gradients and running stats
    model.eval()
    model.mlp.train()  # and a mixed train/eval state
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    modes = {n: m.training for n, m in model.named_modules()}
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    findings = preflight(model, batch, overfit_steps=5)

    assert {f.code for f in findings} >= {"batch_leak", "causal_leak"}  # it did run on this model
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # weights and BatchNorm running stats
    assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1] and np.array_equal(np.random.get_state()[1], rng[2])


def test_bf16_model_is_checked_in_fp32_and_left_in_bf16():
    model = lm().to(torch.bfloat16)
    assert problems(run(model, text_batch())) == []
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_default_size_model_is_silent():
    # The default preset's model (4 x 256, V = 4096) on a full 16 x 256 batch. How long preflight takes is a
    # benchmark figure (benchmarks/doctor_overhead.py), never a test: the CI machine is shared and noisy.
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=4096, max_seq_len=256))
    batch = text_batch(batch=16, seq=256, vocab=4096)
    assert problems(run(model, batch)) == []


# ---------------------------------------------------------------- the caller's loss, checks as units


class Conditioned(TinyGPT):
    """A model with a condition: ``model(ids)`` alone (what the leak checks call) or ``model(ids, cond)``."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = nn.Embedding(3, 32)

    def forward(self, ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.features(ids)
        return self.head(x if cond is None else x + self.cond(cond)[:, None])


def conditioned_loss(model: nn.Module, batch: dict) -> PreflightLoss:
    logits = model(batch["input_ids"], batch["cond"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    return PreflightLoss(loss=loss, objective=loss, outputs=logits)


def test_the_gradient_checks_train_the_callers_loss():
    batch = {**text_batch(), "cond": torch.tensor([0, 1, 2, 1])}  # every tensor of the batch reaches the loss
    # The default loss (model(input_ids) over labels) never reaches the condition's embedding: dead.
    dead = run(Conditioned(), batch)["dead_params"]
    assert dead.evidence["names"] == ["cond.weight"]
    # The family's loss does: silent, and the overfit check trains it too.
    assert problems(run(Conditioned(), batch, loss=conditioned_loss, overfit_steps=100)) == []


def test_the_objective_is_back_propagated_and_the_loss_is_judged():
    def detached_objective(model, batch):
        out = token_cross_entropy(model, batch)
        return PreflightLoss(loss=out.loss, objective=out.loss.detach(), outputs=out.outputs)

    found = run(TinyGPT(), text_batch(), loss=detached_objective, overfit_steps=5)
    assert found["dead_params"].evidence["loss_has_grad"] is False
    assert found["cannot_overfit"].evidence["reason"] == "no gradient reaches the weights"

    def big_auxiliary_term(model, batch):  # like z-loss: in the objective, not in the figure
        out = token_cross_entropy(model, batch)
        return PreflightLoss(loss=out.loss, objective=out.loss + 100.0, outputs=out.outputs)

    assert problems(run(TinyGPT(), text_batch(), loss=big_auxiliary_term)) == []  # init loss judges .loss


def test_checks_are_units_run_in_the_given_order():
    def boom(subject):
        raise RuntimeError("no such thing")

    batch = text_batch()
    shifted_labels = {"input_ids": batch["input_ids"], "labels": batch["input_ids"].clone()}
    found = preflight(Raises(), shifted_labels, checks=(LABEL_SHIFT, Check("mine", boom)))
    # The model is never run or copied (no unit needs it); a unit that raises is check_failed with its name.
    assert [f.code for f in found] == ["labels_not_shifted", "check_failed"]
    assert found[1].evidence["check"] == "mine" and "no such thing" in found[1].message
    only = preflight(TinyGPT(causal=False), text_batch(), checks=(CAUSAL_LEAK,))
    assert [f.code for f in only] == ["causal_leak"]
