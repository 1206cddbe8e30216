"""Reading videos into the pixel values a video transformer wants: ``(B, T, C, H, W)``.

A video is given as a video file (``.mp4``, ``.mkv``, ``.webm``, ... read with PyAV: the optional extra
``pip install vitscope[video]``), a folder of frames (image files, read in name order), a list of frames (paths,
PIL images, arrays), or a tensor ``(B, T, C, H, W)`` of pixel values used as is. A batch is a list of them. Each
frame is preprocessed like an image (`vitscope.images`: the model's size, mean and std, the same pixel limits).

Frame sampling (`sample_indices`), the same for a video file and a frames folder, ``T`` frames out of ``n``:

- with the family's sample rate ``r`` (`SAMPLE_RATES`: VideoMAE's Kinetics recipe takes 16 frames ``r = 4`` apart)
  and ``n >= T * r``: the ``T`` frames ``start + i * r`` of the window of ``T * r`` frames centred in the clip
  (``start = (n - T * r) // 2``), as VideoMAE's evaluation samples one clip (its random window made central);
- otherwise (no rate: ViViT, V-JEPA 2, a model vitscope knows no recipe for; or a clip shorter than the window):
  ``round(i * (n - 1) / (T - 1))``, ``T`` indices spread evenly over the whole clip, first and last included (a
  longer clip is subsampled, a shorter one repeats frames).

Limits: a video file's frame size is held to `vitscope.limits.max_pixels` (as an image) and its frames x pixels to
`vitscope.limits.max_video_pixels` (default 20 gigapixels), both read from the container before any frame is
decoded and counted again while decoding; only the sampled frames are kept in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscope import limits
from vitscope.errors import ImageError, VitscopeError
from vitscope.images import check_pixels, check_size_policy
from vitscope.layout import Preprocess, SizePolicy

__all__ = ["FRAME_SUFFIXES", "SAMPLE_RATES", "VIDEO_SUFFIXES", "VideoFrames", "family_sample_rate", "frame_files",
           "is_video_file", "load_clip", "preprocess_video", "read_video", "sample_indices"]

#: image files read as frames of a frames folder
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
#: video files read with PyAV (the ``video`` extra)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ogv", ".wmv", ".flv", ".ts")
#: a family's frame sample rate (its config's ``model_type`` -> input frames between two sampled frames)
SAMPLE_RATES = {"videomae": 4}


def family_sample_rate(module: Any) -> int | None:
    """The sample rate of ``module``'s family (`SAMPLE_RATES`, by its config's ``model_type``), else ``None``."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return SAMPLE_RATES.get(str(model_type)) if model_type else None


def sample_indices(available: int, frames: int, rate: int | None = None) -> list[int]:
    """``frames`` indices out of ``available`` frames (the module's rule): with ``rate`` and ``available >= frames
    * rate``, ``start + i * rate`` with the window centred (``start = (available - frames * rate) // 2``); else
    ``round(i * (available - 1) / (frames - 1))``, spread evenly over the clip (first and last included)."""
    if available < 1:
        raise ImageError("images", "the video has no frames", "pass a video file, a folder of frame images or a "
                         "list of frames")
    if rate is not None and rate >= 1 and available >= frames * rate:
        start = (available - frames * rate) // 2
        return [start + i * rate for i in range(frames)]
    if frames == 1:
        return [0]
    return [round(i * (available - 1) / (frames - 1)) for i in range(frames)]


def is_video_file(path: Any) -> bool:
    """Whether ``path`` names a file with a video suffix (`VIDEO_SUFFIXES`)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() in VIDEO_SUFFIXES and \
        Path(path).is_file()


def _pyav(argument: str) -> Any:
    try:
        import av
    except ImportError:
        raise VitscopeError(argument, "reading video files needs PyAV, vitscope's optional 'video' extra",
                            "pip install 'vitscope[video]' (or pass a folder of frame images)") from None
    return av


@dataclass(frozen=True)
class VideoFrames:
    """Frames read from a video file.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8 RGB, the sampled frames in order.
        indices: each one's index among the decoded frames of the file's first video stream.
        total: the frames of that stream.
        fps: its average frame rate (``None`` when the container does not say).
    """

    frames: np.ndarray
    indices: tuple[int, ...]
    total: int
    fps: float | None


def _count(av: Any, path: Path, argument: str, cap_frame: int, cap_total: int) -> tuple[int, float | None]:
    """Frames of the first video stream (its packets counted: nothing decoded) and its frame rate; the frame size
    and frames x pixels checked against the limits."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ImageError(argument, f"{path} holds no video stream", "pass a video file")
        stream = container.streams.video[0]
        h, w = int(stream.codec_context.height), int(stream.codec_context.width)
        check_pixels(w, h, cap_frame, argument, what=f"a frame of {path}")
        count = 0
        for packet in container.demux(stream):
            if packet.size:  # the demuxer's last packet (a flush) holds no frame
                count += 1
                if count * h * w > cap_total:
                    raise _too_long(path, count, h, w, count * h * w, cap_total, argument)
        rate = stream.average_rate
        return count, float(rate) if rate else None


