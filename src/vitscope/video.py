"""Reading videos into the pixel values a video transformer wants: ``(B, T, C, H, W)``.

A video is given as a folder of frames (image files, read in name order), a list of frames (paths, PIL images,
arrays), or a tensor ``(B, T, C, H, W)`` of pixel values used as is. A batch is a list of folders (or of frame
lists). Each frame is preprocessed like an image (`vitscope.images`: the model's size, mean and std, the same
pixel limits), and ``T`` frames are sampled evenly over the clip as the video processors of VideoMAE and ViViT
expect them (``linspace`` over the frame indices: a longer clip is subsampled, a shorter one repeats frames).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vitscope.errors import ImageError
from vitscope.images import preprocess
from vitscope.layout import Preprocess, SizePolicy

__all__ = ["FRAME_SUFFIXES", "frame_files", "preprocess_video", "sample_indices"]

#: image files read as frames of a frames folder
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def sample_indices(available: int, frames: int) -> list[int]:
    """``frames`` indices spread evenly over ``available`` frames (first and last included)."""
    if available < 1:
        raise ImageError("images", "the video has no frames", "pass a folder of frame images or a list of frames")
    if frames == 1:
        return [0]
    return [round(i * (available - 1) / (frames - 1)) for i in range(frames)]


def frame_files(folder: str | os.PathLike[str], argument: str = "images") -> list[Path]:
    """The frame images of ``folder`` in name order, or a one-line error when it holds none."""
    path = Path(folder)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ImageError(argument, f"folder {path} holds no frame images ({', '.join(FRAME_SUFFIXES)})",
                         "pass a folder of video frames (one image per frame, in name order)")
    return files


def _one_video(video: Any, prep: Preprocess, patch: tuple[int, int], frames: int, policy: SizePolicy | None,
               size: int | tuple[int, int] | None, argument: str) -> torch.Tensor:
    """One video (a frames folder or a list of frames) -> ``(T, C, H, W)`` with ``T = frames``."""
    if isinstance(video, (str, os.PathLike)) and Path(video).is_dir():
        items: list[Any] = list(frame_files(video, argument))
    elif isinstance(video, (list, tuple)):
        items = list(video)
    else:
        items = [video]  # one image: a still video (its frame repeated)
    chosen = [items[i] for i in sample_indices(len(items), frames)]
    try:
        return preprocess(chosen, prep, patch, policy=policy, size=size)  # (T, C, H, W)
    except ImageError as exc:
        raise ImageError(argument, exc.problem, exc.fix) from None


def preprocess_video(
    videos: Any, prep: Preprocess, patch: tuple[int, int], frames: int, policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Videos -> pixel values ``(B, T, C, H, W)`` with ``T = frames`` (a tensor: checked, returned as is).

    Args:
        videos: a frames folder, a list of frames (one video), a list of frames folders or of frame lists (a
            batch), or a tensor ``(B, T, C, H, W)``.
        prep, patch: the model's preprocessing and patch size (`vitscope.images.preprocess`).
        frames: the frames the model takes; a clip with another count is sampled evenly (`sample_indices`).
    """
    if isinstance(videos, torch.Tensor):
        if videos.dim() != 5:
            raise ImageError(
                "images", f"a video model takes pixel values (B, T, C, H, W), got a tensor of shape "
                f"{tuple(videos.shape)}", "pass a (batch, frames, channels, height, width) tensor, e.g. x[None] "
                "for one video",
            )
        if int(videos.shape[1]) != frames:
            raise ImageError(
                "images", f"the model takes {frames} frames, the tensor has {int(videos.shape[1])}",
                f"pass {frames} frames (or a frames folder, sampled to {frames} evenly)",
            )
        if videos.numel() == 0:
            raise ImageError("images", f"tensor of shape {tuple(videos.shape)} is empty", "pass at least one frame")
        return videos
    batch = isinstance(videos, (list, tuple)) and len(videos) > 0 and all(
        isinstance(v, (list, tuple)) or (isinstance(v, (str, os.PathLike)) and Path(v).is_dir()) for v in videos)
    if isinstance(videos, (list, tuple)) and not videos:
        raise ImageError("images", "no frames given", "pass a frames folder or a list of frames")
    items = list(videos) if batch else [videos]
    clips = [_one_video(v, prep, patch, frames, policy, size, f"images[{i}]" if batch else "images")
             for i, v in enumerate(items)]
    shapes = {tuple(c.shape) for c in clips}
    if len(shapes) > 1:
        raise ImageError("images", f"the videos preprocess to different sizes {sorted(shapes)}",
                         "pass size=(H, W) or policy='resize', or capture them one at a time")
    return torch.stack(clips)  # (B, T, C, H, W)
