"""Text data preparation and the one windowing function."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlab.data.text import open_text_data, prepare_text, read_documents, split_by_document
from scratchlab.data.windows import get_batch, window_starts
from scratchlab.errors import UserError


def test_labels_are_inputs_shifted_by_one(data_dir):
    data = open_text_data(data_dir)
    batch = get_batch(data.train, 32, 8, "random", generator=torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 32)
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    # ... and the labels are the stream's next tokens, not a copy of the inputs.
    assert not torch.equal(batch["labels"], batch["input_ids"])


@settings(max_examples=50, deadline=None)
@given(n=st.integers(10, 400), seq_len=st.integers(1, 9), batch=st.integers(1, 6), seed=st.integers(0, 1000))
def test_windows_stay_in_bounds_and_follow_the_stream(n, seq_len, batch, seed):
    tokens = np.arange(n, dtype=np.uint16)  # token value == position: windows must be contiguous runs
    for mode in ("random", "fixed"):
        b = get_batch(tokens, seq_len, batch, mode, generator=torch.Generator().manual_seed(seed), count=7)
        assert b["input_ids"].max() < n - 1 and b["labels"].max() <= n - 1
        assert torch.equal(b["labels"] - b["input_ids"], torch.ones_like(b["input_ids"]))


def test_no_document_in_both_splits(corpus, data_dir):
    train, val = split_by_document(corpus, 0.1)
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(corpus)
    # Deterministic: the same split on every call, whatever the document order.
    assert split_by_document(list(reversed(corpus)), 0.1)[1] == list(reversed(val))
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(corpus)
    assert meta["splits"]["val"]["documents"] == len(val)


def test_data_dir_contents(corpus, data_dir):
    data = open_text_data(data_dir)
    tokenizer = data.tokenizer()
    assert data.vocab_size == tokenizer.get_vocab_size() <= 400
    assert data.train.dtype == np.uint16
    # One EOS after each document.
    n_val_docs = data.meta["splits"]["val"]["documents"]
    assert int((np.asarray(data.val) == data.eos_id).sum()) == n_val_docs
    # token_bytes: decoding the validation stream gives exactly the split's UTF-8 byte count.
    assert int(data.token_bytes[np.asarray(data.val)].sum()) == data.meta["splits"]["val"]["bytes"]
    assert data.token_bytes[data.eos_id] == 0
    # The stream decodes back to the documents.
    first_doc_ids = np.asarray(data.val)[: int(np.argmax(np.asarray(data.val) == data.eos_id))]
    _, val_docs = split_by_document(corpus, 0.1)
    assert tokenizer.decode(first_doc_ids.tolist()) == val_docs[0]


def test_random_mode_covers_the_corpus_and_fixed_mode_repeats():
    n, seq_len = 10_000, 16
    gen = torch.Generator().manual_seed(0)
    starts = np.concatenate([window_starts(n, seq_len, 32, "random", generator=gen) for _ in range(50)])
    assert len(np.unique(starts)) > 1000  # not a constant crop
    assert starts.min() < 0.05 * n and starts.max() > 0.95 * (n - seq_len - 1)  # reaches both ends
    first = window_starts(n, seq_len, 8, "fixed", batch_index=0, count=32)
    assert np.array_equal(first, window_starts(n, seq_len, 8, "fixed", batch_index=0, count=32))
    later = [window_starts(n, seq_len, 8, "fixed", batch_index=i, count=32) for i in range(4)]
    spread = np.concatenate(later)
    assert len(np.unique(spread)) == 32 and spread.min() == 0 and spread.max() == n - seq_len - 1


def test_random_mode_is_reproducible_from_generator_state():
    gen = torch.Generator().manual_seed(3)
    window_starts(1000, 8, 4, "random", generator=gen)
    state = gen.get_state()
    a = window_starts(1000, 8, 4, "random", generator=gen)
    gen.set_state(state)
    assert np.array_equal(a, window_starts(1000, 8, 4, "random", generator=gen))


def test_stream_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(UserError, match="seq_len"):
        window_starts(10, 16, 1, "fixed")


def test_read_documents_from_jsonl_text_file_and_folder(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "alpha"}\n\n{"text": "beta"}\n')
    assert read_documents(jsonl) == ["alpha", "beta"]
    txt = tmp_path / "d.txt"
    txt.write_text("one\npara\n\ntwo\n\n\nthree")
    assert read_documents(txt) == ["one\npara", "two", "\nthree"]
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.py").write_text("x = 1\n")
    (folder / "sub" / "b.md").write_text("# b\n")
    (folder / "blob.bin").write_bytes(bytes(range(256)))
    assert read_documents(folder) == ["x = 1\n", "# b\n"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        read_documents(bad)


def test_given_tokenizer_is_reused(tmp_path, corpus, data_dir):
    out = prepare_text(corpus[:20], tmp_path / "again", tokenizer_path=data_dir / "tokenizer.json")
    assert (out / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == open_text_data(data_dir).vocab_size


def test_truncated_shard_is_detected(tmp_path, corpus):
    out = prepare_text(corpus[:10], tmp_path / "d", vocab_size=300)
    shard = out / "train.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        open_text_data(out)


def test_window_dataset_modes():
    from scratchlab.data.windows import WindowDataset

    tokens = np.arange(1000, dtype=np.uint16)
    fixed = WindowDataset(tokens, 10, "fixed")
    assert len(fixed) == 99
    item = fixed[3]
    assert item["window_start"] == 30 and item["input_ids"].tolist() == list(range(30, 40))
    assert item["labels"].tolist() == list(range(31, 41)) and item["clip_len"] == 1000
    assert fixed[3]["window_start"] == 30  # the same every time
    rand = WindowDataset(tokens, 10, "random", seed=1)
    starts = {rand[0]["window_start"] for _ in range(20)}
    assert len(starts) > 10  # a fresh crop per access
    with pytest.raises(IndexError):
        fixed[99]