def _too_long(path: Path, frames: int, h: int, w: int, total: int, cap: int, argument: str) -> ImageError:
    return ImageError(
        argument, f"{path} has at least {frames:,} frames of {w}x{h} = {total:,} pixels, more than the {cap:,}-pixel "
        "video limit (frames x height x width)", "cut the clip shorter, or raise max_video_pixels (CLI "
        "--max-video-pixels, in gigapixels)",
    )


def _decode(av: Any, path: Path, wanted: list[int], argument: str, cap_frame: int, cap_total: int,
            ) -> tuple[dict[int, np.ndarray], int]:
    """The frames at ``wanted`` (decoded up to the last of them) and how many frames were decoded."""
    keep, last = set(wanted), max(wanted)
    got: dict[int, np.ndarray] = {}
    decoded = pixels = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            h, w = int(frame.height), int(frame.width)
            check_pixels(w, h, cap_frame, argument, what=f"a frame of {path}")
            pixels += h * w
            if pixels > cap_total:  # more than its packets said (or frames of another size)
                raise _too_long(path, decoded + 1, h, w, pixels, cap_total, argument)
            if decoded in keep:
                got[decoded] = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
            decoded += 1
            if decoded > last:
                break
    return got, decoded


def read_video(
    path: str | os.PathLike[str], frames: int | None = None, *, sample_rate: int | None = None,
    argument: str = "video", max_pixels: int | None = None, max_video_pixels: int | None = None,
) -> VideoFrames:
    """Read ``frames`` frames of a video file (all of them when ``None``), sampled by `sample_indices` with
    ``sample_rate``, as RGB (PyAV, ``pip install vitscope[video]``; the first video stream).

    The frame size is refused over ``max_pixels`` (default `vitscope.limits.max_pixels`) and the stream over
    ``max_video_pixels`` frames x pixels (default `vitscope.limits.max_video_pixels`), from the container's
    packets before any frame is decoded; frames are decoded up to the last sampled one. Errors are one-line
    `ImageError` s naming ``argument``.

    Example:
        >>> clip = read_video("clip.mp4", 16, sample_rate=4)  # doctest: +SKIP
        >>> clip.frames.shape, clip.indices[:3]  # (16, 240, 320, 3), (x, x + 4, x + 8)  # doctest: +SKIP
    """
    av = _pyav(argument)
    p = Path(path)
    if not p.is_file():
        raise ImageError(argument, f"file not found: {p}" if not p.exists() else f"{p} is not a file",
                         "check the path")
    if p.stat().st_size == 0:
        raise ImageError(argument, f"{p} is empty (0 bytes)", "pass a valid video file")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise VitscopeError("frames", f"must be a whole number >= 1, got {frames!r}", "pass e.g. 16")
    if sample_rate is not None and (isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or
                                    sample_rate < 1):
        raise VitscopeError("sample_rate", f"must be a whole number >= 1, got {sample_rate!r}", "pass e.g. 4, or None")
    cap_frame, cap_total = limits.max_pixels(max_pixels), limits.max_video_pixels(max_video_pixels)
    try:
        total, fps = _count(av, p, argument, cap_frame, cap_total)
        for _ in range(2):  # a stream whose packets are not one frame each: sampled again from the frames decoded
            if total < 1:
                raise ImageError(argument, f"{p} holds no frames", "pass a video file with at least one frame")
            indices = list(range(total)) if frames is None else sample_indices(total, frames, sample_rate)
            got, decoded = _decode(av, p, indices, argument, cap_frame, cap_total)
            if len(got) == len(set(indices)):
                break
            total = decoded
        else:
            raise ImageError(argument, f"cannot decode the frames of {p}", "check the file is a complete video")
    except av.error.FFmpegError as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(argument, f"cannot read {p} as a video: {msg}", "check the file is a complete video "
                         "(mp4, mkv, webm, ...)") from None
    shapes = {a.shape for a in got.values()}
    if len(shapes) > 1:
        raise ImageError(argument, f"the frame size of {p} changes within the clip ({sorted(shapes)})",
                         "re-encode the clip at one size")
    return VideoFrames(frames=np.stack([got[i] for i in indices]), indices=tuple(indices), total=total, fps=fps)


