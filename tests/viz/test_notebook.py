"""In Jupyter, vitscope's figures display inline as PNG without ``%matplotlib inline``; notes are warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest


def test_figures_have_a_png_repr(image_path: Path) -> None:
    from matplotlib.figure import Figure

    from vitscope.viz import map_panel

    fig = map_panel(str(image_path), {"map": np.random.default_rng(0).random((4, 5))})
    assert isinstance(fig, Figure)
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG")


def test_notebook_executed_headless_shows_a_figure_as_png(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import numpy as np\n"
        "from vitscope.viz import map_panel\n"
        "map_panel(np.zeros((16, 16, 3), np.float32), {'map': np.arange(4.0).reshape(2, 2)})"  # no %matplotlib magic
    )]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    outputs = nb.cells[0].outputs
    data = next(o["data"] for o in outputs if o.get("output_type") == "execute_result")
    assert "image/png" in data, outputs
    assert not any(o.get("output_type") == "error" for o in outputs)


def test_viewer_notes_are_warnings(tiny_vit: object, image_path: Path) -> None:
    from vitscope.errors import VitscopeWarning
    from vitscope.viewer import view

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = view(str(image_path), tiny_vit, budget_bytes=2_000)
    notes = [str(w.message) for w in caught if issubclass(w.category, VitscopeWarning)]
    assert v.notes and notes == [f"viewer: {n}" for n in v.notes]
    assert any("budget" in n for n in notes)
