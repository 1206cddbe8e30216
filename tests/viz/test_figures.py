"""Figures, checked on their rendered pixels: where the hot patch lands, in which colour, with which aspect."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.viz import figures
from vitscope.viz.figures import (
    MASK_COLOUR,
    batch_maps,
    distance_plot,
    head_grid,
    layer_head_grid,
    map_panel,
    norm_histogram,
    render_array,
    save_figure,
)

GRAY = 0.5
H_IMG, W_IMG = 48, 80  # a non-square image (height, width)
ROWS, COLS = 3, 5


def _rgb(colour: str | tuple) -> np.ndarray:
    return np.asarray(matplotlib.colors.to_rgb(colour)) * 255.0


def _blend(cmap: str, value: float, alpha: float, under: float = GRAY) -> np.ndarray:
    """Expected pixel of a map value drawn with ``alpha`` over a uniform ``under`` image."""
    c = np.asarray(matplotlib.colormaps[cmap](value)[:3])
    return (alpha * c + (1 - alpha) * under) * 255.0


def _pixel(fig, arr: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """RGB of the canvas at data point (x, y) of ``ax`` (display y grows upwards, array rows downwards)."""
    dx, dy = ax.transData.transform((x, y))
    return arr[int(arr.shape[0] - dy), int(dx), :3].astype(float)


def _image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_images()]


def _hot_maps() -> np.ndarray:
    maps = np.zeros((3, ROWS, COLS), np.float32)  # (heads, rows, cols)
    maps[0, 1, 3] = 1.0
    maps[1, 2, 0] = 1.0
    maps[2, 0, 4] = 0.25  # a weak head: full brightness only with per-head scale
    return maps


@pytest.fixture
def gray():
    return np.full((H_IMG, W_IMG, 3), GRAY, np.float32)


def test_head_grid_hot_patch_colour_and_location(gray):
    alpha = 0.6
    fig = head_grid(gray, _hot_maps(), layer=3, mode="nearest", alpha=alpha, cmap="inferno", fade=False)
    arr = render_array(fig)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == [f"layer 3, head {h}" for h in range(3)]
    ph, pw = H_IMG / ROWS, W_IMG / COLS
    hot, cold = _blend("inferno", 1.0, alpha), _blend("inferno", 0.0, alpha)
    for ax, (r, c) in zip(axes[:2], [(1, 3), (2, 0)], strict=True):
        np.testing.assert_allclose(_pixel(fig, arr, ax, (c + 0.5) * pw, (r + 0.5) * ph), hot, atol=3)
        np.testing.assert_allclose(_pixel(fig, arr, ax, ((c + 2) % COLS + 0.5) * pw, (r + 0.5) * ph), cold, atol=3)
        # the hot region in the canvas spans exactly the patch: find all hot pixels inside the axes
        x0, y0, x1, y1 = ax.get_window_extent().extents
        top, bottom = int(arr.shape[0] - y1), int(arr.shape[0] - y0)
        region = arr[top:bottom, int(x0) : int(x1), :3].astype(float)
        ys, xs = np.nonzero(np.abs(region - hot).max(axis=-1) < 6)
        to_data = ax.transData.inverted()
        (dx0, dy0), (dx1, dy1) = (to_data.transform((xs.min() + x0, arr.shape[0] - (ys.min() + top))),
                                  to_data.transform((xs.max() + x0, arr.shape[0] - (ys.max() + top))))
        scale = W_IMG / (x1 - x0) * 1.5  # 1.5 canvas pixels, in image pixels
        assert abs(dx0 - c * pw) < scale and abs(dx1 - (c + 1) * pw) < scale
        assert abs(dy0 - r * ph) < scale and abs(dy1 - (r + 1) * ph) < scale


def test_head_grid_shared_versus_per_head_scale(gray):
    maps = _hot_maps()
    for shared, expected in ((True, 0.25), (False, 1.0)):
        fig = head_grid(gray, maps, mode="nearest", alpha=1.0, shared_scale=shared, colorbar=False, fade=False)
        arr, ax = render_array(fig), _image_axes(fig)[2]
        px = _pixel(fig, arr, ax, 4.5 * W_IMG / COLS, 0.5 * H_IMG / ROWS)
        np.testing.assert_allclose(px, _blend("inferno", expected, 1.0), atol=3)


def test_head_grid_keeps_the_image_aspect(gray):
    fig = head_grid(gray, _hot_maps(), colorbar=False)
    render_array(fig)
    for ax in _image_axes(fig):
        w, h = ax.get_window_extent().width, ax.get_window_extent().height
        assert w / h == pytest.approx(W_IMG / H_IMG, rel=0.03)


def test_head_grid_mask_contours_drawn_only_when_asked(gray):
    cyan = _rgb(MASK_COLOUR)

    def cyan_pixels(fig) -> np.ndarray:
        arr = render_array(fig)[..., :3].astype(float)
        return np.argwhere(np.abs(arr - cyan).max(axis=-1) < 40)

    plain = head_grid(gray, _hot_maps(), mode="nearest")
    assert len(cyan_pixels(plain)) == 0
    masked = head_grid(gray, _hot_maps(), mode="nearest", mask_tau=0.5)  # each mask is the one hot patch
    arr_pts = cyan_pixels(masked)
    assert len(arr_pts) > 20
    ax = _image_axes(masked)[0]
    height = render_array(masked).shape[0]
    to_data = ax.transData.inverted()
    x0, y0, x1, y1 = ax.get_window_extent().extents
    inside = [(c, r) for r, c in arr_pts if x0 <= c <= x1 and y0 <= height - r <= y1]
    pts = np.array([to_data.transform((c, height - r)) for c, r in inside])  # data (x, y)
    ph, pw = H_IMG / ROWS, W_IMG / COLS
    # the contour in head 0's panel follows the border of patch (1, 3)
    assert pts[:, 0].min() == pytest.approx(3 * pw, abs=2.5) and pts[:, 0].max() == pytest.approx(4 * pw, abs=2.5)
    assert pts[:, 1].min() == pytest.approx(1 * ph, abs=2.5) and pts[:, 1].max() == pytest.approx(2 * ph, abs=2.5)


def test_head_grid_reads_attentions_rows_by_layer_query_and_head():
    grid, prefix = (2, 3), ("cls", "register")
    N = len(prefix) + grid[0] * grid[1]
    w = torch.full((2, 1, 2, N, N), 1.0 / N)  # (layer, batch, head, query, key)
    # layer 5 (position 1), head 1, query [CLS] puts its mass on patch (1, 2) = token 2 + 5
    w[1, 0, 1, 0] = 0.0
    w[1, 0, 1, 0, 7] = 1.0
    attn = Attentions(weights=w, prefix=prefix, grid=grid, patch_size=(8, 8), image_size=(16, 24),
                      layers=(4, 5), heads=(0, 1), queries=None, num_layers=6, num_heads=2)
    img = np.full((16, 24, 3), GRAY, np.float32)
    fig = head_grid(img, attn, layer=-1, mode="nearest", alpha=1.0, fade=False)
    arr, axes = render_array(fig), _image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["layer 5, head 0", "layer 5, head 1"]
    np.testing.assert_allclose(_pixel(fig, arr, axes[1], 20, 12), _blend("inferno", 1.0, 1.0), atol=3)
    np.testing.assert_allclose(_pixel(fig, arr, axes[1], 4, 4), _blend("inferno", 0.0, 1.0), atol=3)


def test_map_panel_and_layer_head_grid_panel_counts(gray):
    maps = _hot_maps()
    fig = map_panel(gray, {"head mean": maps[0], "rollout": maps[1]})
    assert [ax.get_title() for ax in _image_axes(fig)] == ["image", "head mean", "rollout"]
    grid = layer_head_grid(gray, np.stack([maps, maps * 0.5]), layers=[2, 7])
    axes = _image_axes(grid)
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == ["head 0", "head 1", "head 2"]
    labels = {t.get_text() for ax in axes for t in ax.texts}
    assert labels == {"layer 2", "layer 7"}


def test_batch_maps_masked_view_is_image_times_normalised_map():
    colour = np.array([0.8, 0.4, 0.2], np.float32)
    img = np.broadcast_to(colour, (H_IMG, W_IMG, 3)).copy()
    amap = np.zeros((ROWS, COLS), np.float32)
    amap[0, 0], amap[2, 4] = 4.0, 2.0  # normalised: 1.0 and 0.5
    fig = batch_maps([img], amap[None], mode="nearest")
    arr, axes = render_array(fig), _image_axes(fig)
    assert len(axes) == 2
    ph, pw = H_IMG / ROWS, W_IMG / COLS
    masked = axes[1]
    np.testing.assert_allclose(_pixel(fig, arr, masked, 0.5 * pw, 0.5 * ph), colour * 255, atol=3)
    np.testing.assert_allclose(_pixel(fig, arr, masked, 4.5 * pw, 2.5 * ph), colour * 0.5 * 255, atol=3)
    np.testing.assert_allclose(_pixel(fig, arr, masked, 2.5 * pw, 1.5 * ph), 0.0, atol=3)
    np.testing.assert_allclose(_pixel(fig, arr, axes[0], 2.5 * pw, 1.5 * ph), colour * 255, atol=3)


def test_distance_plot_dots_are_means_and_bars_are_stds_over_images():
    d = np.random.default_rng(0).random((6, 4, 3)) * 40  # (images, layers, heads)
    fig = distance_plot(d)
    ax = fig.axes[0]
    dots = [c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]
    assert len(dots) == 3
    for h, coll in enumerate(dots):
        xy = coll.get_offsets()
        np.testing.assert_allclose(np.round(xy[:, 0]), np.arange(4))  # x = layer (plus a small offset)
        np.testing.assert_allclose(xy[:, 1], d[:, :, h].mean(axis=0), rtol=1e-6)
    bars = [c for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)]
    lengths = np.concatenate([[seg[1, 1] - seg[0, 1] for seg in b.get_segments()] for b in bars])
    np.testing.assert_allclose(np.sort(lengths), np.sort(2 * d.std(axis=0).T.ravel()), rtol=1e-6)


def test_norm_histogram_marks_the_outliers_right_of_the_cut():
    rng = np.random.default_rng(0)
    norms = np.concatenate([rng.normal(50, 4, 400), [160.0, 170.0, 180.0]])
    fig = norm_histogram(norms, bins=40, log=False)
    ax = fig.axes[0]
    assert ax.get_legend().get_texts()[1].get_text() == "outliers (3)"
    arr = render_array(fig)[..., :3].astype(float)
    red = np.argwhere(np.abs(arr - _rgb("#dd2c2c")).max(axis=-1) < 10)  # (row, col) of red pixels
    cut = figures.outlier_threshold(norms)
    x_cut = ax.transData.transform((cut, 0))[0]
    legend_box = ax.get_legend().get_window_extent()
    cols = np.array([c for r, c in red if not legend_box.contains(c, arr.shape[0] - r)])
    assert cols.min() >= x_cut - 3  # nothing red left of the cut line
    bars = cols[cols > x_cut + 3]
    for value in (160.0, 170.0, 180.0):  # one red bar over each outlier
        x = ax.transData.transform((value, 0))[0]
        assert np.abs(bars - x).min() < 8


def test_norm_histogram_uses_given_outlier_flags():
    norms = np.arange(10, dtype=np.float32)
    flags = np.zeros(10, bool)
    flags[[2, 5]] = True
    fig = norm_histogram(norms, outliers=flags)
    assert fig.axes[0].get_legend().get_texts()[1].get_text() == "outliers (2)"


@pytest.mark.parametrize(("suffix", "magic"), [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_save_figure_formats(tmp_path, gray, suffix, magic):
    fig = map_panel(gray, {"map": _hot_maps()[0]})
    path = save_figure(fig, tmp_path / f"fig{suffix}", dpi=50)
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"fig{suffix}"]  # no temporary file left


def test_bad_arguments_are_one_line_errors(tmp_path, gray):
    maps = _hot_maps()
    with pytest.raises(VitscopeError, match="output"):
        save_figure(map_panel(gray, {"m": maps[0]}), tmp_path / "fig.jpg")
    with pytest.raises(VitscopeError, match="cmap"):
        head_grid(gray, maps, cmap="no-such-map")
    with pytest.raises(VitscopeError, match="alpha"):
        head_grid(gray, maps, alpha=1.5)
    with pytest.raises(VitscopeError, match="masks"):
        head_grid(gray, maps, masks=np.ones((2, 2), bool))
    with pytest.raises(VitscopeError, match="maps"):
        batch_maps([gray, gray], maps)
    with pytest.raises(VitscopeError, match="maps"):
        head_grid(gray, np.full((2, 3, 3), np.nan))
