"""Text data: documents -> byte-level BPE -> token shards on disk.

A prepared data dir holds::

    tokenizer.json    HF tokenizers file (trained here on a bounded sample, or copied from the user)
    train.bin         token ids, documents separated by EOS (numpy memmap)
    val.bin           same, held-out documents (split BY DOCUMENT, by a hash of its content)
    token_bytes.npy   UTF-8 byte length of every token id (0 for special tokens), for bits/byte
    meta.json         vocab size, special ids, dtype, token/byte/document counts, skipped records
                      by reason, the tokenizer sample, content hash (written last: the dir is complete)
    progress.json     only while a preparation runs: its resume point (data/prepare.py)

`prepare_text` (data/prepare.py) streams any corpus size in bounded memory from the sources in
data/sources.py. Training reads a data dir through `TextData`; nothing else opens the files.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scratchlab.data.console import say
from scratchlab.data.manifest import split_of
from scratchlab.data.prepare import META_VERSION, prepare_text
from scratchlab.data.sources import DocumentSource
from scratchlab.data.tokenizer import EOS_TOKEN, MIN_VOCAB, load_tokenizer, token_byte_lengths, train_tokenizer
from scratchlab.errors import UserError

__all__ = ["EOS_TOKEN", "META_VERSION", "MIN_VOCAB", "TextData", "cache_dir", "load_tokenizer", "open_text_data",
           "prepare_stdlib", "prepare_text", "read_documents", "split_by_document", "stdlib_files",
           "token_byte_lengths", "train_tokenizer"]


# ---------------------------------------------------------------- reading documents


def read_documents(src: str | Path, text_field: str = "text") -> list[str]:
    """Every document of a source as a list (small corpora and tests; `prepare_text` streams instead).

    Sources and their formats: data/sources.py. Records that are not documents (empty, undecodable,
    invalid JSON, no text field) are skipped; a source with none left is a UserError naming why.
    """
    source = DocumentSource(src, text_field)
    docs: list[str] = []
    skipped: dict[str, tuple[int, str]] = {}
    for item in source:
        if item.text is not None:
            docs.append(item.text)
        else:
            n, where = skipped.get(item.skipped, (0, item.where))
            skipped[item.skipped] = (n + 1, where)
    if not docs:
        why = "; ".join(f"{n} {reason} (first: {where})" for reason, (n, where) in sorted(skipped.items()))
        raise UserError(f"data source {src} has no text documents" + (f": {why}" if why else "")
                        + "; check the path, --text-field and that the files are UTF-8")
    return docs


def stdlib_files(max_bytes: int = 0) -> list[Path]:
    """The running interpreter's standard-library ``.py`` files: real text present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if max_bytes:
        kept, total = [], 0
        for file in files:
            total += file.stat().st_size
            if total > max_bytes:
                break
            kept.append(file)
        files = kept
    return files


def split_by_document(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic document-level split: a document's side depends only on its content.

    The same rule as `prepare_text` (`split_of` by content, tiny corpora keep both sides non-empty).
    """
    if len(docs) < 2:
        raise UserError("need at least 2 documents to split train/val by document; add more text")
    train, val = [], []
    for doc in docs:
        (val if split_of(doc.encode(), val_fraction, "blake2b") == "val" else train).append(doc)
    if not val:  # tiny corpora: guarantee a non-empty validation split
        val.append(train.pop())
    if not train:
        train.append(val.pop())
    return train, val


def cache_dir() -> Path:
    return Path(os.environ.get("SCRATCHLAB_CACHE", Path.home() / ".cache" / "scratchlab"))


def prepare_stdlib(vocab_size: int = 4096, max_mb: float = 0.0, announce: Callable[[str], None] | None = None) -> Path:
    """The default corpus, prepared once per (Python version, vocab, size cap) and cached.

    ``announce`` (a callable or the trainer's reporter) is told when the (slow, ~20 s) preparation actually runs. Each file is one document,
    streamed like any other source (no list of the corpus is built).
    """
    import sys

    max_bytes = int(max_mb * 1e6)
    files = stdlib_files(max_bytes)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}-{max_bytes or 'all'}-n{len(files)}"
    out = cache_dir() / f"stdlib-{tag}"
    if (out / "meta.json").exists():
        return out
    say(announce, f"preparing the default corpus: {len(files)} standard-library files -> {out} (once; cached)")
    source = DocumentSource.from_files(files)
    n_docs = sum(1 for item in source if item.text is not None)
    return prepare_text(source, out, vocab_size=vocab_size, source_name=f"python stdlib ({n_docs} files)")


# ---------------------------------------------------------------- reading a data dir


@dataclass
class TextData:
    """A prepared data dir, memory-mapped."""

    root: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    token_bytes: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def tokenizer(self):
        return load_tokenizer(self.root / "tokenizer.json")


def open_text_data(path: str | Path) -> TextData:
    root = Path(path)
    if not root.exists():
        raise UserError(f"data path {root} does not exist; run `scratchlab data text SRC --out {root}` first")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"data path {root} is not a prepared data dir (no meta.json); run `scratchlab data text {root} --out DIR` "
            "and set data.path=DIR"
        )
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        splits = {}
        for split in ("train", "val"):
            file = root / f"{split}.bin"
            expected = meta["splits"][split]["tokens"]
            if not file.is_file() or file.stat().st_size != expected * dtype.itemsize:
                raise UserError(f"{file} is missing or truncated; re-run `scratchlab data text` for {root}")
            splits[split] = np.memmap(file, dtype=dtype, mode="r")
        token_bytes = np.load(root / "token_bytes.npy", allow_pickle=False)
    except (KeyError, ValueError, json.JSONDecodeError, FileNotFoundError) as exc:
        raise UserError(f"data dir {root} is incomplete or corrupt ({exc}); re-run `scratchlab data text`") from exc
    if splits["train"].size == 0 or splits["val"].size == 0:
        raise UserError(f"data dir {root} has an empty split; add more documents")
    return TextData(root=root, meta=meta, train=splits["train"], val=splits["val"], token_bytes=token_bytes)

