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
) -> Any:
    """Draw ``img`` ``(H, W, 3)`` and, over it, ``amap`` ``(rows, cols)`` upsampled to ``(H, W)``.

    ``mask`` ``(rows, cols)`` bool adds its outline (patch edges) as a contour. Returns the map's image
    artist (for a colorbar), or ``None`` without a map.
    """
    _show_image(ax, img)
    if amap is None:
        return None
    H, W = img.shape[:2]
    up = upsample(amap, (H, W), mode)  # (H, W)
    artist = ax.imshow(
        up, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, extent=(0, W, H, 0), interpolation="nearest"
    )
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
) -> Figure:
    """One panel per head: the attention map of one query over the image, titled ``"layer l, head h"``.

    Args:
        image: what the model saw (path, PIL image, array); it keeps its own aspect ratio.
        maps: an `Attentions` (then ``layer``, ``query``, ``batch`` pick the row) or an array
            ``(heads, rows, cols)`` (then ``layer`` only labels the titles).
        heads: which heads to show (positions along the maps' head dim); default all.
        shared_scale: one colour scale for all heads (comparable) or each head's own min-max.
        masks: ``(rows, cols)`` or ``(heads, rows, cols)`` bools drawn as contours, or ``mask_tau`` to
            contour DINO's mask (the top patches holding ``tau`` of each head's attention).
        mode: ``"bilinear"`` (smooth) or ``"nearest"`` (patch blocks) upsampling.
        policy: the size policy the model used; ``"crop"`` crops the image to the part the grid covers.
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
    fig = _figure(pw * cols + (0.6 if colorbar else 0.0), ph * nrows + 0.3 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False)
    vmin, vmax = (float(values.min()), float(values.max())) if shared_scale else (None, None)
    artist = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        artist = overlay(
            ax, img, values[i], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
            mask=None if mask_arr is None else mask_arr[i], mode=mode,
        )
        ax.set_title(f"layer {layer_label}, head {labels[i]}", fontsize=9)
    if colorbar and shared_scale and artist is not None:
        fig.colorbar(artist, ax=axes.ravel().tolist(), shrink=0.8, label="attention")
    return fig


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
) -> Figure:
    """A row: the image, then one overlay per named map, e.g. ``{"head mean": m1, "rollout": m2}``.

    Each map ``(rows, cols)`` has its own colour scale (methods differ in range), with its own colorbar.
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
    fig = _figure(pw * n + 0.5 * len(items) * int(colorbar), ph + 0.4)
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
            fig.colorbar(artist, ax=ax, shrink=0.8)
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
) -> Figure:
    """Rows = layers, columns = heads: one query's attention over the image in every captured head.

    ``maps`` is an `Attentions` (``layers`` picks captured layers, default all) or an array
    ``(layers, heads, rows, cols)`` with ``layers`` labelling its rows. Each panel has its own min-max
    scale unless ``shared_scale``.
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
    fig = _figure(pw * Hh + 0.5, ph * L + 0.4)
    axes = fig.subplots(L, Hh, squeeze=False)
    vmin, vmax = (float(values.min()), float(values.max())) if shared_scale else (None, None)
    for i in range(L):
        for j in range(Hh):
            ax = axes[i, j]
            overlay(ax, img, values[i, j], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, mode=mode)
            if i == 0:
                ax.set_title(f"head {head_labels[j]}", fontsize=8)
            if j == 0:
                ax.text(-0.06, 0.5, f"layer {layer_labels[i]}", transform=ax.transAxes, rotation=90,
                        ha="right", va="center", fontsize=8)
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
) -> Figure:
    """A batch of images next to their maps ``(B, rows, cols)``: for each image, the image, then either
    ``view="masked"`` (seed 004's view: ``image * normalise(map)``, the map min-max scaled to [0, 1] and
    upsampled) or ``view="overlay"`` (colormap over the image)."""
    if view not in ("masked", "overlay"):
        raise VitscopeError("view", f"unknown view {view!r}", "use 'masked' or 'overlay'")
    _check_cmap(cmap)
    _check_alpha(alpha)
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
    aspect = max(im.shape[0] / im.shape[1] for im in imgs)
    fig = _figure(panel * 2 * pairs, panel * aspect * nrows + 0.35 * nrows)
    axes = fig.subplots(nrows, 2 * pairs, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for b, img in enumerate(imgs):
        r, c = divmod(b, pairs)
        a_img, a_map = axes[r, 2 * c], axes[r, 2 * c + 1]
        _show_image(a_img, img)
        a_img.set_title(titles[b] if titles is not None else f"image {b}", fontsize=9)
        if view == "masked":
            H, W = img.shape[:2]
            weight = upsample(normalise(values[b]), (H, W), mode)[..., None]  # (H, W, 1) in [0, 1]
            _show_image(a_map, np.clip(img * weight, 0.0, 1.0))
            a_map.set_title("image x map", fontsize=9)
        else:
            overlay(a_map, img, values[b], cmap=cmap, alpha=alpha, mode=mode)
            a_map.set_title("map", fontsize=9)
    return fig


def distance_plot(
    distances: Any,
    *,
    std: Any = None,
    layers: Sequence[int] | None = None,
    jitter: float = 0.25,
    title: str = "mean attention distance",
) -> Figure:
    """Mean attention distance per head across layers (ViT paper, Dosovitskiy et al. 2021, Fig. 7).

    ``distances`` is ``(images, layers, heads)`` (then the dot is the mean over images and the error bar
    the standard deviation over images) or ``(layers, heads)`` with an optional ``std`` of the same shape.
    x = layer (heads spread by a small fixed offset so they don't overlap), y = distance in pixels; one
    colour per head.
    """
    d = as_map(distances, "distances")
    if d.ndim == 3:
        if std is not None:
            raise VitscopeError("std", "given with per-image distances", "pass (layers, heads) means with std")
        mean, spread = d.mean(axis=0), d.std(axis=0)
    elif d.ndim == 2:
        mean = d
        spread = None if std is None else as_map(std, "std")
        if spread is not None and spread.shape != mean.shape:
            raise VitscopeError("std", f"shape {spread.shape} != distances {mean.shape}", "same shape")
    else:
        raise VitscopeError("distances", f"shape {d.shape}", "pass (layers, heads) or (images, layers, heads)")
    L, Hh = mean.shape
    xs = np.asarray(list(layers) if layers is not None else range(L), dtype=np.float64)
    if xs.shape[0] != L:
        raise VitscopeError("layers", f"{xs.shape[0]} labels for {L} layers", "one label per layer")
    fig = _figure(1.2 + 0.55 * L + 1.4, 3.6)
    ax = fig.subplots()
    import matplotlib

    colours = matplotlib.colormaps["tab10" if Hh <= 10 else "tab20"]
    offsets = np.linspace(-jitter, jitter, Hh) if Hh > 1 else np.zeros(1)
    for h in range(Hh):
        x = xs + offsets[h]
        colour = colours(h % colours.N)
        if spread is not None:
            ax.errorbar(x, mean[:, h], yerr=spread[:, h], fmt="none", ecolor=colour, elinewidth=1, capsize=2,
                        alpha=0.8)
        ax.scatter(x, mean[:, h], color=colour, s=22, label=f"head {h}", zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(int(v)) for v in xs])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside right center", fontsize=7, frameon=False)
    return fig


def norm_histogram(
    norms: Any,
    *,
    outliers: Any = None,
    threshold: float | None = None,
    bins: int = 60,
    log: bool = True,
    title: str = "token norms",
) -> Figure:
    """Histogram of token output norms with the high-norm outliers (Darcet et al. 2024, "Vision
    Transformers Need Registers") marked in a second colour, and the cut drawn as a dashed line.

    ``outliers`` is a bool mask of the same shape as ``norms`` (e.g. `vitscope.methods.token_norms`'s), with
    ``threshold`` (optional) drawn as the cut; without ``outliers``, tokens above ``threshold`` (default:
    Tukey's far fence ``q75 + 3 IQR``, see `outlier_threshold`) are the outliers.
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
        flags = values > cut
    edges = np.histogram_bin_edges(values, bins=bins).tolist()
    fig = _figure(5.0, 3.2)
    ax = fig.subplots()
    ax.hist(values[~flags], bins=edges, color="#4c72b0", label=f"tokens ({int((~flags).sum())})", log=log)
    if flags.any():
        ax.hist(values[flags], bins=edges, color="#dd2c2c", label=f"outliers ({int(flags.sum())})", log=log)
    if cut is not None:
        ax.axvline(cut, color="#dd2c2c", linestyle="--", linewidth=1)
    ax.set_xlabel("token norm")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
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
