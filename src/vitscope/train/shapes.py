"""``shapes``: a procedural dataset that needs no files, with a ground-truth mask for every image.

Each image holds one object (the label) of a random class, position, size, rotation and colour, drawn over a
cluttered, textured background (a colour gradient, stripes, smooth blotches, pixel noise, thin lines and dots).
Everything is a pure function of ``(seed, split, index)``: image ``i`` of seed ``s`` is always the same, so a
dataset of any size is generated on the fly, in any order, by any number of workers, and is reproducible
across machines (numpy's PCG64 + Pillow drawing; no global random state is touched).

The object's binary mask (``mask[y, x]`` is True where the object covers at least half of the pixel) is the
ground truth for localisation metrics (pointing game, mask IoU).

Example:
    >>> from vitscope.train.shapes import render_shape, ShapesDataset
    >>> s = render_shape(seed=0, index=7, image_size=(48, 48))
    >>> s.image.shape, s.mask.shape, SHAPE_CLASSES[s.label]        # doctest: +SKIP
    ((48, 48, 3), (48, 48), 'star')
    >>> ds = ShapesDataset(size=1000, seed=0, split="val", with_masks=True)
    >>> image, label, mask = ds[0]    # (3, H, W) float in [0, 1], int, (H, W) bool tensor
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from vitscope.errors import VitscopeError
from vitscope.train.labeled import LabeledDataset

#: Object classes, in label order.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

#: Independent random streams per split: the same index in two splits gives unrelated images.
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

_SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down: anti-aliased edges, exact area masks


@dataclass(frozen=True)
class ShapeSample:
    """One generated image.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool, True where the object covers at least half of the pixel.
        label: index into `SHAPE_CLASSES`.
        center: object centre ``(y, x)`` in pixels.
        radius: object radius in pixels.
        angle: rotation in radians.
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    center: tuple[float, float]
    radius: float
    angle: float


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])  # (P, 2) of (x, y)


def _outline(kind: str, radius: float, angle: float) -> np.ndarray:
    """Polygon ``(P, 2)`` of ``(x, y)`` offsets from the centre for ``kind`` (circles are many-sided polygons)."""
    if kind == "circle":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius
    elif kind == "square":
        t = math.pi / 4 + np.arange(4) * math.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius * 1.05
    elif kind == "triangle":
        t = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius * 1.2
    elif kind == "star":
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.2, 0.5) * radius
        pts = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)
    elif kind == "cross":
        a, w = 1.0, 0.36  # arm length, half-width (in radii)
        pts = np.array(
            [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a), (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)]
        ) * radius
    elif kind == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
        pts = np.stack([x, y + 2.5], axis=1) * (radius / 16.0)
    else:  # pragma: no cover - guarded by SHAPE_CLASSES
        raise ValueError(kind)
    return _rotate(pts, angle)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _background(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """Textured background ``(H, W, 3)`` float in [0, 1]: gradient + stripes + blotches + noise."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    yy, xx = yy / max(H - 1, 1), xx / max(W - 1, 1)
    # two low-saturation colours blended along a random direction
    c1 = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.75)))
    c2 = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.75)))
    theta = rng.uniform(0, 2 * math.pi)
    g = (math.cos(theta) * xx + math.sin(theta) * yy)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    img = c1[None, None] * (1 - g[..., None]) + c2[None, None] * g[..., None]
    # stripes of random orientation, frequency and amplitude
    phi, freq = rng.uniform(0, math.pi), rng.uniform(2.0, 9.0)
    stripes = np.sin(2 * math.pi * freq * (math.cos(phi) * xx + math.sin(phi) * yy) + rng.uniform(0, 2 * math.pi))
    img = img + rng.uniform(0.0, 0.08) * stripes[..., None] * rng.uniform(0.5, 1.0, size=3)
    # smooth blotches: a coarse random field upsampled bilinearly
    coarse = rng.uniform(-1, 1, size=(5, 5, 3)).astype(np.float32)
    blot = np.asarray(
        Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize((W, H), Image.Resampling.BILINEAR),
        dtype=np.float32,
    ) / 127.5 - 1
    img = img + rng.uniform(0.02, 0.08) * blot
    # pixel noise
    img = img + rng.normal(0, rng.uniform(0.01, 0.03), size=(H, W, 3))
    return np.clip(img, 0, 1)


def _clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Thin lines and small dots of random colours (much smaller than any object)."""
    W, H = canvas.size
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            x0, y0 = rng.uniform(0, W), rng.uniform(0, H)
            length, a = rng.uniform(0.15, 0.45) * min(H, W), rng.uniform(0, 2 * math.pi)
            draw.line([(x0, y0), (x0 + length * math.cos(a), y0 + length * math.sin(a))], fill=colour, width=1)
        else:
            x0, y0, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.6, 0.04 * min(H, W) + 0.8)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)


