"""The bench modules import one another without a cycle, and each imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import secondorder.bench

BENCH = Path(secondorder.bench.__file__).parent
MODULES = sorted(path.stem for path in BENCH.glob("*.py"))
REPO = Path(__file__).resolve().parents[2]


def _bench_imports(module: str) -> set[str]:
    """The bench modules that ``module`` imports anywhere in its source (inside functions
    too: a deferred import still closes a cycle); ``__init__`` for the package itself."""
    tree = ast.parse((BENCH / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import name: a submodule, or a name of the package
                found.update(a.name if a.name in MODULES else "__init__" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[:2] == ["secondorder", "bench"]:
                found.add(parts[2] if len(parts) > 2 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["secondorder", "bench"]:
                    found.add(parts[2] if len(parts) > 2 else "__init__")
    return found - {module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as the modules along it), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            found = visit(dep, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node, [])
        if found:
            return found
    return None


def test_plots_and_report_do_not_import_each_other_circularly():
    assert "report" not in _bench_imports("plots")
    assert _bench_imports("smoothing") == set()


def test_the_bench_modules_have_no_import_cycle():
    graph = {module: _bench_imports(module) for module in MODULES}
    assert _cycle(graph) is None


@pytest.mark.parametrize("module", ["plots", "report", "smoothing"])
def test_a_bench_module_imports_alone_in_a_fresh_interpreter(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import secondorder.bench.{module}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
