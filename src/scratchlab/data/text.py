"""Text data: documents -> byte-level BPE -> token shards on disk.

A prepared data dir holds::

    tokenizer.json    HF tokenizers file (trained here or copied from the user)
    train.bin         token ids, documents separated by EOS (numpy memmap)
    val.bin           same, held-out documents (split BY DOCUMENT, deterministically)
    token_bytes.npy   UTF-8 byte length of every token id (0 for special tokens), for bits/byte
    meta.json         vocab size, special ids, dtype, token/byte/document counts, content hash

Training reads these through `TextData`; nothing else opens the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scratchlab.errors import UserError

EOS_TOKEN = "<|endoftext|>"
META_VERSION = 1
MIN_VOCAB = 260  # byte-level alphabet (256) + EOS + a few merges


# ---------------------------------------------------------------- reading documents


def _read_text_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary or unreadable: not a text document
    return text if text.strip() else None


def read_documents(src: str | Path) -> list[str]:
    """Documents from a folder of text files, one text file, or a jsonl with a `text` field.

    A folder: every UTF-8 file under it is one document (binary files are skipped).
    A ``.jsonl`` file: one document per line, from its ``text`` field.
    Any other file: documents are separated by blank lines.
    """
    path = Path(src)
    if not path.exists():
        raise UserError(f"data source {path} does not exist; give a folder of text files, a text file or a .jsonl")
    if path.is_dir():
        docs = [
            doc
            for file in sorted(p for p in path.rglob("*") if p.is_file())
            if (doc := _read_text_file(file)) is not None
        ]
    elif path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg}); each line must be a JSON object") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{lineno}: each line needs a string 'text' field")
            if record["text"].strip():
                docs.append(record["text"])
    else:
        text = _read_text_file(path) or ""
        docs = [block for block in text.split("\n\n") if block.strip()]
    if not docs:
        raise UserError(f"data source {path} has no text documents; check the path (empty or binary files only)")
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
    """Deterministic document-level split: a document's side depends only on its content."""
    if len(docs) < 2:
        raise UserError("need at least 2 documents to split train/val by document; add more text")
    train, val = [], []
    for doc in docs:
        bucket = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little") % 10_000
        (val if bucket < val_fraction * 10_000 else train).append(doc)
    if not val:  # tiny corpora: guarantee a non-empty validation split
        val.append(train.pop())
    if not train:
        train.append(val.pop())
    return train, val


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization) with one special token, EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise UserError(f"tokenizer file {path} could not be read ({exc}); give a HF tokenizers tokenizer.json") from exc


def _is_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    kinds = [spec.get("type")] + [part.get("type") for part in spec.get("pretokenizers", [])]
    return "ByteLevel" in kinds


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for; special tokens count 0 (they are not text)."""
    vocab_size = tokenizer.get_vocab_size()
    lengths = np.zeros(vocab_size, dtype=np.int32)
    special = {tok.content for tok in tokenizer.get_added_tokens_decoder().values() if tok.special}
    byte_level = _is_byte_level(tokenizer)
    for token_id in range(vocab_size):
        piece = tokenizer.id_to_token(token_id)
        if piece is None or piece in special:
            continue
        # Byte-level BPE maps every byte to one printable character, so the piece's length is its byte count.
        lengths[token_id] = len(piece) if byte_level else len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


# ---------------------------------------------------------------- shards


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _encode_split(tokenizer, docs: list[str], eos_id: int, dtype, path: Path, chunk: int = 512) -> int:
    """Encode documents in chunks (bounded memory) and write ids with EOS after each document."""
    total = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        for start in range(0, len(docs), chunk):
            encodings = tokenizer.encode_batch(docs[start : start + chunk], add_special_tokens=False)
            for enc in encodings:
                ids = np.asarray(enc.ids + [eos_id], dtype=dtype)
                out.write(ids.tobytes())
                total += len(ids)
    os.replace(tmp, path)
    return total


def prepare_text(
    src: str | Path | list[str],
    out: str | Path,
    *,
    vocab_size: int = 4096,
    tokenizer_path: str | Path | None = None,
    val_fraction: float = 0.05,
    source_name: str | None = None,
) -> Path:
    """Tokenize documents into a data dir (see module docstring). Returns the dir."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a folder path for the data dir")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (got {val_fraction})")
    if tokenizer_path is None and vocab_size < MIN_VOCAB:
        raise UserError(f"vocab_size {vocab_size} is below {MIN_VOCAB} (256 bytes + EOS + merges); raise it")
    docs = src if isinstance(src, list) else read_documents(src)
    train_docs, val_docs = split_by_document(docs, val_fraction)
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
        shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    else:
        tokenizer = train_tokenizer(train_docs, vocab_size)  # never sees validation text
        _write_atomic(out / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise UserError(f"tokenizer {tokenizer_path} has no {EOS_TOKEN} token; add it as a special token")
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab < 2**16 else np.uint32

    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        counts[split] = {
            "tokens": _encode_split(tokenizer, split_docs, eos_id, dtype, out / f"{split}.bin"),
            "bytes": sum(len(d.encode("utf-8")) for d in split_docs),
            "documents": len(split_docs),
        }
    _write_atomic(out / "token_bytes.npy", lambda p: np.save(open(p, "wb"), token_byte_lengths(tokenizer)))
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(hashlib.sha256(doc.encode()).digest())
    meta = {
        "version": META_VERSION,
        "source": source_name or (str(src) if not isinstance(src, list) else "<documents>"),
        "vocab_size": vocab,
        "eos_id": eos_id,
        "special_ids": {"eos": eos_id},
        "dtype": np.dtype(dtype).name,
        "val_fraction": val_fraction,
        "splits": counts,
        "content_sha256": digest.hexdigest(),
    }
    # meta.json is written last: its presence marks a complete data dir.
    _write_atomic(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("SCRATCHLAB_CACHE", Path.home() / ".cache" / "scratchlab"))


def prepare_stdlib(vocab_size: int = 4096, max_mb: float = 0.0, announce: Callable[[str], None] | None = None) -> Path:
    """The default corpus, prepared once per (Python version, vocab, size cap) and cached.

    ``announce`` is told when the (slow, ~20 s) preparation actually runs.
    """
    import sys

    max_bytes = int(max_mb * 1e6)
    files = stdlib_files(max_bytes)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}-{max_bytes or 'all'}-n{len(files)}"
    out = cache_dir() / f"stdlib-{tag}"
    if (out / "meta.json").exists():
        return out
    if announce:
        announce(f"preparing the default corpus: {len(files)} standard-library files -> {out} (once; cached)")
    docs = [doc for f in files if (doc := _read_text_file(f)) is not None]
    return prepare_text(docs, out, vocab_size=vocab_size, source_name=f"python stdlib ({len(docs)} files)")


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

