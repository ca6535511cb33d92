"""The one manifest reader and the one hash split, shared by codes, cascade frames and text.

A clip dataset is a folder with ``manifest.jsonl``: one JSON object a line naming a file
(``{"codes": "clip.npy", ...}`` for codec codes, ``{"frames": "clip.npy", ...}`` for cascade
frames). `read_manifest` streams it and sorts every line into a usable row or a `BadFile` with
its reason (not JSON, no file name, a path outside the folder, listed twice); what a family
does with the bad ones (skip and name, or refuse) is the family's choice.

`split_of` puts an item in ``train`` or ``val`` by a hash of its key (a clip's file name, a
document's content): the same on every machine and run, so an item is never in both splits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from scratchlab.errors import UserError

MANIFEST = "manifest.jsonl"
Split = Literal["train", "val"]
# "sha256": clips, by file name. "blake2b": text documents, by content (the hash text data has always
# used: changing it would move documents between splits and change every text run's val loss).
HashMethod = Literal["sha256", "blake2b"]


@dataclass(frozen=True)
class BadFile:
    """A manifest entry (or a manifest line) that is not used, and why."""

    file: str
    reason: str


@dataclass(frozen=True)
class ManifestRow:
    """One usable manifest line: the file it names (relative and resolved) and the whole object."""

    line: int
    name: str
    path: Path
    row: dict


def hash_key(key: str | bytes, method: HashMethod = "sha256") -> bytes:
    """The digest `split_of` decides by (also used to order items deterministically)."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    if method == "sha256":
        return hashlib.sha256(data).digest()
    if method == "blake2b":
        return hashlib.blake2b(data, digest_size=8).digest()
    raise ValueError(f"unknown hash method {method!r}")


def split_of(key: str | bytes, val_fraction: float, method: HashMethod = "sha256") -> Split:
    """``val`` for about a ``val_fraction`` of keys, by a hash of the key; ``train`` for the rest."""
    digest = hash_key(key, method)
    if method == "sha256":
        share = int.from_bytes(digest[:8], "big") / 2**64
        return "val" if share < val_fraction else "train"
    bucket = int.from_bytes(digest, "little") % 10_000
    return "val" if bucket < val_fraction * 10_000 else "train"


def iter_manifest(root: Path, key: str, example: str,
                  check: Callable[[dict], str | None] | None = None) -> Iterator[ManifestRow | BadFile]:
    """Every non-blank line of ``root/manifest.jsonl``, as a usable row or a bad entry with its reason.

    ``key`` is the field naming the file (``codes`` / ``frames``); ``example`` is a line shown in the
    error when the folder or the manifest is missing; ``check`` (the family's own fields) returns why
    a row is bad, or None.
    """
    root = Path(root)
    manifest = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"dataset {root} is not a folder; give the folder holding {MANIFEST} and the .npy files")
    if not manifest.is_file():
        raise UserError(f"{manifest} not found; the dataset needs a {MANIFEST} with one {example} line per clip")
    seen: set[str] = set()
    root_resolved = root.resolve()
    with open(manifest, "rb") as lines:
        for n, raw in enumerate(lines, start=1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            where = f"{MANIFEST}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadFile(where, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key]:
                yield BadFile(where, f'no "{key}" file name')
                continue
            name = row[key]
            if check is not None and (reason := check(row)) is not None:
                yield BadFile(name, reason)
                continue
            path = (root / name).resolve()
            if not path.is_relative_to(root_resolved):
                yield BadFile(name, "path outside the dataset folder")
                continue
            if name in seen:
                yield BadFile(name, "listed twice in the manifest (the first is used)")
                continue
            seen.add(name)
            yield ManifestRow(n, name, path, row)


def read_manifest(root: Path, key: str, example: str,
                  check: Callable[[dict], str | None] | None = None) -> tuple[list[ManifestRow], list[BadFile]]:
    """`iter_manifest` collected: (usable rows in manifest order, bad entries in manifest order)."""
    rows: list[ManifestRow] = []
    bad: list[BadFile] = []
    for item in iter_manifest(root, key, example, check):
        (rows if isinstance(item, ManifestRow) else bad).append(item)
    return rows, bad