def frame_files(folder: str | os.PathLike[str], argument: str = "images") -> list[Path]:
    """The frame images of ``folder`` in name order, or a one-line error when it holds none."""
    path = Path(folder)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ImageError(argument, f"folder {path} holds no frame images ({', '.join(FRAME_SUFFIXES)})",
                         "pass a folder of video frames (one image per frame, in name order)")
    return files


def load_clip(
    video: Any, prep: Preprocess, patch: tuple[int, int], frames: int, policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None, sample_rate: int | None = None, argument: str = "images",
    max_pixels: int | None = None, max_video_pixels: int | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One video (a video file, a frames folder, a list of frames or one image: a still clip) -> pixel values
    ``(T, C, H, W)`` with ``T = frames`` sampled by `sample_indices` (``sample_rate``), and the first sampled
    frame's own ``(height, width)``. Errors are one-line `ImageError` s naming ``argument``."""
    from vitscope.images import image_to_pixels, load_image

    chosen: list[Any]
    if is_video_file(video):
        chosen = list(read_video(video, frames, sample_rate=sample_rate, argument=argument, max_pixels=max_pixels,
                                 max_video_pixels=max_video_pixels).frames)
    else:
        if isinstance(video, (str, os.PathLike)) and Path(video).is_dir():
            items: list[Any] = list(frame_files(video, argument))
        elif isinstance(video, (list, tuple)):
            items = list(video)
        else:
            items = [video]  # one image: a still video (its frame repeated)
        chosen = [items[i] for i in sample_indices(len(items), frames, sample_rate)]
    images = [load_image(f, argument, max_pixels=max_pixels) for f in chosen]
    try:
        clip = torch.stack([image_to_pixels(im, prep, patch, policy, size, argument=argument) for im in images])
    except ImageError as exc:
        raise ImageError(argument, exc.problem, exc.fix) from None
    except RuntimeError:  # torch.stack: frames of different sizes under policy="native"
        raise ImageError(argument, "the frames preprocess to different sizes", "pass size=(H, W) or policy="
                         "'resize'") from None
    return clip, (images[0].height, images[0].width)


def preprocess_video(
    videos: Any, prep: Preprocess, patch: tuple[int, int], frames: int, policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None, sample_rate: int | None = None,
) -> torch.Tensor:
    """Videos -> pixel values ``(B, T, C, H, W)`` with ``T = frames`` (a tensor: checked, returned as is).

    Args:
        videos: a video file or a frames folder, a list of frames (one video), a list of video files, frames
            folders or frame lists (a batch), or a tensor ``(B, T, C, H, W)``.
        prep, patch: the model's preprocessing and patch size (`vitscope.images.preprocess`).
        frames: the frames the model takes; a clip with another count is sampled (`sample_indices`).
        sample_rate: the family's sample rate (`family_sample_rate`; ``None``: spread evenly over the clip).
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
        isinstance(v, (list, tuple)) or (isinstance(v, (str, os.PathLike)) and Path(v).is_dir()) or is_video_file(v)
        for v in videos)
    if isinstance(videos, (list, tuple)) and not videos:
        raise ImageError("images", "no frames given", "pass a frames folder or a list of frames")
    items = list(videos) if batch else [videos]
    check_size_policy(policy, size)
    clips = [load_clip(v, prep, patch, frames, policy, size, sample_rate, f"images[{i}]" if batch else "images")[0]
             for i, v in enumerate(items)]
    shapes = {tuple(c.shape) for c in clips}
    if len(shapes) > 1:
        raise ImageError("images", f"the videos preprocess to different sizes {sorted(shapes)}",
                         "pass size=(H, W) or policy='resize', or capture them one at a time")
    return torch.stack(clips)  # (B, T, C, H, W)
