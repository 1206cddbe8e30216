"""A video transformer's token layout, measured: which tokens are patches, and which frame, row and column each
one holds (`vitscope.capture.probe` does the same for images).

How: one batched pass of a few videos ``(M, T, C, H, W)`` through the stem only (stopped at the first attention
module's input, `vitscope.capture.probe._tokens`): a base video (seeded uniform pixels in the model's normalised
range), the base again, the base with every pixel replaced (tokens it does not move are prefix or suffix
tokens), then one video per token frame ``t'`` with the ``tubelet`` input frames of ``t'`` replaced, one per
patch row with that band of pixel rows replaced in every frame, and one per patch column likewise:
``3 + T' + rows + cols`` videos. A token's frame, row and column are the images that move it.

Checked, each a one-line `CaptureError`: a perturbation in the frames of tubelet ``t'`` moves only the tokens of
token frame ``t'`` (and each patch token moves under exactly one time image, one row image and one column image);
the patches are ``T' * rows * cols`` consecutive tokens in order ``(T', rows, cols)`` (time slowest; a model
whose tokens run ``(rows, cols, T')``, TimeSformer's, is refused with the order it has); two identical videos
give identical tokens. The result is cached per model and input geometry.
"""

from __future__ import annotations

import weakref
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import VitModel
from vitscope.capture.hooks import eval_mode
from vitscope.capture.probe import _MOVED, _SAME, _SEED, _movement, _Stop
from vitscope.errors import CaptureError

__all__ = ["VideoLayout", "check_video_layout", "probe_video_layout"]


@dataclass(frozen=True)
class VideoLayout:
    """What the probe measured: ``[prefix, patches (T' x rows x cols, time slowest), suffix]``."""

    num_prefix: int
    frames: int
    grid: tuple[int, int]
    num_suffix: int

    def describe(self) -> str:
        rows, cols = self.grid
        return (f"{self.num_prefix} prefix + {self.frames}x{rows}x{cols} (frames x rows x cols) patches + "
                f"{self.num_suffix} suffix tokens")


_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], VideoLayout]] = weakref.WeakKeyDictionary()


def _videos(vit: VitModel, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
            ) -> tuple[torch.Tensor, int, int, int]:
    """The probe videos ``(M, T, C, H, W)`` and ``(T', rows, cols)``."""
    T, C, H, W = shape
    ph, pw = vit.info.patch_size
    tub = vit.info.tubelet
    frames, rows, cols = T // tub, H // ph, W // pw
    g = torch.Generator().manual_seed(_SEED)
    pre = vit.info.preprocess
    mean = torch.tensor((list(pre.mean) * C)[:C]).view(1, C, 1, 1)
    std = torch.tensor((list(pre.std) * C)[:C]).view(1, C, 1, 1)
    base = (torch.rand(T, C, H, W, generator=g) - mean) / std
    other = (torch.rand(T, C, H, W, generator=g) - mean) / std
    out = [base, base, other]
    for t in range(frames):
        v = base.clone()
        v[t * tub:(t + 1) * tub] = other[t * tub:(t + 1) * tub]
        out.append(v)
    for r in range(rows):
        v = base.clone()
        v[:, :, r * ph:(r + 1) * ph] = other[:, :, r * ph:(r + 1) * ph]
        out.append(v)
    for c in range(cols):
        v = base.clone()
        v[:, :, :, c * pw:(c + 1) * pw] = other[:, :, :, c * pw:(c + 1) * pw]
        out.append(v)
    return torch.stack(out).to(device=device, dtype=dtype), frames, rows, cols


def _one(moved: torch.Tensor, what: str, name: str) -> torch.Tensor:
    """Per token, the one image of a group ``(K, P)`` (bool) that moves it; else a one-line error."""
    counts = moved.sum(dim=0)
    bad = (counts != 1).nonzero().flatten()
    if bad.numel():
        k = int(bad[0])
        raise CaptureError(
            "model", f"{name}: patch token {k} moves under {int(counts[k])} {what} perturbations, not exactly one: "
            "its tokens do not each hold one tubelet", "vitscope reads video ViTs whose tokens are tubelets",
        )
    return moved.float().argmax(dim=0)


