"""``vitscope demo``'s figures are the visual regression set: each one is rendered (by the demo itself,
with `save_figure` intercepted) and its structure checked: axes, legends where outlines or error bars are
drawn, labelled colorbars, aligned batch rows, the threshold on the norm histogram, near-uniform notes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import vitscope
from tests.conftest import make_tiny_vit
from vitscope.methods import token_norms
from vitscope.methods.artifacts import outlier_threshold
from vitscope.viz import figures
from vitscope.viz.figures import NEAR_UNIFORM_GID, NEAR_UNIFORM_RATIO, map_panel, max_min_ratio, render_array
from vitscope.viz.make import make_figure


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """File name -> the Figure the demo saved under it (drawn once, so positions are final)."""
    import vitscope.viz
    from vitscope.demo import run_demo

    saved: dict[str, Any] = {}

    def keep(fig: Any, path: Any, *args: Any, **kw: Any) -> Any:
        render_array(fig)
        saved[str(path).rsplit("/", 1)[-1]] = fig
        return path

    mp = pytest.MonkeyPatch()
    mp.setattr(vitscope.viz, "save_figure", keep)
    try:
        run_demo(tmp_path_factory.mktemp("demo"), log=None)
    finally:
        mp.undo()
    return saved


def _one(demo: dict[str, Any], prefix: str) -> list[Any]:
    figs = [f for name, f in demo.items() if name.startswith(prefix)]
    assert figs, f"the demo drew no {prefix}* figure: {sorted(demo)}"
    return figs


def _image_axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_images() and getattr(ax, "_colorbar", None) is None]


def _colorbars(fig: Any) -> list[Any]:
    return [ax._colorbar for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def _labelled_colorbars(fig: Any) -> list[str]:
    labels = [cb.ax.get_ylabel() or cb.ax.get_xlabel() for cb in _colorbars(fig)]
    assert labels and all(label.strip() for label in labels), labels
    return labels


def _notes(fig: Any) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == NEAR_UNIFORM_GID]


def test_the_demo_draws_every_figure(demo):
    for prefix in ("heads_", "panel_", "layers_heads_", "batch_rollout", "attention_distance", "token_norms"):
        _one(demo, prefix)


def test_heads_legend_gives_tau_and_the_colorbar_its_scale(demo):
    for fig in _one(demo, "heads_"):
        assert len(_image_axes(fig)) == 4  # the bundled model: 4 heads
        texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert len(texts) == 1 and "DINO mask" in texts[0] and "\u03c4 = 0.6" in texts[0], texts
        assert "one scale for all" in _labelled_colorbars(fig)[0]  # the default: a shared scale
        peaks = [t.get_text() for ax in _image_axes(fig) for t in ax.texts if t.get_gid() == figures.HEAD_MAX_GID]
        assert len(peaks) == 4 and all(p.startswith("max ") for p in peaks)  # faint = weak, said on the panel


def test_heads_per_head_scale_and_no_legend_without_outlines():
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    fig = make_figure("heads", [img], "vitscope:shapes", shared_scale=False)
    assert fig.legends == []
    assert not [t for ax in fig.axes for t in ax.texts if t.get_gid() == figures.HEAD_MAX_GID]  # own scales
    bar = _colorbars(fig)[0]
    assert "each head's own scale" in bar.ax.get_ylabel()
    assert [t.get_text() for t in bar.ax.get_yticklabels()] == ["head min", "head max"]


def test_panel_colorbars_are_labelled_and_nothing_is_wasted_below(demo):
    for fig in _one(demo, "panel_"):
        axes = _image_axes(fig)
        assert [ax.get_title() for ax in axes][::2] == ["image", "rollout"]
        assert len(_labelled_colorbars(fig)) == 2
        bottom = min(ax.get_position().y0 for ax in axes)  # after drawing: the box the image really fills
        assert bottom < 0.04, f"{bottom:.3f} of the figure height is empty below the panels"


def test_layers_heads_grid_has_a_colorbar(demo):
    fig = _one(demo, "layers_heads_")[0]
    assert len(_image_axes(fig)) == 16
    assert len(_labelled_colorbars(fig)) == 1


def test_batch_rows_align_with_one_title_and_a_scale(demo):
    fig = _one(demo, "batch_rollout")[0]
    axes = _image_axes(fig)
    titles = [ax.get_title() for ax in axes]
    assert all(titles[0::2]) and not any(titles[1::2])  # image names; the map panels are untitled
    assert "rollout" in fig.get_suptitle()  # ... their content is said once
    assert len(_labelled_colorbars(fig)) == 1
    tops: dict[float, list[float]] = {}
    for ax in axes:  # axes of one gridspec row share the cell top; the drawn images must hang from it
        cell_top = ax.get_subplotspec().get_position(fig).y1
        tops.setdefault(round(cell_top, 6), []).append(ax.get_position().y1)
    assert len(tops) == 2
    heights = {round(ax.get_position().height, 4) for ax in axes}
    assert len(heights) > 1  # the photos differ in aspect: the test would see a misalignment
    for row in tops.values():
        assert max(row) - min(row) < 1e-6, row


def test_distance_plot_explains_its_bars_and_units(demo):
    fig = _one(demo, "attention_distance")[0]
    ax = fig.axes[0]
    assert "32x32" in ax.get_ylabel() and "pixels" in ax.get_ylabel()
    texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("std over 7 images" in t for t in texts) and any("mean over 7 images" in t for t in texts), texts


def test_norm_histogram_draws_the_artifacts_threshold(demo):
    fig = _one(demo, "token_norms")[0]
    ax = fig.axes[0]
    # the same numbers, from methods.artifacts: the demo's images in one batch, the last layer
    from vitscope.adapters import as_vit
    from vitscope.demo import demo_images

    vit = as_vit("vitscope:shapes")
    images = list(demo_images(vit.info.preprocess.image_size).values())
    attn = vitscope.capture(vit, images, layers=[-1], queries="cls", heads="mean", token_norms=True)
    report = token_norms(attn)
    norms = report.patch_norms[-1].numpy().ravel()
    cut = float(report.threshold[-1])
    expected = cut if math.isfinite(cut) else outlier_threshold(norms)
    lines = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(lines) == 1
    assert float(lines[0].get_xdata()[0]) == pytest.approx(expected, rel=1e-6)
    n_out = int((norms > expected).sum())
    assert n_out > 0  # the tail reaches past the cut: the outliers are marked
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"outliers ({n_out})" in texts and any(f"{expected:.3g}" in t for t in texts), texts


def test_trained_demo_maps_carry_no_near_uniform_note(demo):
    assert [n for f in demo.values() for n in _notes(f)] == []


def test_near_uniform_note_on_a_flat_map_only():
    img = np.full((32, 32, 3), 0.5, np.float32)
    flat = np.random.default_rng(0).uniform(0.057, 0.060, (4, 4)).astype(np.float32)
    peaked = flat.copy()
    peaked[1, 2] = 0.6
    fig = map_panel(img, {"flat": flat, "peaked": peaked})
    axes = {ax.get_title(): ax for ax in _image_axes(fig)}
    notes = {title: [t.get_text() for t in ax.texts if t.get_gid() == NEAR_UNIFORM_GID] for title, ax in axes.items()}
    ratio = max_min_ratio(flat)
    assert ratio < NEAR_UNIFORM_RATIO
    assert notes == {"image": [], "flat": [f"near uniform: max/min {ratio:.2f}"], "peaked": []}


def test_random_weights_give_near_uniform_notes_in_every_map_figure():
    from PIL import Image

    vit = vitscope.wrap(make_tiny_vit(seed=1))  # freshly initialised: attention ~ 1/N everywhere
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    for kind in ("heads", "panel", "grid", "batch"):
        fig = make_figure(kind, [img], vit)
        assert _notes(fig), kind
    assert figures.NEAR_UNIFORM_RATIO == NEAR_UNIFORM_RATIO  # one threshold, one place
