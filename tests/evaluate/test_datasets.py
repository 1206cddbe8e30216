"""Readers on files written here: a MATLAB v7.3 (HDF5) gtsegs_ijcv.mat laid out as Guillaumin et al.'s, COCO
polygons and run-length encodings (compressed strings encoded here from the COCO API's description), folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vitscope.errors import VitscopeError
from vitscope.evaluate.datasets import (
    coco_mask,
    folder_samples,
    imagenet_segmentation,
    rle_counts,
    rle_decode,
)


def write_mat(path, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
    """MATLAB v7.3 cell arrays as HDF5: /value/img (N, 1) references to (3, W, H) uint8 arrays; /value/gt (N, 1)
    references to (1, 1) cells whose reference points at the (W, H) mask (MATLAB stores column-major, so
    arrays read back transposed)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs, gt_refs = [], []
        for i, (img, m) in enumerate(zip(images, masks, strict=True)):
            d = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0))
            g = refs.create_dataset(f"gt{i}", data=m.astype(np.uint8).T)
            cell = refs.create_dataset(f"cell{i}", data=np.array([[g.ref]], dtype=h5py.ref_dtype))
            img_refs.append([d.ref])
            gt_refs.append([cell.ref])
        v = f.create_group("value")
        v.create_dataset("img", data=np.array(img_refs, dtype=h5py.ref_dtype))
        v.create_dataset("gt", data=np.array(gt_refs, dtype=h5py.ref_dtype))


def test_imagenet_segmentation_mat(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)]
    masks = [rng.random((5, 7)) < 0.5, rng.random((6, 4)) < 0.5]
    path = tmp_path / "gtsegs_ijcv.mat"
    write_mat(path, images, masks)
    samples = imagenet_segmentation(path)
    assert [s.rel for s in samples] == ["00000", "00001"]
    for s, img, m in zip(samples, images, masks, strict=True):
        got_img, got_mask = s.load()
        np.testing.assert_array_equal(got_img, img)  # (H, W, 3), height first
        np.testing.assert_array_equal(got_mask, m)
        assert s.label is None
    assert len(imagenet_segmentation(path, limit=1)) == 1
    (tmp_path / "bad.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(VitscopeError, match=r"v7\.3"):
        imagenet_segmentation(tmp_path / "bad.mat")


def rle_encode(mask: np.ndarray) -> list[int]:
    """Run lengths over the column-major flattening, starting with a (possibly empty) background run."""
    flat = mask.T.ravel().astype(int)
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return counts


def rle_string(counts: list[int]) -> str:
    """The COCO API's compressed form: counts after the second stored as differences to the count two before;
    each value as 5-bit little-endian groups + 48, bit 5 set while more groups follow, sign in bit 4 of the last."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not ch & 0x10) or (x == -1 and ch & 0x10))
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def test_coco_rle_and_polygons(tmp_path) -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((9, 13)) < 0.4
    counts = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(counts, (9, 13)), mask)
    assert rle_counts(rle_string(counts)) == counts  # differences go negative here: the sign path is exercised
    assert any(counts[i] - counts[i - 2] < 0 for i in range(3, len(counts)))
    np.testing.assert_array_equal(coco_mask([{"size": [9, 13], "counts": rle_string(counts)}], (9, 13)), mask)
    square = coco_mask([[[2, 1, 6, 1, 6, 4, 2, 4]]], (9, 13))  # x 2..6, y 1..4
    assert square[2, 3] and square[3, 5] and not square[6, 3] and not square[2, 9]
    with pytest.raises(VitscopeError, match="RLE"):
        rle_decode([3, 4], (9, 13))
    # an annotation file: union of an image's annotations, matched by file name
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((9, 13, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    ann = {"images": [{"id": 7, "file_name": "a.png", "height": 9, "width": 13}],
           "annotations": [{"image_id": 7, "segmentation": {"size": [9, 13], "counts": counts}},
                           {"image_id": 7, "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    [s] = folder_samples(tmp_path / "imgs", tmp_path / "ann.json")
    np.testing.assert_array_equal(s.load()[1], mask | square)


def test_folder_labels_and_masks(tmp_path) -> None:
    from tests.evaluate.conftest import write_shapes
    from vitscope.train.shapes import SHAPE_CLASSES, render_shape

    images, masks = write_shapes(tmp_path, 3)
    samples = folder_samples(images, masks, SHAPE_CLASSES)
    assert len(samples) == 3
    for s in samples:
        i = int(s.rel.split("/")[-1][:4])
        ref = render_shape(0, i, (32, 32), "test")
        assert s.label == ref.label
        np.testing.assert_array_equal(s.load()[1], ref.mask)
    with pytest.raises(VitscopeError, match="masks"):
        folder_samples(images, tmp_path / "nope")
