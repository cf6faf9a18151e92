"""The packages' layering, read from the import statements of every module under src/.

From the bottom up: cachenode (the cache node and its client), imagecache (the
gateway; it uses the node's client), manager (it runs on the gateway's stores
and protocol), launcher (the ``imagecache`` command, which composes them all).
A package imports only those below it, lazy imports inside functions too: so
a node starts without the web stack, and the gateway without the manager.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
# Each package and the packages of ours it must never import.
FORBIDDEN = {
    "cachenode": {"imagecache", "manager", "launcher"},
    "imagecache": {"manager", "launcher"},
    "manager": {"launcher"},
    "launcher": set[str](),
}
MAX_MODULE_LINES = 450


def modules() -> list[Path]:
    return sorted(path for path in SRC.rglob("*.py") if "egg-info" not in str(path))


def imported_packages(path: Path) -> set[str]:
    """The top-level packages ``path`` imports anywhere in its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


def test_the_packages_are_the_ones_layered_here() -> None:
    packages = {path.parent.name for path in SRC.glob("*/__init__.py")}
    assert packages == set(FORBIDDEN)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package: str) -> None:
    wrong = {
        str(path.relative_to(SRC)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in modules()
        if path.relative_to(SRC).parts[0] == package
    }
    assert {module: names for module, names in wrong.items() if names} == {}


def test_the_gateway_package_has_no_main_module() -> None:
    """``python -m imagecache`` is gone: the command is the launcher's."""
    assert not (SRC / "imagecache" / "__main__.py").exists()
    assert (SRC / "launcher" / "__main__.py").exists()


def test_no_module_is_over_450_lines_ISSUE_13_SIZE_GOAL() -> None:
    """The house's size goal (issue 13); other helpers' splits finish it."""
    long_ones = {
        str(path.relative_to(SRC)): lines
        for path in modules()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long_ones == {}