def _object_colour(rng: np.random.Generator, background_lum: float) -> np.ndarray:
    """A saturated colour whose luminance differs from the background's by at least 0.3."""
    rgb = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)))
    if abs(_luminance(rgb) - background_lum) < 0.3:
        if background_lum > 0.5:
            rgb = rgb * 0.25  # darken
        else:
            rgb = rgb + (1 - rgb) * 0.7  # lighten
    return rgb


def render_shape(seed: int, index: int, image_size: tuple[int, int] = (48, 48), split: str = "train") -> ShapeSample:
    """Render image ``index`` of ``seed`` (and ``split``): a pure function of its arguments."""
    if split not in SPLITS:
        raise VitscopeError("split", f"unknown split {split!r} for shapes", f"use one of {', '.join(SPLITS)}")
    H, W = int(image_size[0]), int(image_size[1])
    if min(H, W) < 16:
        raise VitscopeError("image_size", f"{H}x{W} is too small for shapes", "use at least 16x16 pixels")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    label = int(rng.integers(len(SHAPE_CLASSES)))
    bg = _background(rng, H, W)
    canvas = Image.fromarray((bg * 255 + 0.5).astype(np.uint8))
    _clutter(rng, canvas)
    base = np.asarray(canvas, dtype=np.float32) / 255.0

    side = min(H, W)
    radius = rng.uniform(0.22, 0.36) * side
    margin = 1.2 * radius + 1
    cy, cx = rng.uniform(margin, H - margin), rng.uniform(margin, W - margin)
    angle = rng.uniform(0, 2 * math.pi)
    pts = _outline(SHAPE_CLASSES[label], radius, angle) + np.array([cx, cy])
    s = _SUPERSAMPLE
    big = Image.new("L", (W * s, H * s), 0)
    ImageDraw.Draw(big).polygon([(float(x) * s, float(y) * s) for x, y in pts], fill=255)
    alpha = np.asarray(big.resize((W, H), Image.Resampling.BOX), dtype=np.float32) / 255.0  # (H, W) coverage
    mask = alpha >= 0.5

    under = base[mask].mean(axis=0) if mask.any() else base.mean(axis=(0, 1))
    colour = _object_colour(rng, _luminance(under))
    # light shading across the object so it is not a flat fill
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    sa = rng.uniform(0, 2 * math.pi)
    shade = 1 + 0.15 * ((xx - cx) * math.cos(sa) + (yy - cy) * math.sin(sa)) / max(radius, 1.0)
    obj = np.clip(colour[None, None] * shade[..., None], 0, 1)
    img = base * (1 - alpha[..., None]) + obj * alpha[..., None]
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return ShapeSample(image=image, mask=mask, label=label, center=(float(cy), float(cx)), radius=float(radius),
                       angle=float(angle))


class ShapesDataset(LabeledDataset):
    """``size`` procedurally generated images of `SHAPE_CLASSES`, rendered on the fly.

    Items are ``(image, label)`` with ``image`` a ``(3, H, W)`` float tensor in [0, 1], or
    ``(image, label, mask)`` with a ``(H, W)`` bool mask when ``with_masks=True``. `mask` gives a mask alone.
    """

    classes = SHAPE_CLASSES
    channels = 3
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(
        self, size: int = 50_000, seed: int = 0, split: str = "train", image_size: tuple[int, int] | int = (48, 48),
        with_masks: bool = False, offset: int = 0,
    ) -> None:
        if size <= 0:
            raise VitscopeError("size", f"shapes dataset size must be positive, got {size}", "pass e.g. size=1000")
        if split not in SPLITS:
            raise VitscopeError("split", f"unknown split {split!r} for shapes", f"use one of {', '.join(SPLITS)}")
        self.size = int(size)
        self.seed = int(seed)
        self.split = split
        self.image_size: tuple[int, int] = (
            (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1])))
        self.with_masks = with_masks
        self.offset = int(offset)
        render_shape(self.seed, self.offset, self.image_size, split)  # validate the size once, early

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> ShapeSample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a shapes dataset of {self.size} images")
        return render_shape(self.seed, self.offset + index, self.image_size, self.split)

    def mask(self, index: int) -> np.ndarray:
        """Ground-truth object mask ``(H, W)`` bool of image ``index``."""
        return self.sample(index).mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor]:
        s = self.sample(index)
        image = torch.from_numpy(s.image).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        if self.with_masks:
            return image, s.label, torch.from_numpy(s.mask)
        return image, s.label
