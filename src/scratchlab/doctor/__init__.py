"""The doctor: checks before step 0 (preflight), monitors while training, diagnosis of a run dir.

Every result is a `Finding` with a stable code documented in docs/findings.md.
"""

import scratchlab.doctor.catalog  # noqa: F401  (registers the codes)
from scratchlab.doctor.findings import (
    CATALOG,
    Finding,
    make_finding,
    read_findings,
    sort_findings,
    write_findings,
)
from scratchlab.doctor.preflight import preflight

__all__ = ["CATALOG", "Finding", "make_finding", "preflight", "read_findings", "sort_findings", "write_findings"]
