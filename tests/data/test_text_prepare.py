"""Streaming text preparation: every source format, the split, skipped records, resume, bounded batches."""

from __future__ import annotations

import builtins
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from scratchlab.cli import main
from scratchlab.data import prepare as prep
from scratchlab.data.manifest import split_of
from scratchlab.data.sources import DocumentSource
from scratchlab.data.text import open_text_data, prepare_text, read_documents
from scratchlab.errors import UserError

FILES = ("tokenizer.json", "train.bin", "val.bin", "token_bytes.npy", "meta.json")


@pytest.fixture(scope="module")
def docs(corpus) -> list[str]:
    return corpus[:40]


def write_sources(root: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents in every format the preparation reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs).encode()
    out = {"jsonl": root / "d.jsonl", "jsonl.gz": root / "d.jsonl.gz", "jsonl.zst": root / "d.jsonl.zst",
           "parquet": root / "d.parquet", "parquet folder": root / "pq", "hf": root / "hf", "folder": root / "txt"}
    out["jsonl"].write_bytes(lines)
    out["jsonl.gz"].write_bytes(gzip.compress(lines))
    out["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pa.table({"id": list(range(len(docs))), "body": docs})
    pq.write_table(table, out["parquet"], row_group_size=7)
    out["parquet folder"].mkdir()
    half = len(docs) // 2
    pq.write_table(table.slice(0, half), out["parquet folder"] / "part-000.parquet")
    pq.write_table(table.slice(half), out["parquet folder"] / "part-001.parquet")
    Dataset.from_dict({"body": docs}).save_to_disk(str(out["hf"]))
    out["folder"].mkdir()
    for i, d in enumerate(docs):
        (out["folder"] / f"doc_{i:03d}.txt").write_text(d, newline="")
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory, docs) -> dict[str, Path]:
    return write_sources(tmp_path_factory.mktemp("sources"), docs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, docs) -> Path:
    return prepare_text(docs, tmp_path_factory.mktemp("ref"), vocab_size=300, val_fraction=0.2)


def same_files(a: Path, b: Path, names=("tokenizer.json", "train.bin", "val.bin", "token_bytes.npy")) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "parquet folder", "hf", "folder"])
def test_every_source_format_gives_the_same_documents_and_shards(kind, sources, docs, reference, tmp_path):
    field = "text" if kind == "folder" else "body"
    assert read_documents(sources[kind], text_field=field) == docs
    out = prepare_text(sources[kind], tmp_path / "d", vocab_size=300, val_fraction=0.2, text_field=field)
    assert same_files(out, reference)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"] == json.loads((reference / "meta.json").read_text())["splits"]
    assert meta["content_sha256"] == json.loads((reference / "meta.json").read_text())["content_sha256"]


def test_a_missing_text_column_names_the_columns(sources, tmp_path):
    with pytest.raises(UserError, match=r"no column 'text' \(columns: id, body\).*--text-field"):
        prepare_text(sources["parquet"], tmp_path / "d", vocab_size=300)
    with pytest.raises(UserError, match="no column 'text'.*--text-field"):
        prepare_text(sources["hf"], tmp_path / "d", vocab_size=300)


