"""Every third-party module that vitscope's source imports is declared where a user gets it: in
``[project.dependencies]`` or a user-facing extra, never only in ``[dev]`` (which the test command installs, so
a module declared only there passes every other test and fails for users: scipy for attention flow did)."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_modules() -> dict[str, str]:
    """Top-level module -> the first source file importing it (absolute imports, outside vitscope and stdlib)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "src" / "vitscope").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top != "vitscope" and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_module_is_declared_for_users() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        if extra != "dev":
            declared |= {_name(r) for r in reqs}
    dists = packages_distributions()
    missing = []
    for module, where in _imported_modules().items():
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not owners:
            missing.append(f"{module} (imported in {where}) is not installed here")
        elif not owners & declared:
            missing.append(f"{module} (imported in {where}) comes from {sorted(owners)}, declared only for dev")
    assert not missing, missing


def test_the_scan_sees_the_imports_it_must() -> None:
    modules = _imported_modules()
    assert {"torch", "numpy", "PIL", "scipy", "typer"} <= modules.keys(), sorted(modules)
