"""Video figures: the frames x heads grid shows each head's map of each token frame on one scale, and the GIF shows
input frame t with token frame t // tubelet on one colour scale over the clip (hand-made attentions and maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hostile.harness import check_contained, tree_state
from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.viz._render import colormap_table, upsample
from vitscope.viz.video import frames_head_grid, save_video_gif

T_IN, TUB, ROWS, COLS, HEADS = 4, 2, 2, 3, 2
N = 1 + (T_IN // TUB) * ROWS * COLS


def _video_attn() -> Attentions:
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, 1, HEADS, 1, N, generator=g)
    w = w / w.sum(-1, keepdim=True)  # the [CLS] row of each head
    return Attentions(weights=w, prefix=("cls",), grid=((T_IN // TUB) * ROWS, COLS), patch_size=(8, 8),
                      image_size=(16, 24), layers=(1,), heads=(0, 1), queries=(0,), num_layers=2, num_heads=HEADS,
                      frames=T_IN // TUB, tubelet=TUB)


def test_grid_shows_each_head_and_frame_on_one_scale() -> None:
    attn = _video_attn()
    rgb = np.zeros((T_IN, 16, 24, 3), np.uint8)
    fig = frames_head_grid(rgb, attn, layer=1)
    axes = [ax for ax in fig.axes if ax.images and len(ax.images) == 2]
    assert len(axes) == (T_IN // TUB) * (HEADS + 1)
    w = attn.weights[0, 0, :, 0, 1:].double()  # (heads, T' * rows * cols), token order (T', rows, cols)
    per = w.reshape(HEADS, T_IN // TUB, ROWS, COLS)
    per = torch.cat([per, per.mean(dim=0, keepdim=True)]).numpy()  # heads, then the mean
    lo, hi = float(per.min()), float(per.max())
    for i, ax in enumerate(axes):
        t, h = divmod(i, HEADS + 1)
        shown = ax.images[1]
        np.testing.assert_allclose(np.asarray(shown.get_array()), upsample(per[h, t].astype(np.float32), (16, 24)),
                                   atol=1e-6)
        assert shown.get_clim() == pytest.approx((lo, hi))  # one scale for every panel


def test_grid_refuses_image_attentions() -> None:
    a = _video_attn()
    img = Attentions(weights=a.weights, prefix=a.prefix, grid=a.grid, patch_size=a.patch_size, image_size=a.image_size,
                     layers=a.layers, heads=a.heads, queries=a.queries, num_layers=2, num_heads=HEADS)
    with pytest.raises(VitscopeError, match="image"):
        frames_head_grid(np.zeros((T_IN, 16, 24, 3), np.uint8), img, layer=1)


def test_gif_frames_follow_their_tubelet_on_one_scale(tmp_path: Path) -> None:
    """Token frame 0 all low, token frame 1 all high: input frames 0-1 blend the colormap's first colour, frames
    2-3 its last (a per-frame scale would make both the first); each input frame its own grey level."""
    maps = np.stack([np.full((ROWS, COLS), 0.1), np.full((ROWS, COLS), 0.7)]).astype(np.float32)
    rgb = np.stack([np.full((16, 24, 3), 40 * t, np.uint8) for t in range(T_IN)])
    before = tree_state(tmp_path)
    out = save_video_gif(rgb, maps, tmp_path / "o.gif", tubelet=TUB, alpha=0.5)
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    lut = colormap_table("inferno")
    with Image.open(out) as im:
        assert im.n_frames == T_IN and im.size == (24, 16)
        for t in range(T_IN):
            im.seek(t)
            frame = np.asarray(im.convert("RGB"))
            colour = lut[0] if t < TUB else lut[255]
            want = (0.5 * 40 * t + 0.5 * colour.astype(np.float64) + 0.5).astype(np.uint8)
            assert (np.abs(frame.astype(int) - want.astype(int)) <= 1).all(), t


@pytest.mark.parametrize(("kw", "arg"), [({"alpha": 2.0}, "alpha"), ({"duration_ms": 0}, "duration_ms"),
                                         ({"tubelet": 1}, "maps")])
def test_gif_arguments_are_checked(tmp_path: Path, kw: dict[str, float], arg: str) -> None:
    maps = np.zeros((2, ROWS, COLS), np.float32)
    with pytest.raises(VitscopeError) as info:
        save_video_gif(np.zeros((T_IN, 16, 24, 3), np.uint8), maps, tmp_path / "o.gif", **{"tubelet": TUB, **kw})
    assert info.value.argument == arg
    assert not list(tmp_path.iterdir())
