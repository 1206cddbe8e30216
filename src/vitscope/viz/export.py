"""One map of one image by method name, written as ``.npz`` + PNG overlay (what ``vitscope maps`` runs).

The ``.npz`` holds (see docs/methods.md):

- ``map``: float32 ``(batch, rows, cols)`` on the patch grid;
- ``map_upsampled``: float32 ``(batch, height, width)`` at the pixels the model saw (bilinear by default;
  nearest for ``dino_mask``);
- ``mask``: uint8 ``(batch, heads, rows, cols)``, ``dino_mask`` only (per-head 0/1 masks);
- ``rgb``: float32 ``(batch, rows, cols, 3)`` in [0, 1], ``pca`` only (its PNG shows these colours, not a heatmap);
- ``meta_json``: a JSON string: method, model, layer, head, query, target, tau, grid, patch_size,
  image_size, prefix, image.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscope.errors import VitscopeError
from vitscope.methods.upsample import UpsampleMode, upsample
from vitscope.viz._render import colormap_table


@dataclass
class MapOutput:
    """A computed map with what is needed to save and overlay it."""

    map: torch.Tensor  # (B, rows, cols) float32
    map_upsampled: torch.Tensor  # (B, H, W) float32
    rgb: np.ndarray  # (B, H, W, 3) uint8: the pixels the model saw
    meta: dict[str, Any] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # (B, heads, rows, cols) bool, dino_mask only
    rgb_map: torch.Tensor | None = None  # (B, rows, cols, 3) float32 in [0, 1]: a map shown as colours (pca)


def parse_head(text: str) -> str | int:
    """``"mean"``/``"max"``/``"min"`` or a head index (``"3"``, ``"-1"``)."""
    if text in ("mean", "max", "min"):
        return text
    try:
        return int(text)
    except ValueError:
        raise VitscopeError("--head", f"cannot parse {text!r}", "use mean, max, min or a head index") from None


def compute_map(
    model: Any,
    images: Any,
    method: str,
    *,
    layer: int = -1,
    head: str | int = "mean",
    query: str | int | tuple[int, int] | None = None,
    target: Any = None,
    tau: float = 0.6,
    upsample_mode: UpsampleMode = "bilinear",
    policy: str | None = None,
    size: int | tuple[int, int] | None = None,
) -> MapOutput:
    """Compute registered ``method``'s map for ``images`` (`vitscope.maps`) and bring it to the pixels.

    The CLI's options go to the methods that take them (``layer``/``head`` to ``cls``, ``dino_mask`` and
    ``attn_gradcam``; ``tau`` to ``dino_mask``; ``query`` and ``target`` wherever declared); ``policy``/``size``
    size the images as in `vitscope.capture`.
    """
    from vitscope.capture.prepare import prepare
    from vitscope.images import pixels_to_rgb
    from vitscope.methods.api import compute, get_method
    from vitscope.methods.registry import MapContext

    spec = get_method(method, argument="--method")
    vit, pixels = prepare(model, images, policy=policy, size=size)  # type: ignore[arg-type]
    given = {"layer": layer, "head": head, "query": query, "target": target, "tau": tau}
    if spec.name == "flow":
        given["approximate"] = True  # past the exact flow's token limit, the pooled approximation
    result = compute(MapContext(vit, pixels), spec.name, **{k: v for k, v in given.items() if k in spec.params})
    meta: dict[str, Any] = {"model": vit.info.name, "query": query, "tau": None, "target": None, "layer": None,
                            "head": None, **result.meta}
    if spec.name == "dino_mask" and not isinstance(head, int):
        meta["head"] = "share of heads"
    grid_map = result.map
    H, W = int(pixels.shape[-2]), int(pixels.shape[-1])
    mode: UpsampleMode = spec.upsample if spec.upsample == "nearest" else upsample_mode
    prep = vit.info.preprocess
    meta.update(
        grid=list(grid_map.shape[-2:]), patch_size=list(vit.info.patch_size), image_size=[H, W],
        prefix=list(vit.info.prefix), upsample=mode, query=query if not isinstance(query, tuple) else list(query),
    )
    mask, colours = result.extras.get("mask"), result.extras.get("rgb")
    return MapOutput(
        map=grid_map.float().cpu(), map_upsampled=upsample(grid_map.float(), (H, W), mode).cpu(),
        rgb=pixels_to_rgb(pixels, prep.mean, prep.std), meta=meta, mask=None if mask is None else mask.cpu(),
        rgb_map=None if colours is None else colours.float().cpu(),
    )


def overlay_png(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "inferno") -> bytes:
    """PNG bytes of ``heat`` ``(H, W)`` (min-max scaled, coloured) blended over ``rgb`` ``(H, W, 3)``."""
    from PIL import Image

    heat = np.asarray(heat, dtype=np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    index = (np.clip((heat - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8) if hi > lo else \
        np.zeros(heat.shape, dtype=np.uint8)
    lut = colormap_table(cmap).astype(np.float32)  # (256, 3)
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * lut[index]  # (H, W, 3), one float32 copy
    buf = io.BytesIO()
    Image.fromarray((blended.clip(0, 255) + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_overlay(result: MapOutput, image: Any, policy: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb, heat)`` of the first image at the original image's size (the part the grid covers under
    ``policy="crop"``), scaled down to fit `vitscope.limits.max_figure_pixels`."""
    from PIL import Image

    from vitscope import limits
    from vitscope.images import load_image

    img = load_image(image)
    if policy == "crop":
        rows, cols = result.map.shape[-2:]
        ph, pw = (int(v) for v in result.meta.get("patch_size", (1, 1)))
        img = img.crop((0, 0, min(img.width, cols * pw), min(img.height, rows * ph)))
    cap = limits.max_figure_pixels()
    if img.width * img.height > cap:
        scale = (cap / (img.width * img.height)) ** 0.5
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.BILINEAR)
    mode: UpsampleMode = "nearest" if result.meta.get("method") == "dino_mask" else \
        result.meta.get("upsample", "bilinear")
    heat = upsample(result.map[:1].float(), (img.height, img.width), mode)[0].numpy()
    return np.asarray(img), heat


