"""`VitscopeFigure`: the matplotlib Figure vitscope's figures are, shown inline by Jupyter without any magic.

Imported only when a figure is drawn (it imports matplotlib). vitscope builds figures without pyplot, so
IPython's matplotlib integration (registered by ``%matplotlib inline`` or by importing pyplot) never sees
them; ``_repr_png_`` is the hook IPython's display uses for any object, so the figure renders as
``image/png`` either way.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure

from vitscope.errors import VitscopeError


class VitscopeFigure(Figure):
    """A plain matplotlib ``Figure`` plus ``_repr_png_`` (at 100 dpi, within the figure pixel limit)."""

    def _repr_png_(self) -> bytes:
        check_figure_size(self, 100)
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def check_figure_size(fig: Figure, dpi: float, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` in pixels of ``fig`` at ``dpi``, refused above ``max_pixels`` (default
    `vitscope.limits.max_figure_pixels`) before anything is drawn."""
    from vitscope import limits

    w, h = fig.get_figwidth() * dpi, fig.get_figheight() * dpi
    cap = limits.max_figure_pixels(max_pixels)
    if w * h > cap or max(w, h) >= 2**16:
        raise VitscopeError(
            "dpi", f"the figure would be {w:,.0f}x{h:,.0f} = {w * h:,.0f} pixels, more than the {cap:,} pixel limit",
            "lower the dpi, or raise max_pixels (CLI --max-figure-pixels, in megapixels)",
        )
    return int(w), int(h)
