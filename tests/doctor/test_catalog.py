"""The catalog is the source of truth: docs/findings.md is generated from it and every code the
monitors and the diagnosis emit is catalogued (make_finding raises KeyError otherwise, but only
when the condition fires: this catches it without having to trigger each one)."""

from __future__ import annotations

import ast
from pathlib import Path

from scratchlab.doctor import CATALOG
from scratchlab.doctor.catalog import catalog_markdown

ROOT = Path(__file__).resolve().parents[2]
DOCTOR = ROOT / "src" / "scratchlab" / "doctor"
FAMILIES = ROOT / "src" / "scratchlab" / "families"


def finding_codes(path: Path) -> set[str]:
    """First arguments of the make_finding(...) calls in a module (string literals)."""
    codes = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "make_finding":
            first = node.args[0]
            assert isinstance(first, ast.Constant), f"{path.name}:{node.lineno}: a code must be a literal"
            codes.add(first.value)
    return codes


def test_docs_match_the_catalog():
    # Regenerate: python -c "from scratchlab.doctor.catalog import catalog_markdown as m; print(m(), end='')" \
    #   > docs/findings.md   (`python -m scratchlab.doctor.catalog` registers the codes twice and fails)
    assert (ROOT / "docs" / "findings.md").read_text(encoding="utf-8") == catalog_markdown()


def test_monitor_codes_are_catalogued():
    family_units = [*FAMILIES.glob("*/monitors.py")]  # a family's own monitors (the cascade's signal checks)
    assert family_units
    codes = finding_codes(DOCTOR / "monitors.py") | finding_codes(DOCTOR / "diagnose.py")
    codes |= set().union(*(finding_codes(path) for path in family_units))
    assert codes == {"clip_saturated", "loss_spike", "loss_flat", "overfitting", "nonfinite", "run_crashed", "run_killed",
                     "update_ratio", "entropy_collapse", "logit_growth", "moe_imbalance",
                     "grad_explosion", "output_rms_off", "output_constant", "output_copies_input"}
    assert codes <= set(CATALOG)


def test_family_preflight_codes_are_catalogued():
    codes = set().union(*(finding_codes(path) for path in FAMILIES.glob("*/checks.py")))
    assert codes == {"grad_outlier"}  # the cascade's scalar-outlier check
    assert codes <= set(CATALOG)
