"""`VitscopeFigure`: the matplotlib Figure vitscope's figures are, shown inline by Jupyter without any magic.

Imported only when a figure is drawn (it imports matplotlib). vitscope builds figures without pyplot, so
IPython's matplotlib integration (registered by ``%matplotlib inline`` or by importing pyplot) never sees
them; ``_repr_png_`` is the hook IPython's display uses for any object, so the figure renders as
``image/png`` either way.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure

from vitscope.viz._render import check_figure_size


class VitscopeFigure(Figure):
    """A plain matplotlib ``Figure`` plus ``_repr_png_`` (at 100 dpi, within the figure pixel limit)."""

    def _repr_png_(self) -> bytes:
        check_figure_size(self, 100)
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
