"""The procedural shapes dataset: deterministic, with masks that match the drawn geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitscope.errors import VitscopeError
from vitscope.train.shapes import SHAPE_CLASSES, ShapesDataset, render_shape


def test_same_seed_and_index_give_the_same_image() -> None:
    a, b = render_shape(3, 17, (48, 48)), render_shape(3, 17, (48, 48))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.label == b.label
    # order of generation does not matter (no hidden global state)
    ds = ShapesDataset(size=20, seed=3, image_size=48)
    later = [ds[i][0] for i in (19, 5, 17)]
    assert torch.equal(later[2], torch.from_numpy(a.image).permute(2, 0, 1).float() / 255)


def test_different_index_seed_or_split_differ() -> None:
    base = render_shape(0, 0)
    for other in (render_shape(0, 1), render_shape(1, 0), render_shape(0, 0, split="val")):
        assert not np.array_equal(base.image, other.image)


@pytest.mark.parametrize("kind, area_factor", [("circle", math.pi), ("square", 2 * 1.05**2),
                                               ("triangle", 3 * math.sqrt(3) / 4 * 1.2**2)])
def test_mask_area_and_centre_match_the_geometry(kind: str, area_factor: float) -> None:
    """The mask of a circle/square/triangle has the area of the polygon (pi r^2, ...) and its centroid."""
    label = SHAPE_CLASSES.index(kind)
    found = 0
    for i in range(400):
        s = render_shape(11, i, (64, 64))
        if s.label != label:
            continue
        found += 1
        expected = area_factor * s.radius**2 * (math.cos(math.pi / 48) if kind == "circle" else 1.0)
        assert abs(s.mask.sum() - expected) / expected < 0.06
        ys, xs = np.nonzero(s.mask)
        assert abs(ys.mean() + 0.5 - s.center[0]) < 1.0 and abs(xs.mean() + 0.5 - s.center[1]) < 1.0
        if found == 5:
            break
    assert found == 5


def test_object_pixels_differ_from_background() -> None:
    """Inside the mask the object colour dominates: mean colour distance to the ring around it is large."""
    from scipy import ndimage

    gaps = []
    for i in range(60):
        s = render_shape(5, i, (48, 48))
        img = s.image.astype(np.float32) / 255
        inner = ndimage.binary_erosion(s.mask, iterations=1)
        ring = ndimage.binary_dilation(s.mask, iterations=3) & ~ndimage.binary_dilation(s.mask, iterations=1)
        gaps.append(np.abs(img[inner].mean(0) - img[ring].mean(0)).sum())
    assert np.mean(gaps) > 0.3 and np.min(gaps) > 0.05


def test_classes_are_balanced_and_objects_inside_the_image() -> None:
    labels = [render_shape(2, i, (32, 32)).label for i in range(600)]
    counts = np.bincount(labels, minlength=len(SHAPE_CLASSES))
    assert counts.min() > 600 / len(SHAPE_CLASSES) * 0.7
    for i in range(50):
        m = render_shape(2, i, (32, 32)).mask
        assert m.any() and not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def test_dataset_items_and_masks() -> None:
    ds = ShapesDataset(size=10, seed=0, split="val", image_size=(32, 48), with_masks=True)
    image, label, mask = ds[4]
    assert image.shape == (3, 32, 48) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert mask.shape == (32, 48) and mask.dtype == torch.bool
    assert label == render_shape(0, 4, (32, 48), "val").label
    assert np.array_equal(ds.mask(4), mask.numpy())
    assert len(ds) == 10 and ds.classes == SHAPE_CLASSES
    with pytest.raises(IndexError):
        ds.sample(10)


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(VitscopeError, match="split"):
        ShapesDataset(split="holdout")
    with pytest.raises(VitscopeError, match="too small"):
        ShapesDataset(image_size=8)
    with pytest.raises(VitscopeError, match="size"):
        ShapesDataset(size=0)
