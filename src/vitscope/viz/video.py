"""Video figures: a frames x heads grid of one query's attention, and an animated GIF of a map over the frames.

Both take a video's `Attentions` (``frames > 1``) or its per-frame maps ``(T', rows, cols)`` and the frames as
RGB (``(T, H, W, 3)`` uint8, or the pixel values ``(B, T, C, H, W)`` with the model's mean and std). Token frame
``t'`` covers input frames ``t' * tubelet .. (t' + 1) * tubelet - 1``: the grid shows each token frame over the
first of its input frames, the GIF shows every input frame with its token frame's map. One colour scale spans
every frame (and, in the grid, every head), so a frame the model ignores looks dark rather than rescaled.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vitscope.errors import VitscopeError
from vitscope.layout import per_frame
from vitscope.viz._render import colormap_table, upsample

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vitscope.attentions import Attentions

__all__ = ["frames_head_grid", "frames_rgb", "save_video_gif"]


def frames_rgb(video: Any, mean: Any = None, std: Any = None, batch: int = 0) -> np.ndarray:
    """The frames of one video as uint8 RGB ``(T, H, W, 3)``: from pixel values ``(B, T, C, H, W)`` (normalised
    with ``mean``/``std``; default none) or from an array ``(T, H, W, 3)`` as it is."""
    if isinstance(video, torch.Tensor):
        from vitscope.images import pixels_to_rgb

        if video.dim() != 5:
            raise VitscopeError("video", f"pixel values of shape {tuple(video.shape)}", "pass (B, T, C, H, W)")
        C = int(video.shape[2])
        out: np.ndarray = pixels_to_rgb(video[batch], mean if mean is not None else (0.0,) * C,
                                        std if std is not None else (1.0,) * C)
        return out
    arr = np.asarray(video)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise VitscopeError("video", f"frames of shape {arr.shape}", "pass uint8 RGB frames (T, H, W, 3)")
    return arr.astype(np.uint8)


def _video_maps(maps: Any, argument: str = "maps") -> np.ndarray:
    m = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
    if m.ndim != 3:
        raise VitscopeError(argument, f"maps of shape {m.shape}", "pass one video's maps (T', rows, cols)")
    return m


def frames_head_grid(
    frames: Any, attn: Attentions, *, layer: int = -1, query: Any = None, batch: int = 0, cmap: str = "inferno",
    alpha: float = 0.6, panel: float = 1.6,
) -> Figure:
    """Token frames (rows) x heads (columns, then the head mean) of one query's attention over the patches of
    each frame, on one colour scale.

    Args:
        frames: the video's RGB frames ``(T, H, W, 3)`` (`frames_rgb`).
        attn: a video's `Attentions` (the query row of ``layer`` captured, every head or ``"mean"``).
        query: as `vitscope.methods.cls_map` (default [CLS], or the mean over patch rows without one).
    """
    from vitscope.viz._render import head_maps
    from vitscope.viz.figures import _check_alpha as check_alpha
    from vitscope.viz.figures import _check_cmap as check_cmap
    from vitscope.viz.figures import _figure, overlay

    check_cmap(cmap)
    check_alpha(alpha)
    if attn.frames < 2:
        raise VitscopeError("attn", "these attentions are of an image (frames=1)", "use viz.head_grid for images")
    rgb = frames_rgb(frames)
    maps, labels = head_maps(attn, layer=layer, query=query, batch=batch)  # (heads, T' * rows, cols)
    per = per_frame(maps, attn.frames)  # (heads, T', rows, cols)
    if len(labels) > 1:
        per = np.concatenate([per, per.mean(axis=0, keepdims=True)])
        labels = [*labels, "mean"]
    n_heads, T = per.shape[0], attn.frames
    if rgb.shape[0] < T * attn.tubelet:
        raise VitscopeError("frames", f"{rgb.shape[0]} frames for {T} token frames of {attn.tubelet}",
                            "pass the video's frames")
    H, W = rgb.shape[1:3]
    lo, hi = float(per.min()), float(per.max())
    fig = _figure(panel * n_heads * W / max(H, W) + 0.8, panel * T * H / max(H, W) + 0.4)
    axes = np.atleast_2d(fig.subplots(T, n_heads, squeeze=False))
    artist = None
    for t in range(T):
        for h in range(n_heads):
            ax = axes[t, h]
            artist = overlay(ax, rgb[t * attn.tubelet], per[h, t], cmap=cmap, alpha=alpha, vmin=lo, vmax=hi,
                             note_uniform=False)
            if t == 0:
                ax.set_title(f"head {labels[h]}" if labels[h] != "mean" else "mean", fontsize=8)
            if h == 0:
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_ylabel(f"frame {t * attn.tubelet}" + (f"-{(t + 1) * attn.tubelet - 1}" if attn.tubelet > 1
                                                              else ""), fontsize=8)
    if artist is not None:
        fig.colorbar(artist, ax=axes, shrink=0.6, label="attention")
    return fig


def save_video_gif(
    frames: Any, maps: Any, path: str | os.PathLike[str], *, tubelet: int = 1, alpha: float = 0.5,
    cmap: str = "inferno", duration_ms: int = 200,
) -> Path:
    """Write an animated GIF (atomically): input frame ``t`` with the map of its token frame ``t // tubelet``
    upsampled and coloured on one scale over the whole clip, blended with weight ``alpha``.

    Args:
        frames: RGB frames ``(T, H, W, 3)`` (`frames_rgb`).
        maps: one video's maps ``(T', rows, cols)`` (``video_maps(...).map[b]``).
    """
    from PIL import Image

    from vitscope._io import atomic_write_bytes

    rgb = frames_rgb(frames)
    m = _video_maps(maps)
    if not 0.0 <= alpha <= 1.0:
        raise VitscopeError("alpha", f"{alpha} is outside [0, 1]", "use e.g. 0.5")
    if isinstance(duration_ms, bool) or not isinstance(duration_ms, int) or duration_ms < 1:
        raise VitscopeError("duration_ms", f"{duration_ms!r} is not a positive number of milliseconds", "use e.g. 200")
    if rgb.shape[0] != m.shape[0] * tubelet:
        raise VitscopeError("maps", f"{m.shape[0]} token frames of {tubelet} for {rgb.shape[0]} frames",
                            "pass the frames the maps were computed on")
    H, W = rgb.shape[1:3]
    lo, hi = float(m.min()), float(m.max())
    lut = colormap_table(cmap).astype(np.float32)  # (256, 3)
    images = []
    for t in range(rgb.shape[0]):
        up = upsample(m[t // tubelet], (H, W), "bilinear")  # (H, W)
        index = (np.clip((up - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8) if hi > lo else \
            np.zeros((H, W), np.uint8)
        blended = (1 - alpha) * rgb[t].astype(np.float32) + alpha * lut[index]
        images.append(Image.fromarray((blended.clip(0, 255) + 0.5).astype(np.uint8)))
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return atomic_write_bytes(Path(path), buf.getvalue())


def save_video_map(
    model: Any, video: Any, method: str, out: str | os.PathLike[str], *, stem: str = "video",
    params: dict[str, Any] | None = None, policy: Any = None, size: Any = None,
) -> tuple[Path, Path, Any]:
    """Compute ``method``'s per-frame maps of one or more videos (`vitscope.video_maps`) and write an ``.npz``
    (``map`` ``(B, T', rows, cols)``, ``profile`` ``(B, T')``, ``meta_json``) and an animated GIF of the first
    video's overlay (`save_video_gif`). ``out``: as `vitscope.viz.export.output_paths` (the GIF beside the npz).
    ``params``: the CLI's options, given to the method where it declares them. Returns ``(npz, gif, maps)``."""
    import json

    from vitscope._io import atomic_savez
    from vitscope.capture.prepare import prepare
    from vitscope.methods.api import get_method
    from vitscope.methods.video import video_maps
    from vitscope.viz.export import output_paths

    spec = get_method(method, argument="--method")
    npz, png = output_paths(out, stem, spec.name)
    gif = png.with_suffix(".gif")
    vit, pixels = prepare(model, video, policy=policy, size=size)
    if not vit.info.frames:
        raise VitscopeError("model", f"{vit.info.name} is an image model", "pass a video model (VideoMAE, ViViT, ...)")
    given = {k: v for k, v in (params or {}).items() if k in spec.params}
    result = video_maps(vit, pixels, spec.name, **given)
    prep = vit.info.preprocess
    meta = {**result.meta, "model": vit.info.name, "image_size": list(pixels.shape[-2:]),
            "patch_size": list(vit.info.patch_size), "prefix": list(vit.info.prefix)}
    atomic_savez(npz, {"map": result.map.float().cpu().numpy(), "profile": result.profile.cpu().numpy(),
                       "meta_json": np.array(json.dumps(meta, default=str))})
    save_video_gif(frames_rgb(pixels, prep.mean, prep.std), result.map[0], gif, tubelet=result.tubelet)
    return npz, gif, result


def video_heads_figure(model: Any, video: Any, *, layer: int = -1, query: Any = None, cmap: str = "inferno",
                       alpha: float = 0.6, policy: Any = None, size: Any = None) -> Figure:
    """`frames_head_grid` of one video (a frames folder, frames or ``(1, T, C, H, W)`` pixels): ``layer``'s
    rows captured once (every head), the frames shown as the model saw them."""
    from vitscope.capture.core import capture
    from vitscope.capture.prepare import prepare

    vit, pixels = prepare(model, video, policy=policy, size=size)
    if not vit.info.frames:
        raise VitscopeError("model", f"{vit.info.name} is an image model", "pass a video model")
    if int(pixels.shape[0]) != 1:
        raise VitscopeError("images", f"{int(pixels.shape[0])} videos given", "draw one video at a time")
    attn = capture(vit, pixels, layers=[layer])
    prep = vit.info.preprocess
    return frames_head_grid(frames_rgb(pixels, prep.mean, prep.std), attn, layer=layer, query=query, cmap=cmap,
                            alpha=alpha)
