"""Matplotlib figures of attention maps (matplotlib is imported only when a figure is drawn).

Every function returns a ``matplotlib.figure.Figure`` on an Agg canvas (a subclass with ``_repr_png_``,
so Jupyter shows it inline without ``%matplotlib inline``); write it with `save_figure`
(``.png``/``.svg``/``.pdf``, atomically). See `vitscope.viz.figures` for the details of each.
"""

from __future__ import annotations

from vitscope.viz._render import display_image, image_array, normalise, threshold_mask, upsample
from vitscope.viz.figures import (
    batch_maps,
    distance_plot,
    head_grid,
    layer_head_grid,
    map_panel,
    norm_histogram,
    outlier_threshold,
    overlay,
    render_array,
    save_figure,
)

__all__ = [
    "batch_maps",
    "display_image",
    "distance_plot",
    "head_grid",
    "image_array",
    "layer_head_grid",
    "map_panel",
    "norm_histogram",
    "normalise",
    "outlier_threshold",
    "overlay",
    "render_array",
    "save_figure",
    "threshold_mask",
    "upsample",
]
