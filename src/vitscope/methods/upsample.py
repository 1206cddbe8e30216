"""`upsample`: a map on the patch grid -> a map on the image (nearest as DINO, bilinear, bicubic)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError

UpsampleMode = Literal["nearest", "bilinear", "bicubic"]
UPSAMPLE_MODES: tuple[str, ...] = ("nearest", "bilinear", "bicubic")


def upsample(
    maps: torch.Tensor,
    size: tuple[int, int] | Attentions,
    mode: UpsampleMode = "bilinear",
) -> torch.Tensor:
    """Resize maps ``(..., rows, cols)`` to ``(..., height, width)``.

    - ``"nearest"``: each patch becomes a constant block, as DINO's ``visualize_attention.py``
      (``interpolate(scale_factor=patch_size, mode="nearest")``); exact repetition when the size is a
      multiple of the grid, and otherwise each pixel takes the patch its centre falls in (torch's
      ``"nearest-exact"``; its legacy ``"nearest"`` shifts blocks towards the top-left).
    - ``"bilinear"``: ``align_corners=False`` (patch centres sit at pixel centres of their patch).
    - ``"bicubic"``: ``align_corners=False``, then clamped to each map's own ``[min, max]`` so overshoot never
      creates negative attention.

    Args:
        maps: float or bool tensor whose last two dims are the patch grid ``(rows, cols)``.
        size: target ``(height, width)``, or an `Attentions` (its ``image_size``, the pixels the model saw).
        mode: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.

    Returns:
        float tensor ``(..., height, width)`` (bool maps come back as 0/1 floats).
    """
    if mode not in UPSAMPLE_MODES:
        raise VitscopeError("mode", f"unknown upsampling {mode!r}", "use 'nearest', 'bilinear' or 'bicubic'")
    if isinstance(size, Attentions):
        size = size.image_size
    H, W = int(size[0]), int(size[1])
    if H <= 0 or W <= 0:
        raise VitscopeError("size", f"({H}, {W}) is not a valid image size", "pass a positive (height, width)")
    if maps.dim() < 2:
        raise VitscopeError("maps", f"shape {tuple(maps.shape)} has no (rows, cols) grid", "pass (..., rows, cols)")
    lead, (rows, cols) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, rows, cols)  # (M, 1, rows, cols)
    x = x.float() if not x.is_floating_point() else x
    if mode == "nearest":
        out = F.interpolate(x, size=(H, W), mode="nearest-exact")
    else:
        out = F.interpolate(x, size=(H, W), mode=mode, align_corners=False)
        if mode == "bicubic":
            lo = x.amin(dim=(-2, -1), keepdim=True)
            hi = x.amax(dim=(-2, -1), keepdim=True)
            out = torch.maximum(torch.minimum(out, hi), lo)
    return out.reshape(*lead, H, W)