def test_a_missing_optional_package_names_the_extra(sources, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow") or name == "zstandard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    for kind in ("parquet", "jsonl.zst"):
        with pytest.raises(UserError, match=r"pip install 'scratchlab\[data\]'"):
            list(DocumentSource(sources[kind], "body"))


def test_split_is_by_content(docs, reference):
    data = open_text_data(reference)
    tok = data.tokenizer()
    val = np.asarray(data.val)
    cuts = np.flatnonzero(val == data.eos_id)
    val_docs = [tok.decode(val[a + 1 if i else 0 : b].tolist()) for i, (a, b) in enumerate(zip([0, *cuts], cuts))]
    expected = [d for d in docs if split_of(d.encode(), 0.2, "blake2b") == "val"]
    assert val_docs == expected and 0 < len(expected) < len(docs)
    assert data.meta["splits"]["train"]["documents"] == len(docs) - len(expected)


def test_duplicates_land_on_the_same_side(docs, tmp_path):
    twice = docs[:10] + docs[:10]
    out = prepare_text(twice, tmp_path / "d", vocab_size=300, val_fraction=0.3)
    meta = json.loads((out / "meta.json").read_text())
    n_val = sum(split_of(d.encode(), 0.3, "blake2b") == "val" for d in docs[:10])
    assert meta["splits"]["val"]["documents"] == 2 * n_val and n_val > 0  # both copies, never one per side


def test_undecodable_and_empty_records_are_skipped_and_counted(docs, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, d in enumerate(docs[:6]):
        (folder / f"{i}.txt").write_text(d)
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    (folder / "blank.txt").write_text("   \n")
    (folder / "d.jsonl").write_bytes(b'{"text": "ok doc"}\n{"text": "\xff\xfe"}\n{not json}\n{"body": "x"}\n')
    out = prepare_text(folder, tmp_path / "d", vocab_size=300)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == {"empty": 1, "invalid JSON": 1, "no 'text' field": 1, "undecodable": 2}
    assert sum(s["documents"] for s in meta["splits"].values()) == 7


def test_nothing_left_is_one_line_not_a_traceback(tmp_path, capsys):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n{"text": "cr\xe8me"}\n')
    assert main(["data", "text", str(latin), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "has no text documents; skipped 2 undecodable (first: " in err and "latin1.jsonl:1" in err
    assert "binary or not UTF-8" in err and not (tmp_path / "d").exists()  # nothing written
    folder = tmp_path / "latin"
    folder.mkdir()
    (folder / "a.txt").write_bytes("na\xefve".encode("latin-1"))
    with pytest.raises(UserError, match="undecodable"):
        read_documents(folder)


def test_crlf_text_reads_as_text_mode_did(tmp_path):
    f = tmp_path / "crlf.txt"
    f.write_bytes(b"one\r\nline\r\n\r\ntwo\rthree")
    assert read_documents(f) == ["one\nline", "two\nthree"]
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"x\r\ny\r\n")
    assert read_documents(folder) == ["x\ny\n"]


def test_blocks_split_the_same_at_any_read_size(tmp_path, monkeypatch):
    text = "a\n\n\nb\r\n\r\nc\n\n\n\nd" * 50
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode())
    whole = read_documents(f)
    for size in (1, 2, 3, 7):
        monkeypatch.setattr("scratchlab.data.sources.READ_BLOCK", size)
        assert read_documents(f) == whole


def test_tokenizer_sample_is_bounded_and_recorded(docs, tmp_path):
    out = prepare_text(docs, tmp_path / "d", vocab_size=300, tokenizer_sample_mb=0.01)
    sample = json.loads((out / "meta.json").read_text())["tokenizer"]
    assert sample["max_mb"] == 0.01 and not sample["whole_corpus"]
    assert 1 <= sample["documents"] < len(docs) and sample["bytes"] <= 10_000


def written_files(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in FILES}


def test_resume_after_a_kill_is_byte_identical(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_BYTES", 2_000)  # bounded batches: many commits on a small corpus
    kwargs = dict(vocab_size=300, val_fraction=0.2, text_field="body", commit_mb=0.004)
    straight = prepare_text(sources["jsonl.gz"], tmp_path / "straight", **kwargs)
    assert not (straight / prep.PROGRESS).exists()

    real, calls = prep.write_progress, []

    def dies_after(n):
        def write(out, options, state):
            calls.append(state.items)
            real(out, options, state)
            if len(calls) == n:
                # a kill -9 after this commit, with half a batch already appended to the shards
                with open(out / "train.bin", "ab") as f:
                    f.write(b"\x01\x02\x03")
                raise KeyboardInterrupt
        return write

    monkeypatch.setattr(prep, "write_progress", dies_after(4))
    with pytest.raises(KeyboardInterrupt):
        prepare_text(sources["jsonl.gz"], tmp_path / "resumed", **kwargs)
    assert not (tmp_path / "resumed" / "meta.json").exists() and calls[-1] > 0
    done_before = calls[-1]
    calls.clear()
    monkeypatch.setattr(prep, "write_progress", dies_after(10**9))
    resumed = prepare_text(sources["jsonl.gz"], tmp_path / "resumed", **kwargs)
    assert calls[0] > done_before  # continued from the commit, not from the start
    assert written_files(resumed) == written_files(straight)
    assert not (resumed / prep.PROGRESS).exists()


def test_changed_options_start_over(sources, tmp_path, monkeypatch):
    kwargs = dict(vocab_size=300, text_field="body", commit_mb=0.004)
    monkeypatch.setattr(prep, "BATCH_BYTES", 2_000)

    def boom(out, options, state):
        prep._write_atomic(out / prep.PROGRESS, lambda p: p.write_text(json.dumps({"options": options,
                                                                                   **state.to_json()})))
        if state.items:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_progress", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_text(sources["jsonl"], tmp_path / "d", val_fraction=0.2, **kwargs)
    monkeypatch.undo()
    other = prepare_text(sources["jsonl"], tmp_path / "d", val_fraction=0.3, vocab_size=300, text_field="body")
    fresh = prepare_text(sources["jsonl"], tmp_path / "fresh", val_fraction=0.3, vocab_size=300, text_field="body")
    assert written_files(other) == written_files(fresh)


def test_cli_prints_the_summary(sources, tmp_path, capsys):
    assert main(["data", "text", str(sources["parquet"]), "--out", str(tmp_path / "d"), "--text-field", "body",
                 "--vocab-size", "300", "--tokenizer-sample-mb", "1"]) == 0
    out = capsys.readouterr().out
    assert "documents 40, tokens " in out and "bytes/token" in out and "train " in out and "val " in out
    assert "tokenizer trained on " in out and "use it with: scratchlab train data.path=" in out


def test_reading_ahead_is_bounded(monkeypatch):
    """The reader thread never runs more than QUEUE_BATCHES ahead of the tokenizer: memory is a few batches."""
    import threading
    import time

    produced = []

    def endless():
        for i in range(10_000):
            produced.append(i)
            yield i

    stop = threading.Event()
    reader = prep._read_ahead(endless(), stop)
    assert next(reader) == 0
    time.sleep(0.3)
    assert len(produced) <= 1 + prep.QUEUE_BATCHES + 1
    reader.close()
    assert stop.is_set()


def test_tiny_batches_and_commits_write_the_same_shards(sources, tmp_path, monkeypatch):
    kwargs = dict(vocab_size=300, val_fraction=0.2, text_field="body")
    whole = prepare_text(sources["jsonl"], tmp_path / "whole", **kwargs)
    commits = []
    real = prep.write_progress
    monkeypatch.setattr(prep, "write_progress", lambda *a: (commits.append(1), real(*a)))
    monkeypatch.setattr(prep, "BATCH_BYTES", 500)
    small = prepare_text(sources["jsonl"], tmp_path / "small", commit_mb=0.001, **kwargs)
    assert len(commits) > 30  # one commit (a resume point) per few documents
    assert written_files(small) == written_files(whole)


def test_prepare_stdlib_announces_through_the_trainers_reporter(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from scratchlab.data.text import prepare_stdlib
    from scratchlab.train.progress import Reporter

    monkeypatch.setenv("SCRATCHLAB_CACHE", str(tmp_path))
    screen = io.StringIO()
    out = prepare_stdlib(300, max_mb=0.2, announce=Reporter(Console(file=screen, width=300)))
    assert "preparing the default corpus" in screen.getvalue() and (out / "meta.json").is_file()
