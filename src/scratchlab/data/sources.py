"""Streaming document sources for `scratchlab data text`: one document at a time, never the corpus.

A source is a path (or, for the library, a list of strings):

- a folder: every file under it, sorted; ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` / ``.parquet``
  files are read by their format, any other file is one document (UTF-8; others are skipped);
  a folder saved by Hugging Face ``datasets.save_to_disk`` is read with ``load_from_disk``
- ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one document per line, from its ``text_field``
- ``.parquet``: the ``text_field`` column, read one record batch at a time (pyarrow)
- any other file: documents separated by blank lines

Iterating a `DocumentSource` yields `Item`s: a document, or the reason a record was skipped
(``empty``, ``undecodable``, ``invalid JSON``, ``no text field``...), so that the caller can count
them. `position` is the bytes of the source consumed so far (compressed bytes for compressed
files), `total_bytes` their sum: together they drive the progress bar and its ETA.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scratchlab.errors import UserError

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by datasets.save_to_disk
READ_BLOCK = 1 << 20
PARQUET_BATCH_ROWS = 1024


def missing_extra(package: str, what: str) -> UserError:
    return UserError(f"{what} needs the '{package}' package: pip install 'scratchlab[data]'")


@dataclass(frozen=True)
class Item:
    """One record of a source: ``text`` (a document) or ``skipped`` (why it is not one) and ``where``."""

    text: str | None
    skipped: str | None = None
    where: str = ""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in RECORD_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


class DocumentSource:
    """Documents from a path or a list, streamed in a fixed order (the order decides nothing but the files' layout)."""

    def __init__(self, src: str | Path | list[str], text_field: str = "text") -> None:
        self.text_field = text_field
        self.position = 0
        if isinstance(src, list):
            self.docs: list[str] | None = src
            self.path = None
            self.files: list[Path] = []
            self.total_bytes = sum(len(d.encode("utf-8")) for d in src)
            return
        self.docs = None
        self.path = Path(src)
        if not self.path.exists():
            raise UserError(f"data source {self.path} does not exist; give a folder of text files, a text file, "
                            "a .jsonl[.gz|.zst], parquet files or a dataset saved with datasets.save_to_disk")
        if _is_hf_dataset(self.path):
            self.files = sorted(p for p in self.path.rglob("*.arrow") if p.is_file())
        elif self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*") if p.is_file())
        else:
            self.files = [self.path]
        self.total_bytes = sum(p.stat().st_size for p in self.files)

    @classmethod
    def from_files(cls, files: list[Path]) -> DocumentSource:
        """Each file one document (the stdlib corpus): no list of texts is built."""
        source = cls([])
        source.files, source.docs = list(files), None
        source.total_bytes = sum(p.stat().st_size for p in files)
        return source

    def fingerprint(self) -> str | None:
        """What a resumed preparation must find unchanged: the files' names, sizes and times (None: a list)."""
        if self.docs is not None:
            return None
        digest = hashlib.sha256(self.text_field.encode())
        for p in self.files:
            st = p.stat()
            digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        return "<documents>" if self.path is None and self.docs is not None else str(self.path or "<files>")

    def __iter__(self) -> Iterator[Item]:
        self.position = 0
        if self.docs is not None:
            for i, doc in enumerate(self.docs):
                self.position += len(doc.encode("utf-8"))
                yield Item(doc, where=f"document {i}") if doc.strip() else Item(None, "empty", f"document {i}")
            return
        if self.path is not None and _is_hf_dataset(self.path):
            yield from self._hf()
            return
        whole_files = self.path is None or self.path.is_dir()  # a folder (or a file list): a text file is one document
        for file in self.files:
            start = self.position
            suffix = _suffix(file)
            if suffix == ".parquet":
                yield from self._parquet(file, start)
            elif suffix:
                yield from self._jsonl(file, suffix, start)
            elif whole_files:
                yield self._whole_file(file)
            else:
                yield from self._blocks(file)
            self.position = start + file.stat().st_size

    # -- readers

    def _whole_file(self, file: Path) -> Item:
        try:
            data = file.read_bytes()
        except OSError as exc:
            return Item(None, "unreadable", f"{file} ({exc.strerror})")
        self.position += len(data)
        return _decode(_universal_newlines(data), str(file))

    def _blocks(self, file: Path) -> Iterator[Item]:
        """Blank-line separated documents of one text file, read a block at a time (newlines as in text mode)."""
        rest, n = b"", 0
        with open(file, "rb") as f:
            while block := f.read(READ_BLOCK):
                self.position += len(block)
                text = rest + block
                carry = text.endswith(b"\r")  # a CRLF may straddle two blocks
                parts = _universal_newlines(text[:-1] if carry else text).split(b"\n\n")
                rest = parts.pop() + (b"\r" if carry else b"")
                for part in parts:  # splitting bytes is safe: b"\n" never occurs inside a UTF-8 sequence
                    n += 1
                    yield _decode(part, f"{file}: block {n}")
        if rest:
            n += 1
            yield _decode(_universal_newlines(rest), f"{file}: block {n}")

    def _jsonl(self, file: Path, suffix: str, start: int) -> Iterator[Item]:
        raw = open(file, "rb")
        try:
            if suffix == ".jsonl.gz":
                stream = gzip.GzipFile(fileobj=raw)
            elif suffix == ".jsonl.zst":
                try:
                    import zstandard
                except ImportError:
                    raise missing_extra("zstandard", f"reading {file.name}") from None
                stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), READ_BLOCK)
            else:
                stream = raw
            field = self.text_field
            for lineno, line in enumerate(stream, start=1):
                self.position = start + raw.tell()
                if not line.strip():
                    continue
                where = f"{file}:{lineno}"
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    yield Item(None, "undecodable", where)
                    continue
                except json.JSONDecodeError:
                    yield Item(None, "invalid JSON", where)
                    continue
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    yield Item(None, f"no '{field}' field", where)
                elif not text.strip():
                    yield Item(None, "empty", where)
                else:
                    yield Item(text, where=where)
        except (OSError, EOFError) as exc:  # a corrupt or truncated compressed file
            yield Item(None, "unreadable", f"{file} ({type(exc).__name__}: {exc})")
        except Exception as exc:  # noqa: BLE001 - zstandard raises its own ZstdError
            if type(exc).__name__ != "ZstdError":
                raise
            yield Item(None, "unreadable", f"{file} ({exc})")
        finally:
            raw.close()

    def _column(self, names: list[str], where: Path) -> None:
        if self.text_field not in names:
            raise UserError(f"{where} has no column '{self.text_field}' (columns: {', '.join(names[:20])}); "
                            "name the text column with --text-field")

    def _rows(self, values: list, where: str, first: int) -> Iterator[Item]:
        for i, text in enumerate(values):
            if not isinstance(text, str):
                yield Item(None, "not text" if text is not None else "empty", f"{where}: row {first + i}")
            elif not text.strip():
                yield Item(None, "empty", f"{where}: row {first + i}")
            else:
                yield Item(text)

    def _parquet(self, file: Path, start: int) -> Iterator[Item]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise missing_extra("pyarrow", f"reading {file.name}") from None
        try:
            pf = pq.ParquetFile(file)
        except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends
            yield Item(None, "unreadable", f"{file} ({type(exc).__name__}: {exc})")
            return
        self._column(pf.schema_arrow.names, file)
        size, rows, done = file.stat().st_size, max(pf.metadata.num_rows, 1), 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[self.text_field]):
            values = batch.column(0).to_pylist()
            yield from self._rows(values, str(file), done)
            done += len(values)
            self.position = start + size * done // rows

    def _hf(self) -> Iterator[Item]:
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError:
            raise missing_extra("datasets", f"reading the saved dataset {self.path}") from None
        try:
            loaded = load_from_disk(str(self.path))  # memory-mapped arrow files: nothing is loaded yet
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
            raise UserError(f"{self.path} looks like a saved Hugging Face dataset but load_from_disk failed "
                            f"({type(exc).__name__}: {str(exc)[:200]}); check the folder") from exc
        parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, DatasetDict) else [loaded]
        total_rows = max(sum(len(p) for p in parts), 1)
        done = 0
        for part in parts:
            self._column(list(part.column_names), self.path)
            for batch in part.select_columns([self.text_field]).iter(batch_size=PARQUET_BATCH_ROWS):
                values = batch[self.text_field]
                yield from self._rows(values, str(self.path), done)
                done += len(values)
                self.position = self.total_bytes * done // total_rows


def _universal_newlines(data: bytes) -> bytes:
    """CRLF and CR as LF, as Python's text mode reads files (what text data has always seen)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data


def _decode(data: bytes, where: str) -> Item:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Item(None, "undecodable", where)  # binary, Latin-1, ...: not UTF-8 text
    if not text.strip():
        return Item(None, "empty", where)
    return Item(text, where=where)
