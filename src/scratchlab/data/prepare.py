"""Streaming text preparation: source -> split by content hash -> BPE -> token shards, in bounded memory.

Documents stream from a `DocumentSource` in batches of a few MB; a reader thread parses the next
batch while the tokenizer (its batch encoder: Rust, all cores, GIL released) encodes this one.
Each document goes to ``train.bin`` or ``val.bin`` by a hash of its content (`split_of`, so the
same text always lands on the same side and never on both) with EOS after it.

Resumable: every ``commit_mb`` of text the shards are flushed to disk and ``progress.json``
records how many source records are done and how long each shard is. A run that was interrupted
(Ctrl-C, kill -9) and started again with the same source and options truncates the shards to the
last commit, skips the records already done and continues; the files it ends with are the same,
byte for byte, as an uninterrupted run's. ``meta.json`` is written last: it marks a complete dir.

The tokenizer is trained on a bounded sample (the first ``tokenizer_sample_mb`` of training
documents, streamed to the trainer, never validation text) unless a ``tokenizer.json`` is given.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scratchlab.data.manifest import split_of
from scratchlab.data.sources import DocumentSource, Item
from scratchlab.data.tokenizer import EOS_TOKEN, MIN_VOCAB, load_tokenizer, token_byte_lengths, train_tokenizer
from scratchlab.errors import UserError

META_VERSION = 1
PROGRESS = "progress.json"
SPLITS = ("train", "val")
DEFAULT_SAMPLE_MB = 100.0
DEFAULT_COMMIT_MB = 64.0
BATCH_BYTES = 1 << 20  # text per encode call: hundreds of documents (every core busy), bounded encodings
QUEUE_BATCHES = 2  # batches read ahead: memory stays a few batches whatever the corpus

# (phase, source bytes read, source bytes in all, tokens written): for a progress bar.
ProgressHook = Callable[[str, int, int, int], None]


@dataclass
class _State:
    """What progress.json holds: the resume point and the counts up to it."""

    items: int = 0  # source records consumed (documents and skipped records)
    offsets: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})  # shard bytes
    documents: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    tokens: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    bytes: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    last: dict[str, list[int]] = field(default_factory=lambda: {s: [0, 0] for s in SPLITS})  # last doc: tokens, bytes
    skipped: dict[str, int] = field(default_factory=dict)
    first_skip: dict[str, str] = field(default_factory=dict)  # reason -> where it first happened
    tokenizer_sample: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def write_progress(out: Path, options: dict, state: _State) -> None:
    """Commit the resume point (the shards are already on disk, flushed)."""
    _write_atomic(out / PROGRESS, lambda p: p.write_text(json.dumps({"options": options, **state.to_json()})))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _load_progress(out: Path, options: dict) -> _State | None:
    try:
        saved = json.loads((out / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.pop("options", None) != options:
        return None  # another source or other options: start over
    state = _State()
    try:
        for key in state.__dict__:
            setattr(state, key, saved[key])
    except KeyError:
        return None
    if any(not (out / f"{s}.bin").is_file() or (out / f"{s}.bin").stat().st_size < state.offsets[s] for s in SPLITS):
        return None  # the shards are shorter than their commit: not ours to continue
    return state


# ---------------------------------------------------------------- the tokenizer sample


def _sample_documents(source: DocumentSource, val_fraction: float, max_bytes: int, info: dict,
                      progress: ProgressHook | None) -> Iterator[str]:
    """Training documents from the start of the source, up to ``max_bytes`` of text.

    When the whole corpus fits and no document hashes to val, the last training document is held
    back: it becomes the validation set (as the final split does), so the tokenizer never sees it.
    """
    held: str | None = None
    last_val: str | None = None
    total = n_train = n_val = 0
    complete = True
    given = {"documents": 0, "bytes": 0}

    def give(text: str) -> str:
        given["documents"] += 1
        given["bytes"] += len(text.encode("utf-8"))
        return text

    for item in source:
        if item.text is None:
            continue
        data = item.text.encode("utf-8")
        if split_of(data, val_fraction, "blake2b") == "val":
            n_val += 1
            last_val = item.text
            continue
        if held is not None and total + len(data) > max_bytes:
            complete = False
            break
        if held is not None:
            yield give(held)
        held, total, n_train = item.text, total + len(data), n_train + 1
        if progress and n_train % 256 == 0:
            progress("tokenizer sample", source.position, source.total_bytes, 0)
    if held is not None and (not complete or n_val > 0):
        yield give(held)
    elif complete and n_train == 0 and last_val is not None:
        yield give(last_val)  # all documents hash to val: the last one becomes the training set
    info.update(given, whole_corpus=complete)


# ---------------------------------------------------------------- reading in batches, in a thread


@dataclass
class _Batch:
    """Records read by the reader thread, with each document's split and UTF-8 size already worked out."""

    items: list[Item] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    position: int = 0


