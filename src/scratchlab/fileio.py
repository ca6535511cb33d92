"""Reading and writing run-record files so that a record never lies.

Writes are atomic (a temp file beside the target, fsynced, renamed over it): a kill or a full
disk leaves the previous good file, never a torn one. A failed write is one line naming the path
and the cause (`RecordWriteError`, a UserError), with the temp file removed.

Reads never raise on bad content: a file that is not UTF-8, not JSON, or JSON of the wrong shape
is one warning (`RecordWarning`, naming the file and line) and the reader goes on with what is good.
`to_float` is the one way a metric value becomes a number.

A leaf module: it imports nothing from scratchlab but errors.
"""

from __future__ import annotations

import errno
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scratchlab.errors import UserError

MAX_STEP = 2**62  # a step or token count beyond this is corruption, not a run


class RecordWarning(UserWarning):
    """A run-record file (or one line of it) was unreadable and was skipped."""


class RecordWriteError(UserError):
    """A run-record file could not be written (disk full, read-only, no permission)."""


def warn_record(message: str) -> None:
    warnings.warn(message, RecordWarning, stacklevel=3)


def why(exc: OSError) -> str:
    """'No space left on device' for an OSError, without the path python adds."""
    return exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or type(exc).__name__


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``data`` in one step (temp file, fsync, rename).

    On failure the temp file is removed, ``path`` keeps its previous content and a
    `RecordWriteError` names the path and the cause.
    """
    path = Path(path)
    raw = data.encode(encoding, "backslashreplace") if isinstance(data, str) else data  # never fails on a surrogate
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise RecordWriteError(f"could not write {path}: {why(exc)}; the previous version is kept") from exc
    except BaseException:  # interrupted: no temp file left behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_append(path: str | Path, text: str) -> None:
    """Append ``text`` as a rewrite (old content + text, atomically): for small files such as notes.md."""
    path = Path(path)
    try:
        old = path.read_bytes() if path.exists() else b""
    except OSError as exc:
        raise RecordWriteError(f"could not read {path}: {why(exc)}") from exc
    atomic_write(path, old + text.encode("utf-8"))


# ---------------------------------------------------------------- reading


def read_text(path: str | Path, *, warn: bool = True) -> str | None:
    """The file's text; None when absent or unreadable. Bytes that are not UTF-8 become U+FFFD (with a warning)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if warn:
            warn_record(f"{path}: unreadable ({why(exc)}); skipped")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if warn:
            warn_record(f"{path}: byte {exc.start} is not UTF-8; read with replacement characters")
        return raw.decode("utf-8", errors="replace")


def _clean_text(text: str) -> str:
    # JSON may spell a lone surrogate ("\\udcff"): valid JSON, but no UTF-8 page or file can hold it.
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _finite_json(value: Any) -> Any:
    """Non-finite floats (1e400, NaN) as their strings, as metrics.jsonl writes them; lone surrogates as U+FFFD."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dict):
        return {_clean_text(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def loads(text: str) -> Any:
    """json.loads that also refuses what Python's json would accept but a record must not hold."""
    return _finite_json(json.loads(text))


def read_json_object(path: str | Path, *, warn: bool = True) -> dict[str, Any] | None:
    """A JSON object file; None (with a warning) when it is not one, None silently when absent."""
    path = Path(path)
    text = read_text(path, warn=warn)
    if text is None:
        return None
    try:
        data = loads(text)
    except (ValueError, RecursionError) as exc:
        if warn:
            warn_record(f"{path}: not valid JSON ({str(exc)[:120]}); ignored")
        return None
    if not isinstance(data, dict):
        if warn:
            warn_record(f"{path}: holds a JSON {type(data).__name__}, not an object; ignored")
        return None
    return data


def read_jsonl(
    path: str | Path,
    validate: Callable[[dict[str, Any]], str | None] | None = None,
    *,
    strict: bool = False,
    warn: bool = True,
) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one a line.

    A bad line (not UTF-8, not JSON, not an object, or refused by ``validate``, which returns
    why) is skipped with one warning naming the file and line. With ``strict`` a bad line is a
    UserError instead, except a torn last line (a crash mid-write), which is always skipped.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        if strict:
            raise UserError(f"cannot read {path}: {why(exc)}") from exc
        if warn:
            warn_record(f"{path}: unreadable ({why(exc)}); skipped")
        return []
    lines = raw.split(b"\n")
    torn_last = bool(lines) and lines[-1] != b""  # no newline at the end: the last write may be torn
    rows, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = None
        try:
            row = loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except (ValueError, RecursionError):
            problem = "not valid JSON"
        else:
            if not isinstance(row, dict):
                problem = f"a JSON {type(row).__name__}, not an object"
            elif validate is not None:
                problem = validate(row)
        if problem is None:
            rows.append(row)
            continue
        if torn_last and number == len(lines) and problem == "not valid JSON":
            continue  # a crash mid-write: expected, not worth a warning
        bad.append((number, problem))
    if bad:
        first_line, first_problem = bad[0]
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        if strict:
            raise UserError(f"{path} line {first_line} is {first_problem}{more}; fix or delete that line, then retry")
        if warn:
            warn_record(f"{path} line {first_line} is {first_problem}{more}; skipped")
    return rows


def to_float(value: Any) -> float | None:
    """A metric value as a float: numbers and "nan"/"inf" strings (how metrics.jsonl writes them); else None.

    Bools and everything that is not a number (or a numeric string) are None; overflow is inf.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int too big for a float
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str) and len(value) <= 64:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def finite_float(value: Any) -> float | None:
    """`to_float`, with non-finite values as None."""
    f = to_float(value)
    return f if f is not None and math.isfinite(f) else None


def is_count(value: Any) -> bool:
    """A step or token count: a non-negative int of sane size (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP
