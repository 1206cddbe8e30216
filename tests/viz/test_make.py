"""`make_figure` and ``vitscope figure``: model + images in, the right figure out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vitscope
from tests.conftest import make_tiny_vit
from vitscope.cli import main
from vitscope.errors import VitscopeError
from vitscope.layout import parse_query
from vitscope.models.vit import save_vit
from vitscope.viz import render_array
from vitscope.viz.make import make_figure


@pytest.fixture(scope="module")
def vit():
    return vitscope.wrap(make_tiny_vit(num_registers=2, seed=3))  # 2 layers, 4 heads, patch 8, 32 x 32


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.get_images()]


def test_heads_figure_draws_the_captured_cls_row_of_each_head(vit, rgb_image):
    fig = make_figure("heads", [rgb_image], vit, layer=-1, mode="nearest", alpha=1.0, shared_scale=False)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == [f"layer 1, head {h}" for h in range(4)]
    # independent reference: the raw [CLS] row of the last layer, patch keys, per head
    attn = vitscope.capture(vit, rgb_image, layers=[-1], queries="cls")
    rows = attn.weights[0, 0, :, 0, attn.patch_slice].reshape(4, *attn.grid).numpy()  # (heads, rows, cols)
    arr = render_array(fig)
    H, W = 40, 56  # the fixture image; the model saw it resized to 32 x 32 (a 4 x 4 grid)
    import matplotlib

    top = np.asarray(matplotlib.colormaps["inferno"](1.0)[:3]) * 255
    for h, ax in enumerate(axes):
        r, c = np.unravel_index(rows[h].argmax(), rows[h].shape)
        x, y = (c + 0.5) * W / 4, (r + 0.5) * H / 4
        dx, dy = ax.transData.transform((x, y))
        np.testing.assert_allclose(arr[int(arr.shape[0] - dy), int(dx), :3], top, atol=3)


def test_panel_grid_batch_distance_norms(vit, rgb_image):
    assert [ax.get_title() for ax in _image_axes(make_figure("panel", [rgb_image], vit))] == [
        "image", "head mean, layer 1", "rollout",
    ]
    assert len(_image_axes(make_figure("grid", [rgb_image], vit))) == 2 * 4
    tall = Image.fromarray(np.asarray(rgb_image).transpose(1, 0, 2).copy())  # a 56 x 40 image
    batch = make_figure("batch", [rgb_image, tall], vit, method="cls", titles=["wide", "tall"])
    assert [ax.get_title() for ax in _image_axes(batch)] == ["wide", "", "tall", ""]  # the map: one figure title
    assert "layer-1 attention (head mean)" in batch.get_suptitle()  # the tiny ViT's last layer
    dist = make_figure("distance", [rgb_image, tall], vit)
    assert len(dist.axes[0].collections) >= 4  # one scatter per head (+ error bars)
    norms = make_figure("norms", [rgb_image, tall], vit)
    assert norms.axes[0].get_xlabel() == "token norm"


def test_make_figure_errors(vit, rgb_image):
    with pytest.raises(VitscopeError, match="kind"):
        make_figure("pie", [rgb_image], vit)
    with pytest.raises(VitscopeError, match="images"):
        make_figure("heads", [rgb_image, rgb_image], vit)
    with pytest.raises(VitscopeError, match="method"):
        make_figure("batch", [rgb_image], vit, method="flow")


def test_parse_query():
    assert parse_query(None) is None
    assert parse_query("cls") == "cls"
    assert parse_query("register:1") == "register:1"
    assert parse_query("2,3") == (2, 3)
    assert parse_query("7") == 7
    with pytest.raises(VitscopeError, match="query"):
        parse_query("a,b")


def test_cli_figure_writes_the_file_and_reports_errors_in_one_line(tmp_path, image_path, capsys):
    folder = save_vit(make_tiny_vit(), tmp_path / "model")
    out = tmp_path / "heads.png"
    main(["figure", "heads", str(image_path), "-m", str(folder), "-o", str(out), "--tau", "0.6", "--dpi", "40"])
    assert out.read_bytes().startswith(b"\x89PNG")
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["figure", "heads", str(image_path), "-m", str(folder), "-o", str(tmp_path / "x.gif")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output:") and err.count("\n") == 1