def _batches(source: DocumentSource, skip: int, digest, stop: threading.Event, val_fraction: float,
             ) -> Iterator[_Batch]:
    """Batches of about BATCH_BYTES of text, after the first ``skip`` records.

    The content digest covers every document, also the ones skipped on a resume. Hashing and the
    split happen here, in the reader thread, while the tokenizer encodes the previous batch.
    """
    batch, size = _Batch(), 0
    for n, item in enumerate(source):
        if stop.is_set():
            return
        data = item.text.encode("utf-8") if item.text is not None else b""
        if item.text is not None:
            digest.update(hashlib.sha256(data).digest())
        if n < skip:
            continue
        batch.items.append(item)
        if item.text is not None:
            batch.texts.append(item.text)
            batch.splits.append(split_of(data, val_fraction, "blake2b"))
            batch.sizes.append(len(data))
            size += len(data)
        if size >= BATCH_BYTES:
            batch.position = source.position
            yield batch
            batch, size = _Batch(), 0
    if batch.items:
        batch.position = source.position
        yield batch


def _read_ahead(batches: Iterator, stop: threading.Event) -> Iterator:
    """Run ``batches`` in a thread, QUEUE_BATCHES ahead; its exceptions are raised here."""
    q: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
    done = object()

    def work() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=work, name="scratchlab-data-reader", daemon=True)
    thread.start()
    try:
        while (b := q.get()) is not done:
            if isinstance(b, BaseException):
                raise b
            yield b
    finally:
        stop.set()
        thread.join(timeout=5)


# ---------------------------------------------------------------- the preparation


