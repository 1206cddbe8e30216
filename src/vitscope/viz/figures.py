"""Publication figures: each function takes already computed maps (or an `Attentions`) and returns a
matplotlib ``Figure`` drawn on the Agg canvas (no pyplot state, nothing shown, safe in scripts and servers).

Images keep their aspect ratio: every panel is drawn with ``extent=(0, W, H, 0)`` and ``aspect="equal"``, and
the ``(rows, cols)`` maps are upsampled to the image's ``(H, W)`` first. matplotlib is imported lazily.

Example:
    >>> import vitscope
    >>> from vitscope import viz
    >>> attn = vitscope.capture("vitscope:shapes", "cat.png")                 # doctest: +SKIP
    >>> fig = viz.head_grid("cat.png", attn, layer=-1, mask_tau=0.6)          # doctest: +SKIP
    >>> viz.save_figure(fig, "heads.png")                                      # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitscope.errors import VitscopeError
from vitscope.methods.artifacts import outlier_threshold
from vitscope.viz._render import (
    Upsample,
    absolute_layer,
    as_map,
    check_figure_size,
    display_image,
    head_maps,
    image_array,
    normalise,
    threshold_mask,
    upsample,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from vitscope.attentions import Attentions

FORMATS = ("png", "svg", "pdf")
MASK_COLOUR = "#00e5ff"

#: A map is *near uniform* when its largest value is less than this many times its smallest. A min-max
#: colour scale stretches such a map over the whole colormap, so noise would look like structure; every
#: panel that draws one says so ("near uniform: max/min 1.05"). Random-weight ViTs give about 1.05; the
#: bundled model's trained maps 7 and more.
NEAR_UNIFORM_RATIO = 1.5
#: The ``gid`` of that note's text artist (tests and callers can find it with ``ax.texts``).
NEAR_UNIFORM_GID = "vitscope-near-uniform"
#: The ``gid`` of head_grid's per-panel "max" note (shared scale only).
HEAD_MAX_GID = "vitscope-head-max"
#: With ``fade``, a map is drawn at ``alpha * FADE_FLOOR`` opacity at the bottom of its colour scale,
#: rising linearly to ``alpha`` at the top: the photo stays visible where attention is low.
FADE_FLOOR = 0.3


def max_min_ratio(amap: Any) -> float:
    """``max / min`` of a map: ``1`` for a constant map, ``inf`` when the minimum is ``<= 0`` (not a ratio)."""
    a = np.asarray(amap, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi == lo:
        return 1.0
    return hi / lo if lo > 0.0 else math.inf


def near_uniform_note(ax: Axes, amap: Any, fontsize: float = 7.0) -> Any:
    """Write ``"near uniform: max/min R"`` in the lower-left corner of ``ax`` when ``amap``'s max/min ratio
    ``R`` is below `NEAR_UNIFORM_RATIO`. Returns the text artist, or ``None`` for a map with structure."""
    ratio = max_min_ratio(amap)
    if not ratio < NEAR_UNIFORM_RATIO:
        return None
    return ax.text(
        0.03, 0.03, f"near uniform: max/min {ratio:.2f}", transform=ax.transAxes, ha="left", va="bottom",
        fontsize=fontsize, color="black", gid=NEAR_UNIFORM_GID, zorder=5,
        bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
    )


def _figure(width: float, height: float) -> Figure:
    """A `VitscopeFigure` on its own Agg canvas (no pyplot: nothing global, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from vitscope.viz._figure import VitscopeFigure

    fig = VitscopeFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def check_dpi(dpi: Any, argument: str = "dpi") -> int:
    """A dpi in ``[1, vitscope.limits.MAX_DPI]``."""
    from vitscope import limits

    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 1 <= dpi <= limits.MAX_DPI:
        raise VitscopeError(argument, f"{dpi!r} is not a dpi in [1, {limits.MAX_DPI}]", "pass e.g. 150 (300 for print)")
    return int(dpi)


def _check_cmap(cmap: str) -> None:
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise VitscopeError("cmap", f"unknown colormap {cmap!r}", "use a matplotlib name, e.g. 'inferno', 'viridis'")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise VitscopeError("alpha", f"{alpha} is outside [0, 1]", "use e.g. 0.6")


def _show_image(ax: Axes, img: np.ndarray) -> None:
    H, W = img.shape[:2]
    ax.imshow(img, extent=(0, W, H, 0), interpolation="antialiased")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_aspect("equal")
    ax.set_axis_off()


def overlay(
    ax: Axes,
    img: np.ndarray,
    amap: np.ndarray | None,
    *,
    cmap: str = "inferno",
    alpha: float = 0.6,
    vmin: float | None = None,
    vmax: float | None = None,
    mask: np.ndarray | None = None,
    mode: Upsample = "bilinear",
    fade: bool = False,
    note_uniform: bool = True,
    note_size: float = 7.0,
) -> Any:
    """Draw ``img`` ``(H, W, 3)`` and, over it, ``amap`` ``(rows, cols)`` upsampled to ``(H, W)``.

    ``mask`` ``(rows, cols)`` bool adds its outline (patch edges) as a contour. ``fade`` makes the map's
    opacity follow its value (``alpha * FADE_FLOOR`` at ``vmin`` up to ``alpha`` at ``vmax``) so low attention
    does not darken the photo. ``note_uniform`` writes `near_uniform_note` on a near-uniform map. Returns the
    map's image artist (for a colorbar), or ``None`` without a map.
    """
    _show_image(ax, img)
    if amap is None:
        return None
    H, W = img.shape[:2]
    up = upsample(amap, (H, W), mode)  # (H, W)
    opacity: Any = alpha
    if fade:
        lo = float(up.min()) if vmin is None else vmin
        hi = float(up.max()) if vmax is None else vmax
        level = np.clip((up - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(up)
        opacity = alpha * (FADE_FLOOR + (1.0 - FADE_FLOOR) * level)  # (H, W)
    artist = ax.imshow(
        up, cmap=cmap, alpha=opacity, vmin=vmin, vmax=vmax, extent=(0, W, H, 0), interpolation="nearest"
    )
    if note_uniform:
        near_uniform_note(ax, amap, note_size)
    if mask is not None:
        m = upsample(np.asarray(mask, dtype=np.float32), (H, W), "nearest")  # (H, W) in {0, 1}
        if 0.0 < m.mean() < 1.0:
            ys, xs = np.arange(H) + 0.5, np.arange(W) + 0.5  # pixel centres
            ax.contour(xs, ys, m, levels=[0.5], colors=MASK_COLOUR, linewidths=1.5)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    return artist


def _grid_shape(n: int, ncols: int | None) -> tuple[int, int]:
    cols = ncols or min(n, max(1, math.ceil(math.sqrt(n))))
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


#: Panels keep the image's aspect up to this ratio (a 5x5000 strip would give a figure kilometres tall).
MAX_PANEL_ASPECT = 4.0


def _panel_size(img: np.ndarray, panel: float) -> tuple[float, float]:
    H, W = img.shape[:2]
    aspect = min(max(H / W, 1 / MAX_PANEL_ASPECT), MAX_PANEL_ASPECT)
    return panel, panel * aspect


def _masks_for(maps: np.ndarray, masks: Any, mask_tau: float | None) -> np.ndarray | None:
    """``(M, rows, cols)`` masks from explicit arrays (broadcast) or DINO's threshold on the maps."""
    if masks is not None and mask_tau is not None:
        raise VitscopeError("masks", "both masks and mask_tau given", "pass one of them")
    if mask_tau is not None:
        return threshold_mask(maps, mask_tau)
    if masks is None:
        return None
    m = np.asarray(masks.detach().cpu().numpy() if hasattr(masks, "detach") else masks).astype(bool)
    try:
        return np.broadcast_to(m, maps.shape)
    except ValueError:
        raise VitscopeError(
            "masks", f"shape {m.shape} does not match the maps {maps.shape}", "pass (rows, cols) or one per map"
        ) from None


def head_grid(
    image: Any,
    maps: Attentions | Any,
    *,
    layer: int = -1,
    query: int | str | tuple[int, int] | None = None,
    batch: int = 0,
    heads: Sequence[int] | None = None,
    shared_scale: bool = True,
    cmap: str = "inferno",
    alpha: float = 0.6,
    masks: Any = None,
    mask_tau: float | None = None,
    ncols: int | None = None,
    mode: Upsample = "bilinear",
    panel: float = 2.4,
    colorbar: bool = True,
    policy: str | None = None,
    fade: bool = True,
    mask_label: str | None = None,
) -> Figure:
    """One panel per head: the attention map of one query over the image, titled ``"layer l, head h"``.

    Colour scale: shared by default (``shared_scale=True``; CLI ``vitscope figure heads`` likewise, with
    ``--per-head-scale`` to switch), because then colours compare across heads: a head that looks faint
    really attends weakly or diffusely, and the colorbar gives its values. ``shared_scale=False`` stretches
    each head over its own min-max (DINO's presentation: where each head looks, however weak), and the
    colorbar then reads "head min" to "head max". On the shared scale each panel gives its head's maximum
    (a faint panel is a weak head, not an empty one). Either way a near-uniform head is marked on its panel
    (`near_uniform_note`). The map fades out where attention is low (``fade``), so the photo is not darkened.

    Args:
        image: what the model saw (path, PIL image, array); it keeps its own aspect ratio.
        maps: an `Attentions` (then ``layer``, ``query``, ``batch`` pick the row) or an array
            ``(heads, rows, cols)`` (then ``layer`` only labels the titles).
        heads: which heads to show (positions along the maps' head dim); default all.
        shared_scale: one colour scale for all heads (comparable) or each head's own min-max.
        masks: ``(rows, cols)`` or ``(heads, rows, cols)`` bools drawn as contours, or ``mask_tau`` to
            contour DINO's mask (the top patches holding ``tau`` of each head's attention). Outlines get a
            legend entry: ``mask_label``, or for ``mask_tau`` one that gives tau.
        mode: ``"bilinear"`` (smooth) or ``"nearest"`` (patch blocks) upsampling.
        policy: the size policy the model used; ``"crop"`` crops the image to the part the grid covers.
        fade: the map's opacity follows its value (see `overlay`); ``False`` draws it at ``alpha`` everywhere.
    """
    _check_cmap(cmap)
    _check_alpha(alpha)
    if _is_attentions(maps):
        values, labels = head_maps(maps, layer, query, batch)
        layer_label = absolute_layer(maps, layer)
        img = display_image(image, maps, policy)
    else:
        values = as_map(maps)
        if values.ndim == 2:
            values = values[None]
        if values.ndim != 3:
            raise VitscopeError("maps", f"expected (heads, rows, cols), got shape {values.shape}", "pass one map per head")
        labels = list(range(values.shape[0]))
        layer_label = layer
        img = image_array(image)
    if heads is not None:
        sel = [int(h) for h in heads]
        for h in sel:
            if not 0 <= h < values.shape[0]:
                raise VitscopeError("heads", f"head {h} out of range for {values.shape[0]} heads", "pick valid heads")
        values, labels = values[sel], [labels[h] for h in sel]
    mask_arr = _masks_for(values, masks, mask_tau)
    n = values.shape[0]
    nrows, cols = _grid_shape(n, ncols)
    pw, ph = _panel_size(img, panel)
    legend = mask_arr is not None
    fig = _figure(pw * cols + (0.9 if colorbar else 0.0), ph * nrows + 0.3 * nrows + (0.35 if legend else 0.0))
    axes = fig.subplots(nrows, cols, squeeze=False)
    vmin, vmax = (float(values.min()), float(values.max())) if shared_scale else (None, None)
    artist = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        artist = overlay(
            ax, img, values[i], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
            mask=None if mask_arr is None else mask_arr[i], mode=mode, fade=fade,
        )
        ax.set_title(f"layer {layer_label}, head {labels[i]}", fontsize=9)
        if shared_scale and n > 1:  # a faint panel on the shared scale: say it is a weak head, not an empty one
            ax.text(0.97, 0.03, f"max {float(values[i].max()):.2g}", transform=ax.transAxes, ha="right", va="bottom",
                    fontsize=7, gid=HEAD_MAX_GID, zorder=5,
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    if colorbar and artist is not None:
        _scale_bar(fig, axes, cmap, None if shared_scale else "head", "attention weight")
    if legend:
        if mask_label is None:
            mask_label = ("mask" if mask_tau is None else
                          f"DINO mask: fewest patches holding {mask_tau:.0%} of the head's attention (\u03c4 = {mask_tau:g})")
        from matplotlib.lines import Line2D

        fig.legend(handles=[Line2D([], [], color=MASK_COLOUR, linewidth=1.5, label=mask_label)],
                   loc="outside lower center", fontsize=8, frameon=False)
    return fig


def _scale_bar(fig: Figure, axes: Any, cmap: str, own: str | None, label: str, **kw: Any) -> Any:
    """One colorbar for ``axes``: the shared scale (then the image artists' own norm), or, with ``own``
    (e.g. ``"head"``), a 0-1 bar reading "<own> min" to "<own> max" (each panel min-max scaled)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    flat = list(np.ravel(axes))
    if own is None:
        artist = next(im for ax in flat for im in ax.get_images()[1:])  # [0] is the photo
        mappable: Any = ScalarMappable(norm=artist.norm, cmap=cmap)
        text = f"{label} (one scale for all)"
    else:
        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        text = f"{label}, each {own}'s own scale"
    bar = fig.colorbar(mappable, ax=flat, shrink=kw.pop("shrink", 0.8), label=text, panchor=False, **kw)
    if own is not None:
        bar.set_ticks([0.0, 1.0], labels=[f"{own} min", f"{own} max"])
    return bar


def _is_attentions(x: object) -> bool:
    from vitscope.attentions import Attentions

    return isinstance(x, Attentions)


def map_panel(
    image: Any,
    maps: Mapping[str, Any],
    *,
    cmap: str = "inferno",
    alpha: float = 0.6,
    mode: Upsample = "bilinear",
    panel: float = 3.0,
    show_image: bool = True,
    colorbar: bool = True,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """A row: the image, then one overlay per named map, e.g. ``{"head mean": m1, "rollout": m2}``.

    Each map ``(rows, cols)`` has its own colour scale (methods differ in range), with its own colorbar,
    labelled ``labels[name]`` (default: the map's name). A near-uniform map is marked on its panel.
    """
    _check_cmap(cmap)
    _check_alpha(alpha)
    if not maps:
        raise VitscopeError("maps", "no maps given", "pass e.g. {'head mean': cls_map, 'rollout': rollout_map}")
    img = image_array(image)
    items = [(str(k), as_map(v, f"maps[{k!r}]")) for k, v in maps.items()]
    for name, m in items:
        if m.ndim != 2:
            raise VitscopeError(f"maps[{name!r}]", f"expected (rows, cols), got shape {m.shape}", "pass one 2-D map")
    n = len(items) + int(show_image)
    pw, ph = _panel_size(img, panel)
    # each colorbar (bar, ticks, label) takes ~0.95 in of width: counted, so the panels keep their height
    fig = _figure(pw * n + 0.95 * len(items) * int(colorbar), ph + 0.35)
    axes = fig.subplots(1, n, squeeze=False)[0]
    k = 0
    if show_image:
        _show_image(axes[0], img)
        axes[0].set_title("image", fontsize=10)
        k = 1
    for ax, (name, m) in zip(axes[k:], items, strict=True):
        artist = overlay(ax, img, m, cmap=cmap, alpha=alpha, mode=mode)
        ax.set_title(name, fontsize=10)
        if colorbar:
            from matplotlib.cm import ScalarMappable

            bar = fig.colorbar(ScalarMappable(norm=artist.norm, cmap=cmap), ax=ax, shrink=0.9, pad=0.02)  # opaque
            bar.set_label((labels or {}).get(name, name), fontsize=9)
            bar.ax.tick_params(labelsize=8)
    return fig


def layer_head_grid(
    image: Any,
    maps: Attentions | Any,
    *,
    query: int | str | tuple[int, int] | None = None,
    batch: int = 0,
    layers: Sequence[int] | None = None,
    cmap: str = "inferno",
    alpha: float = 0.6,
    mode: Upsample = "bilinear",
    shared_scale: bool = False,
    panel: float = 1.6,
    policy: str | None = None,
    colorbar: bool = True,
) -> Figure:
    """Rows = layers, columns = heads: one query's attention over the image in every captured head.

    ``maps`` is an `Attentions` (``layers`` picks captured layers, default all) or an array
    ``(layers, heads, rows, cols)`` with ``layers`` labelling its rows. Each panel has its own min-max
    scale unless ``shared_scale``; the colorbar gives the shared scale's values, or reads "panel min" to
    "panel max". Near-uniform panels are marked.
    """
    _check_cmap(cmap)
    _check_alpha(alpha)
    if _is_attentions(maps):
        chosen = list(layers) if layers is not None else list(maps.layers)
        stacked = [head_maps(maps, li, query, batch)[0] for li in chosen]
        values = np.stack(stacked)  # (layers, heads, rows, cols)
        layer_labels = [absolute_layer(maps, li) for li in chosen]
        head_labels: list[Any] = ["mean"] if maps.heads == "mean" else list(maps.heads)
        img = display_image(image, maps, policy)
    else:
        values = as_map(maps)
        if values.ndim != 4:
            raise VitscopeError("maps", f"expected (layers, heads, rows, cols), got {values.shape}", "stack per layer")
        layer_labels = list(layers) if layers is not None else list(range(values.shape[0]))
        if len(layer_labels) != values.shape[0]:
            raise VitscopeError("layers", f"{len(layer_labels)} labels for {values.shape[0]} layers", "one per row")
        head_labels = list(range(values.shape[1]))
        img = image_array(image)
    L, Hh = values.shape[:2]
    pw, ph = _panel_size(img, panel)
    fig = _figure(pw * Hh + 0.5 + (0.9 if colorbar else 0.0), ph * L + 0.4)
    axes = fig.subplots(L, Hh, squeeze=False)
    vmin, vmax = (float(values.min()), float(values.max())) if shared_scale else (None, None)
    for i in range(L):
        for j in range(Hh):
            ax = axes[i, j]
            overlay(ax, img, values[i, j], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, mode=mode, note_size=6.0)
            if i == 0:
                ax.set_title(f"head {head_labels[j]}", fontsize=8)
            if j == 0:
                ax.text(-0.06, 0.5, f"layer {layer_labels[i]}", transform=ax.transAxes, rotation=90,
                        ha="right", va="center", fontsize=8)
    if colorbar:
        _scale_bar(fig, axes, cmap, None if shared_scale else "panel", "attention weight", shrink=0.6)
    return fig


def batch_maps(
    images: Sequence[Any],
    maps: Any,
    *,
    titles: Sequence[str] | None = None,
    view: str = "masked",
    cmap: str = "inferno",
    alpha: float = 0.6,
    mode: Upsample = "bilinear",
    ncols: int = 4,
    panel: float = 2.0,
    map_name: str = "map",
    colorbar: bool = True,
) -> Figure:
    """A batch of images next to their maps ``(B, rows, cols)`` (or a list of ``(rows_b, cols_b)`` maps, each
    image on its own grid): for each image, the image, then either
    ``view="masked"`` (seed 004's view: ``image * normalise(map)``, the map min-max scaled to [0, 1] and
    upsampled) or ``view="overlay"`` (colormap over the image).

    Each image is titled (``titles``, default ``"image b"``); what the second panel of every pair shows is
    said once, in the figure's title (``map_name`` names the map, e.g. ``"rollout"``), and one colorbar gives
    the scale (per image min-max, 0 to 1). Rows are as tall as their tallest image and every image hangs
    from the top of its row, so titles line up. Near-uniform maps (stretched by the min-max) are marked.
    """
    if view not in ("masked", "overlay"):
        raise VitscopeError("view", f"unknown view {view!r}", "use 'masked' or 'overlay'")
    _check_cmap(cmap)
    _check_alpha(alpha)
    values: Any
    if isinstance(maps, (list, tuple)) and len({np.shape(m) for m in maps}) > 1:
        values = [as_map(m) for m in maps]  # each image's map on its own grid (native aspect ratios)
        if any(v.ndim != 2 for v in values) or len(values) != len(images):
            raise VitscopeError("maps", f"{len(values)} maps of shapes {[v.shape for v in values]} for "
                                f"{len(images)} images", "pass one (rows, cols) map per image")
    else:
        values = as_map(maps)
        if values.ndim == 2:
            values = values[None]
        if values.ndim != 3 or values.shape[0] != len(images):
            raise VitscopeError(
                "maps", f"shape {values.shape} for {len(images)} images", "pass one (rows, cols) map per image"
            )
    if titles is not None and len(titles) != len(images):
        raise VitscopeError("titles", f"{len(titles)} titles for {len(images)} images", "one title per image")
    imgs = [image_array(im, f"images[{i}]") for i, im in enumerate(images)]
    B = len(imgs)
    pairs = max(1, min(ncols, B))
    nrows = math.ceil(B / pairs)
    ratios = [max(min(max(im.shape[0] / im.shape[1], 1 / MAX_PANEL_ASPECT), MAX_PANEL_ASPECT)
                  for im in imgs[r * pairs : (r + 1) * pairs]) for r in range(nrows)]
    fig = _figure(panel * 2 * pairs + (0.9 if colorbar else 0.0), panel * sum(ratios) + 0.3 * nrows + 0.4)
    axes = fig.subplots(nrows, 2 * pairs, squeeze=False, gridspec_kw={"height_ratios": ratios})
    for ax in axes.flat:
        ax.set_axis_off()
        ax.set_anchor("N")  # hang from the row's top: titles and image tops align across a row
    for b, img in enumerate(imgs):
        r, c = divmod(b, pairs)
        a_img, a_map = axes[r, 2 * c], axes[r, 2 * c + 1]
        _show_image(a_img, img)
        a_img.set_title(titles[b] if titles is not None else f"image {b}", fontsize=9)
        if view == "masked":
            H, W = img.shape[:2]
            weight = upsample(normalise(values[b]), (H, W), mode)[..., None]  # (H, W, 1) in [0, 1]
            _show_image(a_map, np.clip(img * weight, 0.0, 1.0))
            near_uniform_note(a_map, values[b])
        else:
            overlay(a_map, img, values[b], cmap=cmap, alpha=alpha, mode=mode)
        a_map.set_anchor("N")
    if view == "masked":
        fig.suptitle(f"each image, then the image times its {map_name} (min-max scaled per image)", fontsize=10)
    else:
        fig.suptitle(f"each image, then its {map_name} over it (min-max scaled per image)", fontsize=10)
    if colorbar:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap="gray" if view == "masked" else cmap)
        label = "map scaled: min 0, max 1" if view == "masked" else "map, per image"
        shrink = min(0.9, 2.5 / max(1.0, sum(ratios)))
        bar = fig.colorbar(mappable, ax=list(axes.flat), shrink=shrink, panchor=False, fraction=0.02, pad=0.01)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=8)
        if view != "masked":
            bar.set_ticks([0.0, 1.0], labels=["image min", "image max"])
    return fig


def distance_plot(
    distances: Any,
    *,
    std: Any = None,
    layers: Sequence[int] | None = None,
    jitter: float = 0.25,
    title: str = "mean attention distance",
    unit: str = "pixels",
    spread: str | None = None,
) -> Figure:
    """Mean attention distance per head across layers (ViT paper, Dosovitskiy et al. 2021, Fig. 7).

    ``distances`` is ``(images, layers, heads)`` (then the dot is the mean over images and the error bar
    the standard deviation over images) or ``(layers, heads)`` with an optional ``std`` of the same shape.
    x = layer (heads spread by a small fixed offset so they don't overlap), y = distance in ``unit`` (e.g.
    ``"pixels of the 32x32 input"``: distances are measured on the model's input, not on the original
    photo); one colour per head. The legend says what dot and bar are (``spread`` overrides the bar's
    description, e.g. ``"+-1 std over 5,000 images"``).
    """
    d = as_map(distances, "distances")
    if d.ndim == 3:
        if std is not None:
            raise VitscopeError("std", "given with per-image distances", "pass (layers, heads) means with std")
        mean, bars = d.mean(axis=0), d.std(axis=0)
        n_img = d.shape[0]
        dot_text = f"dot: mean over {n_img} image{'s' if n_img != 1 else ''}"
        bar_text = spread or f"bar: \u00b11 std over {n_img} image{'s' if n_img != 1 else ''}"
    elif d.ndim == 2:
        mean = d
        bars = None if std is None else as_map(std, "std")
        if bars is not None and bars.shape != mean.shape:
            raise VitscopeError("std", f"shape {bars.shape} != distances {mean.shape}", "same shape")
        dot_text, bar_text = "dot: mean", spread or "bar: \u00b11 std"
    else:
        raise VitscopeError("distances", f"shape {d.shape}", "pass (layers, heads) or (images, layers, heads)")
    L, Hh = mean.shape
    xs = np.asarray(list(layers) if layers is not None else range(L), dtype=np.float64)
    if xs.shape[0] != L:
        raise VitscopeError("layers", f"{xs.shape[0]} labels for {L} layers", "one label per layer")
    fig = _figure(1.2 + 0.55 * L + 2.2, 3.6)
    ax = fig.subplots()
    import matplotlib

    colours = matplotlib.colormaps["tab10" if Hh <= 10 else "tab20"]
    offsets = np.linspace(-jitter, jitter, Hh) if Hh > 1 else np.zeros(1)
    for h in range(Hh):
        x = xs + offsets[h]
        colour = colours(h % colours.N)
        if bars is not None:
            ax.errorbar(x, mean[:, h], yerr=bars[:, h], fmt="none", ecolor=colour, elinewidth=1, capsize=2,
                        alpha=0.8)
        ax.scatter(x, mean[:, h], color=colour, s=22, label=f"head {h}", zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(int(v)) for v in xs])
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean attention distance\n({unit})")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    handles, texts = ax.get_legend_handles_labels()
    handles.append(_legend_dot("0.35"))
    texts.append(dot_text)
    if bars is not None:
        handles.append(_legend_errorbar("0.35"))
        texts.append(bar_text)
    fig.legend(handles, texts, loc="outside right center", fontsize=7, frameon=False)
    return fig


def _legend_dot(colour: str) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, marker="o", markersize=4.5, linestyle="none")


def _legend_errorbar(colour: str) -> Any:
    """A legend-only error bar (not drawn on any axes)."""
    from matplotlib.collections import LineCollection
    from matplotlib.container import ErrorbarContainer
    from matplotlib.lines import Line2D

    line = Line2D([], [], linestyle="none")
    caps = (Line2D([], [], color=colour, marker="_", markersize=4, linestyle="none"),)
    return ErrorbarContainer((line, caps, (LineCollection([], colors=colour, linewidths=1),)),
                             has_xerr=False, has_yerr=True)


def norm_histogram(
    norms: Any,
    *,
    outliers: Any = None,
    threshold: float | None = None,
    bins: int = 60,
    log: bool = True,
    title: str = "token norms",
    threshold_label: str | None = None,
    note: str | None = None,
) -> Figure:
    """Histogram of token output norms with the high-norm outliers (Darcet et al. 2024, "Vision
    Transformers Need Registers") marked in a second colour, and the cut drawn as a dashed line.

    ``outliers`` is a bool mask of the same shape as ``norms`` (e.g. `vitscope.methods.token_norms`'s), with
    ``threshold`` (optional) drawn as the cut; without ``outliers``, tokens above ``threshold`` (default:
    Tukey's far fence ``q75 + 3 IQR``, see `outlier_threshold`) are the outliers.

    The cut is a legend entry, ``threshold_label`` (default: which rule and its value); ``note`` is a
    sentence under the title (e.g. why this cut).
    """
    values = as_map(norms, "norms").ravel()
    cut = None if threshold is None or not math.isfinite(threshold) else float(threshold)
    if outliers is not None:
        flags = np.asarray(outliers.detach().cpu().numpy() if hasattr(outliers, "detach") else outliers, dtype=bool)
        if flags.size != values.size:
            raise VitscopeError("outliers", f"{flags.size} flags for {values.size} norms", "same shape as norms")
        flags = flags.ravel()
    else:
        if cut is None:
            cut = outlier_threshold(values)
            threshold_label = threshold_label or f"Tukey's far fence q75 + 3 IQR = {cut:.3g}"
        flags = values > cut
    edges = np.histogram_bin_edges(values, bins=bins).tolist()
    fig = _figure(7.0, 3.2 + (0.2 if note else 0.0))
    ax = fig.subplots()
    ax.hist(values[~flags], bins=edges, color="#4c72b0", label=f"tokens ({int((~flags).sum())})", log=log)
    if flags.any():
        ax.hist(values[flags], bins=edges, color="#dd2c2c", label=f"outliers ({int(flags.sum())})", log=log)
    if cut is not None:
        ax.axvline(cut, color="#dd2c2c", linestyle="--", linewidth=1,
                   label=threshold_label or f"outlier threshold {cut:.3g}")
    ax.set_xlabel("token norm")
    ax.set_ylabel("count")
    ax.set_title(title if not note else f"{title}\n{note}", fontsize=10 if not note else 9)
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the bars and the cut
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 150, max_pixels: int | None = None) -> Path:
    """Write ``fig`` to ``path`` (``.png``, ``.svg`` or ``.pdf``, by its suffix) atomically.

    ``dpi`` must be in ``[1, 1200]`` and the figure at most ``max_pixels`` pixels (default
    `vitscope.limits.MAX_FIGURE_PIXELS`), checked before drawing.
    """
    from vitscope._io import atomic_write_bytes

    target = Path(path)
    fmt = target.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise VitscopeError("output", f"unsupported figure format {target.suffix or '(none)'!r}", "use .png, .svg or .pdf")
    dpi = check_dpi(dpi)
    check_figure_size(fig, dpi, max_pixels)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, metadata=_metadata(fmt))
    return atomic_write_bytes(target, buf.getvalue())


def _metadata(fmt: str) -> dict[str, Any]:
    # reproducible files: no creation date in svg/pdf
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    return {}


def render_array(fig: Figure) -> np.ndarray:
    """Draw ``fig`` and return its pixels ``(height, width, 4)`` uint8 RGBA (row 0 is the top)."""
    check_figure_size(fig, fig.dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()  # type: ignore[attr-defined]
