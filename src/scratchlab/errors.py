"""User-facing errors.

A `UserError` is bad input the user can fix (a config key, a data path, a
checkpoint). The CLI prints its message as one line and exits with code 2; any
other exception is a bug in scratchlab and keeps its traceback.
"""

from __future__ import annotations

import reprlib

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


MAX_QUOTE = 200  # characters of a user's value echoed in a message


def shorten(value: object, limit: int = MAX_QUOTE) -> str:
    """repr(value) cut to ``limit`` characters (saying how long a string was): an error never echoes a huge value.

    Containers go through reprlib, so a deeply shared structure is never expanded in full.
    """
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value):,} characters)"
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 8, 8, 60, 60
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
