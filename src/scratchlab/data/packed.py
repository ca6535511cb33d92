"""Packed clip datasets: every clip in one memory-mapped file plus an index; opened without scanning.

A packed dataset is a folder::

    clips.bin    every clip's rows back to back, [total frames, width] row-major (codes: uint16,
                 frames: float32), memory-mapped on open
    index.npz    per clip: offset and length (frames), duration_s (NaN: none), split_key (the first
                 8 bytes of sha256(name), so the split for any val fraction is the folder's:
                 `split_of(name) == "val"` <=> split_key / 2**64 < val_fraction), and the names,
                 texts and tags as UTF-8 blobs with offsets
    pack.json    format, kind, dtype, width, counts, the source folder and what its validation found;
                 written last, so a half-written pack is never taken for one

Written by `pack_writer` (codec: `pack_codes_dir`, cascade: `pack_frames_dir`), read by `PackedClips`.
Opening costs reading the index (about 40 bytes a clip and the texts), whatever the audio hours.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from scratchlab.errors import UserError

PACK_META = "pack.json"
PACK_DATA = "clips.bin"
PACK_INDEX = "index.npz"
PACK_FORMAT = "scratchlab-pack"
PACK_VERSION = 1
TAG_SEP = "\x1f"  # unit separator: between the tags of one clip (never in a tag someone types)


def is_packed(path: str | Path) -> bool:
    return (Path(path) / PACK_META).is_file()


def split_key(name: str) -> int:
    """The first 8 bytes of sha256(name), big-endian: what `data.manifest.split_of` compares."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def _blob(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


class PackWriter:
    """Appends clips to ``clips.bin`` one at a time; `finish` writes the index and pack.json."""

    def __init__(self, out: Path, kind: str, dtype: np.dtype, source: str) -> None:
        self.out, self.kind, self.dtype, self.source = out, kind, np.dtype(dtype), source
        self.file = open(out / (PACK_DATA + ".partial"), "wb")
        self.names: list[str] = []
        self.texts: list[str] = []
        self.tags: list[str] = []
        self.lengths: list[int] = []
        self.durations: list[float] = []
        self.width: int | None = None
        self.finished = False

    def add(self, name: str, arr: np.ndarray, text: str = "", tags: tuple[str, ...] = (),
            duration_s: float | None = None) -> None:
        if self.width is None:
            self.width = int(arr.shape[1])
        if arr.shape[1] != self.width:
            raise ValueError(f"{name}: width {arr.shape[1]} != {self.width}")
        if self.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(self.dtype).max:
            raise UserError(f"{name}: code {int(arr.max())} does not fit the packed {self.dtype.name} codes; "
                            f"codebooks larger than {np.iinfo(self.dtype).max + 1} are not supported packed")
        self.file.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.names.append(name)
        self.texts.append(text)
        self.tags.append(TAG_SEP.join(tags))
        self.lengths.append(int(arr.shape[0]))
        self.durations.append(np.nan if duration_s is None else float(duration_s))

    def finish(self, **info) -> None:
        """Close the data, write the index, then pack.json (the pack is complete from that moment)."""
        self.file.close()
        lengths = np.array(self.lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1], out=offsets[1:])
        arrays = {"offsets": offsets, "lengths": lengths, "durations": np.array(self.durations, dtype=np.float64),
                  "split_keys": np.array([split_key(n) for n in self.names], dtype=np.uint64)}
        for field, strings in (("names", self.names), ("texts", self.texts), ("tags", self.tags)):
            arrays[f"{field}_blob"], arrays[f"{field}_offsets"] = _blob(strings)
        with open(self.out / (PACK_INDEX + ".partial"), "wb") as f:
            np.savez(f, **arrays)
        os.replace(self.out / (PACK_DATA + ".partial"), self.out / PACK_DATA)
        os.replace(self.out / (PACK_INDEX + ".partial"), self.out / PACK_INDEX)
        meta = {"format": PACK_FORMAT, "version": PACK_VERSION, "kind": self.kind, "dtype": self.dtype.name,
                "width": self.width, "clips": len(lengths), "frames": int(lengths.sum()), "source": self.source,
                **info}
        tmp = self.out / (PACK_META + ".partial")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, self.out / PACK_META)
        self.finished = True


@contextmanager
def pack_writer(out: str | Path, source: str, kind: str = "codes", dtype=np.uint16) -> Iterator[PackWriter]:
    """A `PackWriter` into ``out`` (new, empty, or an earlier pack, which is replaced)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_packed(out))):
        raise UserError(f"--pack {out} exists and is not a packed dataset; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / PACK_META).unlink(missing_ok=True)  # from now on the folder is not a pack until finish()
    writer = PackWriter(out, kind, dtype, source)
    try:
        yield writer
    finally:
        if not writer.finished:
            writer.file.close()
            for name in (PACK_DATA, PACK_INDEX):
                (out / (name + ".partial")).unlink(missing_ok=True)


class PackedClips:
    """A packed dataset, memory-mapped: per-clip accessors, no per-clip objects until asked."""

    def __init__(self, root: str | Path, kind: str | None = None) -> None:
        self.root = Path(root)
        try:
            meta = json.loads((self.root / PACK_META).read_text())
            if meta.get("format") != PACK_FORMAT or meta.get("version") != PACK_VERSION:
                raise ValueError(f"not a {PACK_FORMAT} v{PACK_VERSION} ({meta.get('format')} v{meta.get('version')})")
            if kind is not None and meta.get("kind") != kind:
                raise ValueError(f"it holds {meta.get('kind')}, not {kind}")
            with np.load(self.root / PACK_INDEX, allow_pickle=False) as index:
                arrays = {k: index[k] for k in index.files}
            self.meta = meta
            self.width = int(meta["width"])
            frames = int(meta["frames"])
            dtype = np.dtype(meta["dtype"])
            data_path = self.root / PACK_DATA
            if data_path.stat().st_size != frames * self.width * dtype.itemsize:
                raise ValueError(f"{PACK_DATA} is {data_path.stat().st_size} bytes, expected "
                                 f"{frames * self.width * dtype.itemsize} (truncated?)")
            self.data = (np.memmap(data_path, dtype=dtype, mode="r", shape=(frames, self.width)) if frames
                         else np.zeros((0, self.width), dtype=dtype))
            self.offsets, self.lengths = arrays["offsets"], arrays["lengths"]
            self.durations, self.split_keys = arrays["durations"], arrays["split_keys"]
            self._blobs = {f: (arrays[f"{f}_blob"].tobytes(), arrays[f"{f}_offsets"]) for f in ("names", "texts", "tags")}
        except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise UserError(f"packed dataset {self.root} is incomplete or corrupt ({exc}); pack it again") from exc
        if len(self.lengths) != meta["clips"] or (len(self.lengths) and
                                                   int(self.offsets[-1] + self.lengths[-1]) != frames):
            raise UserError(f"packed dataset {self.root}: the index does not match {PACK_DATA}; pack it again")

    @property
    def summary(self) -> dict:
        return self.meta.get("summary", {})

    @property
    def n_codebooks(self) -> int:
        return self.width

    def __len__(self) -> int:
        return len(self.lengths)

    def _string(self, field: str, i: int) -> str:
        blob, offsets = self._blobs[field]
        return blob[offsets[i] : offsets[i + 1]].decode("utf-8")

    def name(self, i: int) -> str:
        return self._string("names", i)

    def codes(self, i: int) -> np.ndarray:
        """Clip ``i``'s rows ``[T, width]``: a view into the memory map (nothing is read until sliced)."""
        start = int(self.offsets[i])
        return self.data[start : start + int(self.lengths[i])]

    frames = codes

    def text_tags(self, i: int) -> tuple[str, tuple[str, ...]]:
        tags = self._string("tags", i)
        return self._string("texts", i), tuple(tags.split(TAG_SEP)) if tags else ()

    def duration(self, i: int) -> float | None:
        d = float(self.durations[i])
        return None if np.isnan(d) else d


class ClipView(Sequence):
    """Some clips of a packed dataset (a split) as a sequence of memory-mapped ``[T, width]`` views.

    ``lengths`` lets window sampling skip building a view per clip.
    """

    def __init__(self, store: PackedClips, indices: list[int]) -> None:
        self.store, self.indices = store, list(indices)
        self.lengths = store.lengths[self.indices] if self.indices else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.store.codes(j) for j in self.indices[i]]
        return self.store.codes(self.indices[i])
