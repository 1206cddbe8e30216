"""Helpers under the figures: upsampling (height before width), DINO's threshold mask, image handling."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.viz._render import display_image, image_array, normalise, threshold_mask, upsample


def test_nearest_upsample_repeats_each_patch_as_a_block_non_square():
    amap = np.arange(6, dtype=np.float32).reshape(2, 3)  # (rows, cols)
    out = upsample(amap, (8, 9), "nearest")  # (H, W): 4 x 3 pixels per patch
    assert out.shape == (8, 9)
    np.testing.assert_array_equal(out, np.kron(amap, np.ones((4, 3), dtype=np.float32)))


def test_bilinear_upsample_matches_hand_interpolation():
    # a 1 x 2 map upsampled to 1 x 4 with align_corners=False: pixel centres at x = 0.25, 0.75, 1.25, 1.75 in
    # patch units; patch centres at 0.5 and 1.5 -> [0, 0.25, 0.75, 1] * (b - a) + a, clamped at the borders
    a, b = 2.0, 6.0
    out = upsample(np.array([[a, b]], dtype=np.float32), (1, 4), "bilinear")
    np.testing.assert_allclose(out[0], [a, a + 0.25 * (b - a), a + 0.75 * (b - a), b], rtol=1e-6)


def test_upsample_keeps_leading_dims_and_refuses_unknown_mode():
    maps = np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32)
    assert upsample(maps, (8, 10), "bilinear").shape == (2, 3, 8, 10)
    with pytest.raises(VitscopeError, match="upsample"):
        upsample(maps, (8, 10), "cubic")  # type: ignore[arg-type]


def test_threshold_mask_hand_example():
    values = np.array([[0.1, 0.5], [0.1, 0.3]])  # sorted: 0.5, 0.3, 0.1, 0.1
    # mass before each in sorted order: 0, 0.5, 0.8, 0.9
    np.testing.assert_array_equal(threshold_mask(values, 0.6), [[False, True], [False, True]])
    np.testing.assert_array_equal(threshold_mask(values, 0.5), [[False, True], [False, False]])
    np.testing.assert_array_equal(threshold_mask(values, 1.0), np.ones((2, 2), bool))
    with pytest.raises(VitscopeError, match="tau"):
        threshold_mask(values, 1.5)


def test_normalise_min_max_and_constant_map():
    out = normalise(np.array([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]]))
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(out[1], 0.0)


def test_image_array_accepts_chw_float_and_uint8():
    chw = torch.rand(3, 5, 7)
    np.testing.assert_allclose(image_array(chw), chw.permute(1, 2, 0).numpy())
    u8 = np.full((4, 6, 3), 255, np.uint8)
    assert image_array(u8).shape == (4, 6, 3) and image_array(u8).max() == 1.0
    gray = Image.new("L", (6, 4), 128)
    assert image_array(gray).shape == (4, 6, 3)


def _attn(grid: tuple[int, int], patch: tuple[int, int]) -> Attentions:
    n = 1 + grid[0] * grid[1]
    return Attentions(
        weights=torch.full((1, 1, 1, 1, n), 1.0 / n), prefix=("cls",), grid=grid, patch_size=patch,
        image_size=(grid[0] * patch[0], grid[1] * patch[1]), layers=(0,), heads="mean", queries=(0,),
        num_layers=1, num_heads=1,
    )


def test_display_image_crops_like_the_crop_policy_only():
    img = np.random.default_rng(0).random((37, 53, 3)).astype(np.float32)
    attn = _attn((4, 6), (8, 8))  # the model saw the top-left 32 x 48 pixels
    np.testing.assert_array_equal(display_image(img, attn, "crop"), img[:32, :48])
    assert display_image(img, attn, "resize").shape == (37, 53, 3)


def test_viz_import_does_not_import_matplotlib():
    code = "import sys, vitscope.viz, vitscope.viewer; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
