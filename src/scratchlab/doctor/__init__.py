"""The doctor: checks before step 0 (preflight), monitors while training, diagnosis of a run dir.

Every result is a `Finding` with a stable code documented in docs/findings.md. Importing the package
loads only the findings and their catalog (a leaf: the run records import them); ``preflight``, which
needs torch and the loss, is loaded on first use.
"""

from typing import Any

import scratchlab.doctor.catalog  # noqa: F401  (registers the codes)
from scratchlab.doctor.findings import (
    CATALOG,
    Finding,
    make_finding,
    read_findings,
    sort_findings,
    write_findings,
)

__all__ = ["CATALOG", "Finding", "make_finding", "preflight", "read_findings", "sort_findings", "write_findings"]


def __getattr__(name: str) -> Any:
    if name == "preflight":  # PEP 562: the checks load only when asked for
        from scratchlab.doctor.preflight import preflight

        globals()["preflight"] = preflight  # importing the submodule bound its name here: the function wins
        return preflight
    raise AttributeError(f"module 'scratchlab.doctor' has no attribute {name!r}")