def probe_video_layout(vit: VitModel, shape: tuple[int, ...], dtype: torch.dtype | None = None,
                       device: torch.device | None = None) -> VideoLayout:
    """Measure a video model's token layout at pixel shape ``(..., T, C, H, W)`` (cached per model and shape).

    Raises `CaptureError` (one line, naming ``model``) unless the tokens are ``[prefix, patches in (T', rows,
    cols) order, suffix]`` and a perturbation in one tubelet's frames moves only that token frame's tokens.
    """
    T, C, H, W = (int(s) for s in tuple(shape)[-4:])
    dtype = dtype or vit.dtype
    device = device or vit.device
    key = ((T, C, H, W), dtype, str(device), id(vit.sites[0].attn), vit.info.patch_size, vit.info.tubelet)
    cache = _cache.setdefault(vit.module, {})
    if key in cache:
        return cache[key]
    videos, frames, rows, cols = _videos(vit, (T, C, H, W), dtype, device)
    name = vit.info.name
    with torch.no_grad(), eval_mode(vit.module), suppress(_Stop):
        move = _movement(vit, videos)  # (M, N): how far each token moves under each video
    scale = float(move[2].max())
    if not scale > 0:
        raise CaptureError("model", f"{name}: no token of the first block's input depends on the pixels",
                           "vitscope reads ViTs whose tokens are computed from the video")
    if float(move[1].max()) > _SAME * scale:
        raise CaptureError("model", f"{name}: two identical videos give different tokens (random masking or "
                           "shuffling in eval mode)", "run the model without masking (bool_masked_pos=None)")
    hit = move > _MOVED * scale  # (M, N)
    moved = hit[2].nonzero().flatten()
    first, last = int(moved[0]), int(moved[-1])
    n_patches = frames * rows * cols
    if last - first + 1 != moved.numel() or moved.numel() != n_patches:
        raise CaptureError(
            "model", f"{name}: {moved.numel()} tokens depend on the pixels (tokens {first}..{last}), expected "
            f"{frames}x{rows}x{cols} = {n_patches} consecutive tubelet tokens for {T} frames (tubelet "
            f"{vit.info.tubelet}) of {H}x{W} px", "check the model's num_frames, tubelet and patch size",
        )
    patches = hit[:, first:last + 1]  # (M, P)
    t_of = _one(patches[3:3 + frames], "frame", name)
    r_of = _one(patches[3 + frames:3 + frames + rows], "row", name)
    c_of = _one(patches[3 + frames + rows:], "column", name)
    tub = vit.info.tubelet
    for t in range(frames):  # a perturbation in the frames of tubelet t moves the tokens of token frame t only
        n_moved = int((t_of == t).sum())
        if n_moved != rows * cols:
            raise CaptureError(
                "model", f"{name}: changing input frames {t * tub}..{(t + 1) * tub - 1} moves {n_moved} tokens, not "
                f"the {rows * cols} of one frame", "vitscope reads video ViTs whose tokens are tubelets",
            )
    index = torch.arange(n_patches)
    pos = (t_of * rows + r_of) * cols + c_of  # where each token sits in (T', rows, cols) order
    wrong = (pos != index).nonzero().flatten()
    if wrong.numel():
        k = int(wrong[0])
        time_last = bool(((r_of * cols + c_of) * frames + t_of == index).all())
        order = "(rows, cols, frames), frames fastest (TimeSformer's order)" if time_last else "in another order"
        raise CaptureError(
            "model", f"{name}: patch token {k} holds frame {int(t_of[k])}, row {int(r_of[k])}, column {int(c_of[k])}: "
            f"the tokens run {order}, not (frames, rows, cols)",
            "vitscope reads video tokens in (frames, rows, cols) order (VideoMAE, ViViT, V-JEPA 2)",
        )
    layout = VideoLayout(num_prefix=first, frames=frames, grid=(rows, cols), num_suffix=int(move.shape[1]) - 1 - last)
    cache[key] = layout
    return layout


def check_video_layout(vit: VitModel, pixels: torch.Tensor) -> VideoLayout:
    """Measure the layout of ``pixels`` ``(B, T, C, H, W)`` and compare it with the description (prefix count,
    token frames ``T // tubelet``, the per-frame grid, suffix count): a one-line `CaptureError` when they differ."""
    info = vit.info
    if pixels.dim() != 5:
        raise CaptureError("images", f"{info.name} is a video model: it takes (B, T, C, H, W) pixel values, got "
                           f"shape {tuple(pixels.shape)}", "pass a frames folder, a list of frames or a 5-d tensor")
    m = probe_video_layout(vit, tuple(pixels.shape[1:]), pixels.dtype, pixels.device)
    H, W = int(pixels.shape[-2]), int(pixels.shape[-1])
    rows, cols = vit.grid_for((H, W))
    declared = (info.num_prefix_tokens, info.token_frames, (rows // info.token_frames, cols), info.num_suffix_tokens)
    if (m.num_prefix, m.frames, m.grid, m.num_suffix) != declared:
        raise CaptureError(
            "model", f"{info.name}: measured {m.describe()}, but it is described with {declared[0]} prefix + "
            f"{declared[1]}x{declared[2][0]}x{declared[2][1]} patches + {declared[3]} suffix tokens",
            "the adapter does not describe this model: describe it with vitscope.wrap(...)",
        )
    return m