def prepare_text(
    src: str | Path | list[str] | DocumentSource,
    out: str | Path,
    *,
    vocab_size: int = 4096,
    tokenizer_path: str | Path | None = None,
    val_fraction: float = 0.05,
    source_name: str | None = None,
    text_field: str = "text",
    tokenizer_sample_mb: float = DEFAULT_SAMPLE_MB,
    commit_mb: float = DEFAULT_COMMIT_MB,
    progress: ProgressHook | None = None,
) -> Path:
    """Tokenize documents into a data dir (see data/text.py); resumes an interrupted run. Returns the dir."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a folder path for the data dir")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (got {val_fraction})")
    if tokenizer_path is None and vocab_size < MIN_VOCAB:
        raise UserError(f"vocab_size {vocab_size} is below {MIN_VOCAB} (256 bytes + EOS + merges); raise it")
    if tokenizer_sample_mb <= 0 or commit_mb <= 0:
        raise UserError("--tokenizer-sample-mb and --commit-mb must be > 0")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise UserError(f"--tokenizer {tokenizer_path} is not a file; give a HF tokenizers tokenizer.json")
    source = src if isinstance(src, DocumentSource) else DocumentSource(src, text_field)
    sample_bytes = int(tokenizer_sample_mb * 1e6)
    fingerprint = source.fingerprint()
    options = {"source": fingerprint, "vocab_size": vocab_size, "val_fraction": val_fraction,
               "text_field": text_field, "tokenizer_sample_bytes": sample_bytes,
               "tokenizer": _sha256_file(Path(tokenizer_path)) if tokenizer_path is not None else None}
    _check_documents(source)
    out.mkdir(parents=True, exist_ok=True)
    state = _load_progress(out, options) if fingerprint is not None else None

    if state is None:  # a fresh start: nothing of an earlier preparation may be taken as ours
        for name in ("meta.json", PROGRESS, "train.bin", "val.bin", "token_bytes.npy"):
            (out / name).unlink(missing_ok=True)
        state = _State()
        if tokenizer_path is not None:
            tokenizer = load_tokenizer(tokenizer_path)
            shutil.copyfile(tokenizer_path, out / "tokenizer.json")
            state.tokenizer_sample = {"given": str(tokenizer_path)}
        else:
            info: dict = {}
            tokenizer = train_tokenizer(_sample_documents(source, val_fraction, sample_bytes, info, progress),
                                        vocab_size)
            _write_atomic(out / "tokenizer.json", lambda p: tokenizer.save(str(p)))
            state.tokenizer_sample = {"max_mb": tokenizer_sample_mb, **info}
        for s in SPLITS:
            (out / f"{s}.bin").write_bytes(b"")
        if fingerprint is not None:
            write_progress(out, options, state)
    else:
        tokenizer = load_tokenizer(out / "tokenizer.json")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise UserError(f"tokenizer {tokenizer_path} has no {EOS_TOKEN} token; add it as a special token")
    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab < 2**16 else np.uint32)

    digest = hashlib.sha256()
    _encode_all(source, out, options, state, tokenizer, eos_id, dtype, val_fraction, int(commit_mb * 1e6),
                digest, progress, fingerprint is not None)
    documents = sum(state.documents.values())
    if documents < 2:  # the source changed under us since the check
        raise _nothing_left(source, documents, state.skipped, state.first_skip)
    _keep_both_splits(out, options, state, dtype, fingerprint is not None)

    _write_atomic(out / "token_bytes.npy", lambda p: np.save(open(p, "wb"), token_byte_lengths(tokenizer)))
    meta = {
        "version": META_VERSION,
        "source": source_name or str(source.describe()),
        "vocab_size": vocab,
        "eos_id": eos_id,
        "special_ids": {"eos": eos_id},
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "splits": {s: {"tokens": state.tokens[s], "bytes": state.bytes[s], "documents": state.documents[s]}
                   for s in SPLITS},
        "content_sha256": digest.hexdigest(),
        "text_field": text_field,
        "skipped": dict(sorted(state.skipped.items())),
        "tokenizer": state.tokenizer_sample,
    }
    # meta.json is written last: its presence marks a complete data dir.
    _write_atomic(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    (out / PROGRESS).unlink(missing_ok=True)
    return out


def _nothing_left(source: DocumentSource, documents: int, skipped: dict[str, int], first: dict[str, str]) -> UserError:
    why = ", ".join(f"{n} {reason} (first: {first.get(reason, '?')})" for reason, n in sorted(skipped.items()))
    hint = " (undecodable: binary or not UTF-8)" if "undecodable" in skipped else ""
    head = "no text documents" if documents == 0 else f"only {documents} text document (2 are needed: train and val)"
    return UserError(f"data source {source.describe()} has {head}" + (f"; skipped {why}{hint}" if why else "")
                     + "; check the path, --text-field and that the files are UTF-8 text")


def _check_documents(source: DocumentSource) -> None:
    """At least 2 documents, found before anything is written (reads only until the second one)."""
    documents, skipped, first = 0, {}, {}
    for item in source:
        if item.text is not None:
            documents += 1
            if documents == 2:
                return
        else:
            skipped[item.skipped] = skipped.get(item.skipped, 0) + 1
            first.setdefault(item.skipped, item.where)
    raise _nothing_left(source, documents, skipped, first)


def _encode_all(source, out, options, state, tokenizer, eos_id, dtype, val_fraction, commit_bytes, digest,
                progress, resumable) -> None:
    files = {}
    for s in SPLITS:
        f = open(out / f"{s}.bin", "r+b")
        f.truncate(state.offsets[s])  # a kill after the last commit left a partial tail
        f.seek(state.offsets[s])
        files[s] = f
    stop = threading.Event()
    pending = 0
    encode = encoder(tokenizer)
    try:
        for batch in _read_ahead(_batches(source, state.items, digest, stop, val_fraction), stop):
            for item in batch.items:
                if item.text is None:
                    state.skipped[item.skipped] = state.skipped.get(item.skipped, 0) + 1
                    state.first_skip.setdefault(item.skipped, item.where)
            ids: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
            encodings = encode(batch.texts, add_special_tokens=False)
            for split, size, enc in zip(batch.splits, batch.sizes, encodings):
                doc = enc.ids
                doc.append(eos_id)
                ids[split].append(doc)
                state.documents[split] += 1
                state.tokens[split] += len(doc)
                state.bytes[split] += size
                state.last[split] = [len(doc), size]
                pending += size
            for s in SPLITS:
                n = sum(len(d) for d in ids[s])
                if n:
                    files[s].write(np.fromiter(itertools.chain.from_iterable(ids[s]), dtype, count=n).tobytes())
            state.items += len(batch.items)
            if progress:
                progress("tokenize", batch.position, source.total_bytes, sum(state.tokens.values()))
            if pending >= commit_bytes and resumable:
                _commit(files, out, options, state)
                pending = 0
        if resumable:
            _commit(files, out, options, state)
    finally:
        for f in files.values():
            f.close()


def encoder(tokenizer):
    """The tokenizer's batch encoder: ``encode_batch_fast`` (no character offsets: the same ids, faster) when the
    installed tokenizers has it, else ``encode_batch``. Both run in Rust on every core with the GIL released."""
    return getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)


def _commit(files, out, options, state) -> None:
    for s, f in files.items():
        f.flush()
        os.fsync(f.fileno())
        state.offsets[s] = f.tell()
    write_progress(out, options, state)


def _keep_both_splits(out: Path, options: dict, state: _State, dtype: np.dtype, resumable: bool) -> None:
    """Tiny corpora: a split left empty by the hash takes the other split's last document.

    The move appends first and truncates after the commit, so a kill at any point resumes correctly.
    """
    for empty, full in (("val", "train"), ("train", "val")):
        if state.documents[empty] or state.documents[full] < 2:
            continue
        n_tokens, n_bytes = state.last[full]
        path = out / f"{full}.bin"
        cut = state.tokens[full] - n_tokens
        tail = np.fromfile(path, dtype=dtype, offset=cut * dtype.itemsize)
        with open(out / f"{empty}.bin", "r+b") as f:
            f.truncate(state.offsets[empty] if resumable else f.seek(0, 2))
            f.seek(0, 2)
            f.write(tail.tobytes())
            f.flush()
            os.fsync(f.fileno())
            state.offsets[empty] = f.tell()
        state.offsets[full] = cut * dtype.itemsize
        for key, n in (("documents", 1), ("tokens", n_tokens), ("bytes", n_bytes)):
            getattr(state, key)[full] -= n
            getattr(state, key)[empty] += n
        state.last[empty] = [n_tokens, n_bytes]
        if resumable:
            write_progress(out, options, state)
        with open(path, "r+b") as f:
            f.truncate(cut * dtype.itemsize)
