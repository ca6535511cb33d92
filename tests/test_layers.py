"""Layers point one way: the import-linter contracts in pyproject.toml hold, and no import cycle exists.

Imports inside functions count (a lazy import still ties two modules together). The cycle check is
our own AST walk, so it does not depend on how import-linter models the graph.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def test_import_linter_contracts_are_kept():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


# ---------------------------------------------------------------- our own cycle check


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``src/package`` (a package is its __init__)."""
    found = {}
    for path in (src / package).rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (in functions too)."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level-1 packages
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from a import b` imports a, and a.b when b is a module
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # `a.b.func` -> the module a.b
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_cycles(src: Path, package: str) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    modules = module_files(src, package)
    graph = {name: sorted(imported_modules(name, path, modules)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, edge = work.pop()
            if edge == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if edge < len(graph[node]):
                work.append((node, edge + 1))
                nxt = graph[node][edge]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
            if work:  # hand the low-link up to the caller
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return cycles


def test_no_import_cycles_in_scratchlab():
    cycles = import_cycles(SRC, "scratchlab")
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_lazy_and_relative_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")  # lazy + relative
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "leaf.py").write_text("import os\nfrom pkg import c\n")
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    assert import_cycles(tmp_path, "pkg") == []


def test_findings_import_alone_and_preflight_on_first_use():
    """`scratchlab.doctor.findings` is a leaf at run time too: the run records import it without loading the
    checks (torch, the loss); README's `from scratchlab.doctor import preflight` still gives the function."""
    import subprocess
    import sys

    code = ("import sys, scratchlab.doctor.findings\n"
            "assert 'scratchlab.doctor.preflight' not in sys.modules and 'scratchlab.loss' not in sys.modules\n"
            "from scratchlab.doctor import preflight\n"
            "assert callable(preflight) and preflight.__module__ == 'scratchlab.doctor.preflight'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
