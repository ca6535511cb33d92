"""The leak verdict for MoE (issue 15): shape-dependent round-off is not a leak; real leaks still are.

On an H200 the MoE model was refused by causal_leak and batch_leak. Its dispatch cannot leak
(token t's routing reads only its own hidden state, and every row's expert output reads only that
row), but the expert matmuls change shape when one token's routing changes, and GPU kernels pick
their reduction order (split-K, tiles) by shape, in TF32/bf16 for fp32 inputs. `shape_dependent_mm`
reproduces that on a CPU: each group's product is summed in a number of K-chunks chosen by the
group's size, the partial sums rounded to bf16 for fp32 inputs (a TF32/bf16 kernel), kept in
float64 for float64 inputs (DGEMM): the same rows give different numbers when the group sizes change.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from scratchlab.config import ModelConfig, MoEConfig
from scratchlab.families.registry import build_model
from scratchlab.layers import moe as moe_module

preflight = importlib.import_module("scratchlab.doctor.preflight")  # the module, not the function
from scratchlab.doctor import leaks  # noqa: E402


def shape_dependent_mm(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], weight.shape[1])
    partial_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
    start = 0
    for e, end in enumerate(ends.tolist()):
        chunks = 1 + ((end - start) // 16) % 3  # the "kernel" depends on the group's row count
        acc = x.new_zeros(end - start, weight.shape[1])
        for xs, ws in zip(x[start:end].chunk(chunks, dim=1), weight[e].chunk(chunks, dim=1)):
            acc = acc + (xs @ ws.t()).to(partial_dtype).to(x.dtype)
        out[start:end] = acc
        start = end
    return out


def leaky_mm(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """A real bug on top of the same numerics: every row also sees the mean of all rows (other times, other samples)."""
    return shape_dependent_mm(x + x[: int(ends[-1])].mean(0), weight, ends)


def moe_lm(**moe) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=64,
                      moe=MoEConfig(**{"n_routed_experts": 4, "n_shared_experts": 1, "top_k": 2, **moe}))
    return build_model(cfg)


def batch(samples: int = 2, seq: int = 48) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 64, (samples, seq + 1), generator=torch.Generator().manual_seed(0))
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def test_shape_dependent_numerics_are_not_a_leak(monkeypatch):
    monkeypatch.setattr(moe_module, "grouped_mm", shape_dependent_mm)
    model, ids = moe_lm(), batch()["input_ids"]
    # The mechanism is reproduced: measured in fp32 alone, both probes see changes above the tolerance
    # (this is what refused the model on the H200) ...
    assert leaks.causal_changes(model, ids)
    assert leaks.batch_changes(model, ids)
    # ... and the checks, which re-measure in float64, find nothing.
    assert preflight.check_causal_leak(model, batch()) == []
    assert preflight.check_batch_leak(model, batch()) == []
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the float64 copy was a copy


def test_a_real_leak_with_the_same_numerics_is_still_an_error(monkeypatch):
    monkeypatch.setattr(moe_module, "grouped_mm", leaky_mm)
    model = moe_lm()
    (causal,) = preflight.check_causal_leak(model, batch())
    (mixed,) = preflight.check_batch_leak(model, batch())
    assert causal.code == "causal_leak" and causal.severity == "error" and causal.evidence["precision"] == "float64"
    assert causal.evidence["relative_diff"] > 100 * causal.evidence["tolerance"]
    assert mixed.code == "batch_leak" and mixed.severity == "error" and mixed.evidence["precision"] == "float64"


def test_the_real_moe_is_clean_in_every_mode_and_precision():
    model = moe_lm(score="sigmoid", balance="bias")
    assert preflight.check_causal_leak(model, batch()) == []
    assert preflight.check_batch_leak(model, batch()) == []
    found = preflight.preflight(model.to(torch.bfloat16), batch())  # a bf16 model: checked in fp32, float64 if needed
    assert [f for f in found if f.severity != "info"] == []


def test_capacity_dropping_is_a_declared_batch_dependency_a_warning_never_a_causal_leak():
    # Capacity keeps the first assignments in batch order: sample 1's drops depend on sample 0's routing.
    # That is a real cross-sequence dependency (eval figures depend on the batch), not a view of the
    # sequence's own future: a warning naming the setting, and no causal_leak.
    model = moe_lm(capacity_factor=0.5)
    assert preflight.check_causal_leak(model, batch()) == []
    (found,) = preflight.check_batch_leak(model, batch())
    assert found.code == "batch_leak" and found.severity == "warning"
    assert (found.evidence["changed_sample"], found.evidence["perturbed_sample"]) == (1, 0)  # later rows depend on earlier
    assert "capacity_factor=0.5" in found.message and found.evidence["declared_by"][0].endswith("ffn")
    with model.blocks[0].ffn.uncoupled(), model.blocks[1].ffn.uncoupled():
        assert leaks.batch_changes(model, batch()["input_ids"]) == []  # no drops: no dependency


def test_a_real_batch_leak_next_to_capacity_dropping_is_still_an_error(monkeypatch):
    monkeypatch.setattr(moe_module, "grouped_mm", leaky_mm)
    (found,) = preflight.check_batch_leak(moe_lm(capacity_factor=0.5), batch())
    assert found.severity == "error" and "never over the batch" in found.message


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_preflight_of_the_trainer_lets_a_healthy_moe_train(capacity_factor):
    found = preflight.preflight(moe_lm(capacity_factor=capacity_factor), batch(samples=4))
    assert [f.code for f in found if f.severity == "error"] == []
