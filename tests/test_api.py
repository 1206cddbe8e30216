"""The public API is exactly `vitscope.__all__` (httpx's rule), and every name in it is importable."""

from __future__ import annotations

import vitscope


def test_all_is_exactly_the_public_names() -> None:
    public = {n for n in dir(vitscope) if not n.startswith("_")}
    # submodules imported as a side effect are not API
    import types

    public = {n for n in public if not isinstance(getattr(vitscope, n), types.ModuleType)}
    assert public == set(vitscope.__all__) - {"__version__"}


def test_every_exported_name_resolves() -> None:
    for name in vitscope.__all__:
        assert getattr(vitscope, name) is not None


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, vitscope; heavy = [m for m in ('matplotlib', 'transformers', 'timm', 'scipy') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing vitscope pulled in heavy modules: {out}"
