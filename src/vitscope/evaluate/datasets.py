"""Where `vitscope.evaluate` reads its images, masks and labels from (local files only; nothing downloads).

- `imagenet_segmentation`: ImageNet-Segmentation's ``gtsegs_ijcv.mat`` (Guillaumin et al. 2014, 4,276 images;
  MATLAB v7.3, i.e. HDF5), read with h5py (``pip install 'vitscope[evaluate]'``) the way Chefer et al.'s
  ``Imagenet_Segmentation`` dataset does: ``/value/img`` and ``/value/gt`` hold references to each image
  ``(3, W, H)`` and its mask ``(W, H)``, stored transposed (MATLAB is column-major).
- `folder_samples`: an image folder (or glob, list file) with an optional mask folder mirroring it (``a/cat.jpg``
  -> ``masks/a/cat.jpg`` or ``masks/a/cat.png``, non-zero = object), labels from each image's parent folder when
  it names one of the model's classes (``shapes/star/0001.png``).
- `coco_masks`: COCO-style instance annotations (a ``.json`` as ``--masks``): an image's mask is the union of its
  annotations' polygons or run-length encodings (uncompressed count lists or the compressed strings of the COCO
  API), decoded here without pycocotools.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitscope.errors import VitscopeError


@dataclass(frozen=True)
class Sample:
    """One evaluation input: ``rel`` names it in the outputs; ``load()`` gives ``(image, mask or None)``
    (``image``: a path or an ``(H, W, 3)`` uint8 array; ``mask``: bool ``(H, W)`` in the image's frame); ``label``:
    the class index when known (the target-class perturbation test)."""

    rel: str
    load: Callable[[], tuple[Any, np.ndarray | None]]
    label: int | None = None


# ------------------------------------------------------------------------------------------------ ImageNet-Seg
def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise VitscopeError("images", "reading gtsegs_ijcv.mat needs h5py",
                            "pip install 'vitscope[evaluate]' (or h5py)") from None
    return h5py


class _MatFile:
    """The .mat opened lazily, once per process (a worker opens its own handle)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None

    def get(self) -> Any:
        if self._fh is None:
            self._fh = _h5py().File(self.path, "r")
        return self._fh

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_fh": None}


def _mat_item(mat: _MatFile, index: int) -> tuple[np.ndarray, np.ndarray]:
    f = mat.get()
    img = np.asarray(f[f["/value/img"][index, 0]]).transpose(2, 1, 0)  # stored (3, W, H) -> (H, W, 3)
    gt_ref = f[f["/value/gt"][index, 0]][0, 0]  # a cell of one reference
    gt = np.asarray(f[gt_ref]).transpose(1, 0)  # stored (W, H) -> (H, W)
    if img.ndim != 3 or img.shape[2] != 3 or gt.shape != img.shape[:2]:
        raise VitscopeError("images", f"item {index}: image {img.shape} and mask {gt.shape} do not match",
                            "pass Guillaumin et al.'s gtsegs_ijcv.mat")
    return np.ascontiguousarray(img.astype(np.uint8)), gt > 0


def imagenet_segmentation(path: str | os.PathLike[str], limit: int | None = None) -> list[Sample]:
    """The samples of ``gtsegs_ijcv.mat`` (``rel``: ``00000`` .. ``04275``; no labels: the predicted-class
    tests only); ``limit`` keeps the first ones."""
    p = Path(path)
    h5py = _h5py()
    try:
        with h5py.File(p, "r") as f:
            count = int(f["/value/img"].shape[0])
    except (OSError, KeyError) as exc:
        raise VitscopeError("images", f"{p} is not ImageNet-Segmentation's v7.3 .mat ({type(exc).__name__})",
                            "pass gtsegs_ijcv.mat (see docs/evaluation.md)") from None
    mat = _MatFile(p)
    n = count if limit is None else min(count, limit)
    width = max(5, len(str(count - 1)))
    return [Sample(f"{i:0{width}d}", _MatLoader(mat, i)) for i in range(n)]


@dataclass(frozen=True)
class _MatLoader:
    mat: _MatFile
    index: int

    def __call__(self) -> tuple[Any, np.ndarray | None]:
        return _mat_item(self.mat, self.index)


# ------------------------------------------------------------------------------------------------ folders
@dataclass(frozen=True)
class _FileLoader:
    path: Path
    mask: Path | None = None
    coco: tuple[tuple[int, int], tuple[Any, ...]] | None = None  # (height, width), segmentations

    def __call__(self) -> tuple[Any, np.ndarray | None]:
        from PIL import Image

        if self.mask is not None:
            with Image.open(self.mask) as im:
                return self.path, np.asarray(im.convert("L")) > 0
        if self.coco is not None:
            (h, w), segs = self.coco
            return self.path, coco_mask(segs, (h, w))
        return self.path, None


def folder_samples(images: Any, masks: str | os.PathLike[str] | None = None,
                   labels: Sequence[str] | None = None, exclude: Path | None = None) -> list[Sample]:
    """Samples of an image folder, glob or list (`vitscope.batch.collect_inputs`), with masks from a mask
    folder or a COCO ``.json`` (`coco_masks`), and labels from parent folders named after ``labels``."""
    from vitscope.batch.local import collect_inputs
    from vitscope.batch.stats import mask_for

    items = collect_inputs(images, exclude=exclude)
    by_name = {name: i for i, name in enumerate(labels or ())}
    coco: dict[str, tuple[tuple[int, int], tuple[Any, ...]]] | None = None
    mask_dir: Path | None = None
    if masks is not None:
        m = Path(masks).expanduser()
        if m.is_file() and m.suffix.lower() == ".json":
            coco = coco_masks(m)
        elif m.is_dir():
            mask_dir = m
        else:
            raise VitscopeError("masks", f"not a folder or a COCO .json: {m}", "pass the mask folder or annotations")
    out = []
    for it in items:
        parent = Path(it.rel).parent.name
        label = by_name.get(parent)
        if mask_dir is not None:
            where = mask_for(mask_dir, it.rel)
            out.append(Sample(it.rel, _FileLoader(it.path, Path(where) if where else None), label))
        elif coco is not None:
            ann = coco.get(it.rel) or coco.get(Path(it.rel).name)
            out.append(Sample(it.rel, _FileLoader(it.path, None, ann), label))
        else:
            out.append(Sample(it.rel, _FileLoader(it.path), label))
    return out


# ------------------------------------------------------------------------------------------------ COCO
def rle_counts(counts: str | bytes) -> list[int]:
    """The run lengths of a COCO compressed RLE string (the COCO API's ``rleFrString``): each count is a
    little-endian run of 5-bit groups in characters offset by 48 (bit 5: more groups follow; bit 4 of the last:
    negative), and every count after the second is stored as its difference to the count two before."""
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    out: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise VitscopeError("masks", "a compressed RLE string ends inside a count", "check the annotations")
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_decode(counts: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Bool ``(H, W)`` of run lengths ``counts`` (alternating background, object, ..., starting with background)
    over the image in column-major order, as COCO stores them."""
    h, w = int(size[0]), int(size[1])
    runs = np.asarray(counts, dtype=np.int64)
    if (runs < 0).any() or int(runs.sum()) != h * w:
        raise VitscopeError("masks", f"RLE counts sum to {int(runs.sum())}, not {h}x{w}", "check the annotations")
    values = np.arange(runs.size) % 2 == 1
    flat = np.repeat(values, runs)
    return flat.reshape(w, h).T.copy()


def polygon_mask(polygons: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """Bool ``(H, W)`` of COCO polygons ``[x0, y0, x1, y1, ...]`` (filled with Pillow; the COCO API rasterises
    at pixel precision too, edges may differ by a pixel)."""
    from PIL import Image, ImageDraw

    h, w = int(size[0]), int(size[1])
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        xy = [float(v) for v in poly]
        if len(xy) >= 6:
            draw.polygon(list(zip(xy[0::2], xy[1::2], strict=True)), fill=1)
    return np.asarray(canvas) > 0


def coco_mask(segmentations: Sequence[Any], size: tuple[int, int]) -> np.ndarray:
    """Union of COCO ``segmentation`` fields (polygon lists, RLE dicts) as bool ``(H, W)``."""
    mask = np.zeros((int(size[0]), int(size[1])), dtype=bool)
    for seg in segmentations:
        if isinstance(seg, dict):
            counts = seg.get("counts")
            rle_size = seg.get("size", size)
            runs = rle_counts(counts) if isinstance(counts, (str, bytes)) else list(counts or [])
            mask |= rle_decode(runs, (int(rle_size[0]), int(rle_size[1])))
        elif isinstance(seg, list):
            mask |= polygon_mask(seg, size)
        else:
            raise VitscopeError("masks", f"a segmentation of type {type(seg).__name__}", "use polygons or RLE")
    return mask


def coco_masks(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, int], tuple[Any, ...]]]:
    """``file_name -> ((height, width), segmentations)`` of a COCO annotation file (decoded when loaded)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        images = {int(im["id"]): (str(im["file_name"]), (int(im["height"]), int(im["width"])))
                  for im in data["images"]}
        segs: dict[int, list[Any]] = {}
        for ann in data.get("annotations", []):
            segs.setdefault(int(ann["image_id"]), []).append(ann["segmentation"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VitscopeError("masks", f"{path} is not COCO annotations ({type(exc).__name__}: {exc})",
                            "pass an instances_*.json with images and annotations") from None
    return {name: (hw, tuple(segs.get(i, []))) for i, (name, hw) in images.items()}
