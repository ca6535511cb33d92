"""The declared torch floor is the version we test on: CI installs exactly it, and it is what runs here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def torch_floor() -> Version:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [Requirement(d).specifier for d in deps if Requirement(d).name == "torch"]
    [floor] = [Version(s.version) for s in spec if s.operator == ">="]
    return floor


def test_ci_installs_the_declared_torch_floor():
    pinned = re.search(r"pip install -q torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())
    assert pinned, ".ci/run must pin the torch it tests on"
    assert Version(pinned.group(1)).release[:2] == torch_floor().release[:2]


def test_the_running_torch_meets_the_floor():
    assert Version(torch.__version__.split("+")[0]) >= torch_floor()
