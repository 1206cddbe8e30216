"""Shared fixtures: the bundled shapes model and a few of its generated images with masks and labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def shapes_vit():
    from vitscope.adapters import load

    return load("vitscope:shapes")


@pytest.fixture(scope="session")
def shapes_batch(shapes_vit):
    """Six shapes images (32x32, the model's size): pixels (B, 3, 32, 32), masks, labels."""
    from vitscope.train.shapes import render_shape

    samples = [render_shape(0, i, (32, 32), "test") for i in range(6)]
    pixels = shapes_vit.preprocess([s.image for s in samples])
    return pixels, [s.mask for s in samples], [s.label for s in samples]


def write_shapes(root, count: int, start: int = 0):
    """``count`` shapes images as ``root/images/<class>/<i>.png`` and masks as ``root/masks/<class>/<i>.png``."""
    from PIL import Image

    from vitscope.train.shapes import SHAPE_CLASSES, render_shape

    for i in range(start, start + count):
        s = render_shape(0, i, (32, 32), "test")
        for sub, arr in (("images", s.image), ("masks", s.mask.astype(np.uint8) * 255)):
            d = root / sub / SHAPE_CLASSES[s.label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root / "images", root / "masks"


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
