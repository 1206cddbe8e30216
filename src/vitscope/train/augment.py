"""Standard training augmentation with plain torch ops (no torchvision): random resized crop + horizontal flip.

One affine resampling per batch: each image gets its own crop box (area ``scale`` of the image, aspect
``ratio``, as in Szegedy et al. 2015 / torchvision's ``RandomResizedCrop``), optionally mirrored, and is
resampled bilinearly back to its own size with ``F.affine_grid`` + ``F.grid_sample``. All randomness comes
from the ``generator`` passed in, so a training step is reproducible from its seed alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Crop a random box of each image ``(B, C, H, W)`` and resize it back to ``(H, W)``, mirroring half of them.

    The box of image ``b`` has area ``s * H * W`` with ``s ~ U(scale)`` and aspect ``w / h = r`` with
    ``log r ~ U(log ratio)``, clamped to fit inside the image, at a uniformly random position.
    """
    B, _, H, W = images.shape
    dev = images.device
    u = torch.rand(B, 5, generator=generator)  # area, log-aspect, y, x, flip
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    # box size as fractions of the image side (h_frac * w_frac = area, w_frac / h_frac = aspect * H / W)
    w_frac = torch.sqrt(area * aspect * H / W).clamp(max=1.0)
    h_frac = (area / w_frac).clamp(max=1.0)
    # centre in normalised coordinates [-1, 1], keeping the box inside the image
    cy = (1 - h_frac) * (2 * u[:, 2] - 1)
    cx = (1 - w_frac) * (2 * u[:, 3] - 1)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(B)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = w_frac * sign  # output x -> input x (mirrored when sign < 0)
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h_frac
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(dev, images.dtype), [B, images.shape[1], H, W], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for ``(B, C, H, W)`` images in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s
