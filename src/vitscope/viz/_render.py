"""Small helpers shared by the figures and the viewer: images as arrays, maps upsampled to image size.

Height always comes before width: images are ``(H, W, 3)``, maps ``(rows, cols)``, sizes ``(height, width)``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from vitscope.errors import VitscopeError

if TYPE_CHECKING:
    from PIL import Image

    from vitscope.attentions import Attentions

Upsample = Literal["nearest", "bilinear"]


def image_array(image: Any, argument: str = "image") -> np.ndarray:
    """Any image vitscope accepts (path, PIL image, HxW[xC] array, ``(3, H, W)`` tensor in [0, 1]) as
    ``(H, W, 3)`` float32 RGB in [0, 1]."""
    from vitscope.images import load_image

    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    if isinstance(image, np.ndarray) and image.dtype.kind == "f" and image.size and np.isfinite(image).all():
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim == 3 and arr.shape[-1] == 3 and arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.astype(np.float32)
    pil = load_image(image, argument)
    return np.asarray(pil, dtype=np.float32) / 255.0


def as_map(x: Any, argument: str = "maps") -> np.ndarray:
    """A tensor or array of maps as float32 numpy, with NaN/inf refused."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if arr.size == 0:
        raise VitscopeError(argument, f"empty array of shape {arr.shape}", "pass maps of shape (..., rows, cols)")
    if not np.isfinite(arr).all():
        raise VitscopeError(argument, "contains NaN or inf", "check how the maps were computed")
    return arr.astype(np.float32, copy=False)


def upsample(amap: np.ndarray, size: tuple[int, int], mode: Upsample = "bilinear") -> np.ndarray:
    """`vitscope.methods.upsample` for numpy maps ``(..., rows, cols)`` -> ``(..., height, width)``."""
    from vitscope.methods.upsample import upsample as upsample_maps

    if mode not in ("nearest", "bilinear"):
        raise VitscopeError("upsample", f"unknown mode {mode!r}", "use 'nearest' or 'bilinear'")
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))
    return upsample_maps(t, size, mode).numpy()


def normalise(amap: np.ndarray) -> np.ndarray:
    """Min-max scale each trailing ``(rows, cols)`` map to [0, 1] (a constant map becomes 0): `vitscope._ops.minmax`."""
    from vitscope._ops import minmax

    a = np.asarray(amap, dtype=np.float32)
    lead = a.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(a)).reshape(-1, *a.shape[-2:])
    return minmax(t).reshape(*lead, *a.shape[-2:]).numpy()


def display_image(image: Any, attn: Attentions | None = None, policy: str | None = None) -> np.ndarray:
    """The part of ``image`` the patch grid covers, as ``(H, W, 3)`` float in [0, 1].

    Under the ``"crop"`` policy (DINO's way) the model saw the top-left ``rows*ph x cols*pw`` pixels of the
    image at its own resolution, so the image is cropped to them; under ``"resize"``/``"native"`` the grid
    spans the whole image, which keeps its own aspect ratio (the map is stretched over it).
    """
    arr = image_array(image)
    if attn is not None and policy == "crop":
        rows, cols = attn.grid
        ph, pw = attn.patch_size
        h, w = rows * ph, cols * pw
        if h <= arr.shape[0] and w <= arr.shape[1]:
            arr = arr[:h, :w]
    return arr


def head_maps(
    attn: Attentions, layer: int = -1, query: int | str | tuple[int, int] | None = None, batch: int = 0
) -> tuple[np.ndarray, list[int | str]]:
    """Raw attention of one query to the patches, for every captured head of one layer
    (`vitscope.methods.cls_map` with ``head="all"``; ``query=None`` is [CLS], or the patch mean without one).

    Returns ``(maps, heads)``: maps ``(heads, rows, cols)`` and the head labels (indices, or ``"mean"``).
    """
    from vitscope.methods import cls_map

    if not 0 <= batch < attn.batch_size:
        raise VitscopeError("batch", f"index {batch} out of range for {attn.batch_size} images", "pick an image index")
    maps = as_map(cls_map(attn, layer=layer, head="all", query=query)[batch])  # (heads, rows, cols)
    labels: list[int | str] = ["mean"] if attn.heads == "mean" else list(attn.heads)
    return maps, labels


def absolute_layer(attn: Attentions, layer: int) -> int:
    return attn.layers[attn.layer_position(layer)]


def pil_from_array(arr: np.ndarray) -> Image.Image:
    """``(H, W, 3)`` float [0, 1] -> 8-bit RGB PIL image."""
    from PIL import Image

    return Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def threshold_mask(values: np.ndarray, tau: float) -> np.ndarray:
    """DINO's attention mask on numpy maps ``(..., rows, cols)``: per map, the largest cells whose share of
    the map's total first reaches ``tau`` (`vitscope.methods.masks.mass_mask`; Caron et al. 2021).

    Returns a bool array of the same shape as ``values``.
    """
    from vitscope.methods.masks import mass_mask

    return mass_mask(torch.from_numpy(np.asarray(values, dtype=np.float64)), tau).numpy()


def check_figure_size(fig: Any, dpi: float, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` in pixels of ``fig`` at ``dpi``, refused above ``max_pixels`` (default
    `vitscope.limits.max_figure_pixels`) before anything is drawn."""
    from vitscope import limits

    w, h = fig.get_figwidth() * dpi, fig.get_figheight() * dpi
    cap = limits.max_figure_pixels(max_pixels)
    if w * h > cap or max(w, h) >= 2**16:
        raise VitscopeError(
            "dpi", f"the figure would be {w:,.0f}x{h:,.0f} = {w * h:,.0f} pixels, more than the {cap:,} pixel limit",
            "lower the dpi, or raise max_pixels (CLI --max-figure-pixels, in megapixels)",
        )
    return int(w), int(h)


@functools.cache
def colormap_table(cmap: str = "inferno") -> np.ndarray:
    """The 256 RGB entries ``(256, 3)`` uint8 of a matplotlib colormap: the one colour table of PNG maps,
    batch heatmaps and the viewer."""
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise VitscopeError("cmap", f"unknown colormap {cmap!r}", "use a matplotlib name, e.g. 'inferno'")
    table = (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    table.setflags(write=False)
    return table
