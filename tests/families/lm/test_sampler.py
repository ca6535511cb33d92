"""Sampling: KV cache equivalence, filters, EOS, reproducibility, batched prompts of different lengths."""

from __future__ import annotations

import pytest
import torch

from scratchlab.config import MLAConfig, ModelConfig
from scratchlab.families.registry import build_model
from scratchlab.families.lm.sampler import generate, generate_batch
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


def context_model(**extra) -> torch.nn.Module:
    """A random model whose greedy continuation depends on the whole context: attention and FFN weights
    scaled up (at init a tiny model mostly repeats its last token, which would hide a padding leak)."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=60, max_seq_len=64, **extra))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and "emb" not in name and "head" not in name:
                p.mul_(4.0)
    return m.eval()


PROMPTS = [[3, 14, 15, 9, 26], [7], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


MLA = MLAConfig(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


@pytest.mark.parametrize("extra", [{"n_kv_heads": 2}, {"attention": "mla", "mla": MLA}, {"attn_softcap": 5.0}],
                         ids=["gqa", "mla", "softcap"])
def test_batched_greedy_equals_each_prompt_alone(extra):
    """Prompts of different lengths, left-padded in one batch: each greedy row is the prompt's own greedy output."""
    model = context_model(**extra)
    batched = generate_batch(model, PROMPTS, 30, temperature=0)
    alone = [generate(model, p, 30, temperature=0) for p in PROMPTS]
    assert [len(r) for r in batched] == [30] * 4
    assert batched == alone
    # The padding would matter if it were seen: the same prompt after 5 extra tokens continues differently.
    assert generate(model, [0] * 5 + PROMPTS[1], 30, temperature=0) != alone[1]
    assert generate_batch(model, PROMPTS, 30, temperature=0, use_cache=False) == alone


def test_batched_rows_keep_their_own_temperature_and_eos():
    model = context_model(n_kv_heads=2)
    alone = [generate(model, p, 20, temperature=0) for p in PROMPTS]
    mixed = generate_batch(model, PROMPTS, 20, temperature=[0.0, 2.0, 0.0, 2.0],
                           generator=torch.Generator().manual_seed(0))
    assert mixed[0] == alone[0] and mixed[2] == alone[2]  # temperature-0 rows are greedy among sampled rows
    assert mixed[1] != alone[1] or mixed[3] != alone[3]
    eos = alone[1][3]  # a token the second row emits after 3 others: that row stops there, rows without it go on
    stopped = generate_batch(model, PROMPTS, 20, temperature=0, eos_id=eos)
    for row, full in zip(stopped, alone):
        assert row == (full[: full.index(eos)] if eos in full else full)
    assert 0 < len(stopped[1]) == alone[1].index(eos) < 20
    assert any(len(row) == 20 for row in stopped)
    with pytest.raises(ValueError, match="3 temperatures for 4 rows"):
        generate_batch(model, PROMPTS, 5, temperature=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        generate_batch(model, [[1], []], 5)


def test_a_greedy_batch_draws_no_random_numbers(model):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    generate_batch(model, PROMPTS, 5, temperature=0.0)  # no generator: the global RNG would move if it sampled
    assert torch.equal(before, torch.get_rng_state())
