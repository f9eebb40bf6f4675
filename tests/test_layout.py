"""The import direction: utils <- l0_layers <- models <- pruning <- engine <- scripts.

Every import of a project package, read from the source (``ast``), must point
at the same package or at one further down; ``reproduction`` (the table
runner) knows runs only through their command lines and results files, so it
imports nothing but ``utils``. A test that fails names the file, the line and
the arrow that runs up.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each package and the packages it may import (itself always allowed).
LAYERS = ["utils", "l0_layers", "models", "pruning", "engine"]
ALLOWED = {name: set(LAYERS[:i]) for i, name in enumerate(LAYERS)}
ALLOWED["reproduction"] = {"utils"}
PACKAGES = set(ALLOWED)


def project_imports(path: Path):
    """``(line, package)`` for every import of a project package in ``path`` (relative imports
    resolve to the file's own package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [path.parent.name] if node.level else [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES:
                yield node.lineno, top


def upward_imports(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, target in project_imports(path):
            if target != package and target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {target}")
    return bad


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_runs_up(package):
    assert upward_imports(package) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a file in utils/ that imports engine is reported."""
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "bad.py").write_text("import os\nfrom engine.trainer import Trainer\nfrom . import errors\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert upward_imports("utils") == ["utils/bad.py:2: utils imports engine"]


def test_every_package_is_checked():
    """A new top-level package must be placed in the order before it can be imported."""
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert found - {"tests"} <= PACKAGES, f"place {sorted(found - PACKAGES - {'tests'})} in LAYERS or ALLOWED"
