"""Sampling: KV cache equivalence, filters, EOS, reproducibility."""

from __future__ import annotations

import pytest
import torch

from scratchlab.config import ModelConfig
from scratchlab.families.registry import build_model
from scratchlab.families.lm.sampler import generate
from scratchlab.layers.sampling import filter_logits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=60, max_seq_len=64))
    # A few noisy steps so the logits are not near-uniform (greedy ties would make the test weak).
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(5):
        ids = torch.randint(0, 60, (4, 16))
        m(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return m.eval()


def test_cached_greedy_equals_uncached_greedy(model):
    prompt = [3, 14, 15, 9, 26]
    cached = generate(model, prompt, 40, temperature=0, use_cache=True)
    uncached = generate(model, prompt, 40, temperature=0, use_cache=False)
    assert len(cached) == 40
    assert cached == uncached


def test_cached_logits_match_full_forward(model):
    ids = torch.randint(0, 60, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1)
        first = model(ids[:, :5], cache=cache)
        rest = [model(ids[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_with_a_generator(model):
    def run(seed):
        return generate(model, [1, 2], 30, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(seed))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_generation_stops_at_eos(model):
    greedy = generate(model, [5, 6, 7], 20, temperature=0)
    eos = greedy[3]
    stopped = generate(model, [5, 6, 7], 20, temperature=0, eos_id=eos)
    assert stopped == greedy[: greedy.index(eos)]


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum() == 1  # the top token always stays


def test_sampled_tokens_respect_top_k(model):
    counts = torch.zeros(60)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        top2 = set(model(torch.tensor([[1, 2]]))[0, -1].topk(2).indices.tolist())
    for _ in range(30):
        counts[generate(model, [1, 2], 1, temperature=5.0, top_k=2, generator=gen)[0]] += 1
    assert set(torch.nonzero(counts).flatten().tolist()) <= top2


def test_generation_does_not_touch_the_global_rng(model):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    generate(model, [1], 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.get_rng_state())
