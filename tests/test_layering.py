"""The package reads top to bottom: each module imports only its own layer or lower ones, and no import cycles.

Layers, lowest first (STYLE.md: adapters -> capture -> Attentions -> methods -> viz/viewer; train produces models
the adapters load; cli only calls library functions). Every import counts, also one inside a function: a lazy
upward import is still an upward dependency.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitscope"

#: Layer of each top-level module or subpackage of vitscope (lowest first).
LAYERS: list[set[str]] = [
    {"errors", "_io", "_ops", "layout", "limits", "_hooks", "_version", "_interrupt"},
    {"models"},
    {"images", "video"},
    {"adapters"},
    {"attentions"},
    {"capture"},
    {"methods"},
    {"viz"},
    {"train"},
    {"viewer"},
    {"batch", "demo"},
    {"evaluate"},
    {"cli", "_console", "__main__", "__init__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out["vitscope." + ".".join(parts) if parts != ["__init__"] else "vitscope"] = path
    return out


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every vitscope module ``module`` imports (absolute and relative, module level or in functions);
    ``from pkg import sub`` names the submodule ``pkg.sub`` when it is one."""
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vitscope"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "vitscope":
                subs = {f"{base}.{a.name}" for a in node.names} & known
                found |= subs if len(subs) == len(node.names) else subs | {base}
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _imports(p, m, set(mods)) if i != m} for m, p in mods.items()}


def test_every_module_has_a_layer() -> None:
    missing = sorted({_unit(m) for m in _modules()} - set(RANK))
    assert not missing, f"give these a layer in LAYERS: {missing}"


def test_no_upward_imports() -> None:
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if RANK[_unit(dep)] > RANK[_unit(mod)]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    graph = _graph()
    mods = set(graph)

    def resolve(name: str) -> str:
        while name not in mods and "." in name:  # `from vitscope.x import y` names module x (y is an attribute)
            name = name.rsplit(".", 1)[0]
        return name

    edges = {m: {resolve(d) for d in deps} - {m} for m, deps in graph.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if seen.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d):], d]))
            elif d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(edges):
        if m not in seen:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("layer", sorted(RANK))
def test_each_layer_imports_on_its_own(layer: str) -> None:
    name = "vitscope" if layer == "__init__" else f"vitscope.{layer}"
    if layer == "__main__":  # importing it runs the CLI (python -m vitscope): the test_cli tests run it
        pytest.skip("vitscope.__main__ runs the CLI when imported; its imports are checked by the layering test")
    if not any(m == name or m.startswith(name + ".") for m in _modules()):
        pytest.skip(f"{name} is not a module here")
    code = f"import importlib; importlib.import_module({name!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_capture_core_imports_as_a_module() -> None:
    import vitscope.capture.core as core  # the `capture` function no longer hides the subpackage

    assert core.capture_full is importlib.import_module("vitscope.capture.core").capture_full