def output_paths(out: str | os.PathLike[str], stem: str, method: str) -> tuple[Path, Path]:
    """(npz, png) for ``-o OUT``: ``x.npz`` -> ``x.npz`` + ``x.png``; ``x.png`` likewise; a path without a
    suffix is a folder: ``OUT/<stem>.<method>.npz`` + ``.png``. Anything else is refused before computing."""
    from vitscope._io import output_target

    p = output_target(out, suffixes=(".npz", ".png"), name=f"{stem}.{method}.npz")
    return p.with_suffix(".npz"), p.with_suffix(".png")


def save_map(result: MapOutput, out: str | os.PathLike[str], stem: str = "image", image: Any = None,
             policy: str | None = None) -> tuple[Path, Path]:
    """Write the ``.npz`` (arrays in the module docstring) and a PNG overlay of the first image: at the size of
    ``image`` (the original) when given, else at the pixels the model saw. ``out``: `output_paths`."""
    from vitscope._io import atomic_savez, atomic_write_bytes

    npz, png = output_paths(out, stem, str(result.meta.get("method", "map")))
    arrays: dict[str, np.ndarray] = {
        "map": result.map.numpy().astype(np.float32),
        "map_upsampled": result.map_upsampled.numpy().astype(np.float32),
    }
    if result.mask is not None:
        arrays["mask"] = result.mask.numpy().astype(np.uint8)
    if result.rgb_map is not None:
        arrays["rgb"] = result.rgb_map.numpy().astype(np.float32)
    arrays["meta_json"] = np.array(json.dumps(result.meta))
    atomic_savez(npz, arrays)
    rgb, heat = image_overlay(result, image, policy) if image is not None else (
        result.rgb[0], result.map_upsampled[0].numpy())
    data = overlay_png(rgb, heat) if result.rgb_map is None else colours_png(result.rgb_map[0], rgb.shape[:2])
    atomic_write_bytes(png, data)
    return npz, png


def colours_png(colours: torch.Tensor | np.ndarray, size: tuple[int, int]) -> bytes:
    """PNG bytes of a ``(rows, cols, 3)`` map of colours in [0, 1] (`pca`), each patch a block of ``size``
    ``(height, width)`` pixels (nearest: a patch has one colour, as in the DINOv2 figure)."""
    from PIL import Image

    arr = np.asarray(colours, dtype=np.float32)
    patches = Image.fromarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))  # (rows, cols, 3)
    h, w = (int(v) for v in size)
    buf = io.BytesIO()
    patches.resize((w, h), Image.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()
