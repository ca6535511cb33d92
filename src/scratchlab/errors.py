"""User-facing errors.

A `UserError` is bad input the user can fix (a config key, a data path, a
checkpoint). The CLI prints its message as one line and exits with code 2; any
other exception is a bug in scratchlab and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""
