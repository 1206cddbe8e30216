"""Reading images of any kind into RGB, and turning them into the pixel values a model wants.

Accepts paths, PIL images, numpy arrays (HxW, HxWxC; uint8, uint16 or float in [0, 1]) and lists of them.
Grayscale, RGBA/LA (composited over white), palette, CMYK and 16-bit images are converted to 8-bit RGB.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vitscope import limits
from vitscope.errors import ImageError
from vitscope.layout import Preprocess, SizePolicy, native_grid

#: Default largest image (in pixels) vitscope decodes; per call: ``load_image(..., max_pixels=)`` or
#: `vitscope.limits.limits`. PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` is left as it is.
MAX_PIXELS = limits.MAX_PIXELS
_PIL_GUARD = threading.Lock()

ImageLike = str | os.PathLike[str] | Image.Image | np.ndarray
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _from_array(arr: np.ndarray, argument: str) -> Image.Image:
    if arr.dtype.kind not in "biuf":  # object, complex, strings, datetimes: no pixel values
        raise ImageError(argument, f"array of dtype {arr.dtype} holds no pixel values",
                         "pass a uint8, uint16, float or bool array")
    if arr.size == 0:
        raise ImageError(argument, f"array has zero size (shape {arr.shape})", "pass a non-empty HxW or HxWxC array")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(argument, f"array of shape {arr.shape} is not an image", "expected HxW, HxWx3 or HxWx4")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(argument, "float array contains NaN or inf", "clean the array first")
        hi = 255.0 if arr.max() > 1.0 else 1.0
        arr = (np.clip(arr / hi, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def to_rgb(img: Image.Image, argument: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited over white, 16-bit scaled, not clipped)."""
    if img.width == 0 or img.height == 0:
        raise ImageError(argument, "image has zero size", "pass an image with at least one pixel")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0
        img = Image.fromarray((np.clip(arr / hi, 0, 1) * 255 + 0.5).astype(np.uint8))
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = 255.0 if arr.max() > 1.0 else 1.0
        img = Image.fromarray((np.clip(arr / hi, 0, 1) * 255 + 0.5).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@contextmanager
def _header_only(limit: int) -> Iterator[None]:
    """Let ``Image.open`` read the header of an image up to ``limit`` pixels (vitscope checks the size itself).

    PIL refuses (or warns about) large images when it opens them, by its process-wide ``MAX_IMAGE_PIXELS``.
    Below twice that only its warnings are silenced here; above it, the guard is lifted for the header read
    alone, under a lock, and restored at once: pixels are decoded only after vitscope's own check.
    """
    with warnings.catch_warnings():
        # PIL's bomb warning (vitscope checks the size itself) and its notes on odd tags of damaged files: the
        # file is either read or refused with one line, never a stream of warnings
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pil_limit is None or limit <= 2 * pil_limit:
            yield
            return
        with _PIL_GUARD:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def check_pixels(width: int, height: int, limit: int | None = None, argument: str = "image", what: str = "") -> None:
    """Refuse an image of more than ``limit`` pixels (default `vitscope.limits.max_pixels`) before decoding it."""
    cap = limits.max_pixels(limit)
    if width * height > cap:
        raise ImageError(
            argument, f"{what or 'image'} is {width}x{height} = {width * height:,} pixels, more than the {cap:,} "
            "pixel limit", "downscale it, or raise max_pixels (CLI --max-pixels, in megapixels)",
        )


def open_image(im: Image.Image) -> Image.Image:
    """Decode an opened PIL image, turned upright by its EXIF orientation, as 8-bit RGB."""
    im.load()
    upright = ImageOps.exif_transpose(im)
    return to_rgb(upright if upright is not None else im)


def load_image(image: ImageLike, argument: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open ``image`` (path, PIL image or array) as 8-bit RGB, with one-line errors for bad inputs.

    Files are turned upright by their EXIF orientation. A file of more than ``max_pixels`` pixels (default
    `vitscope.limits.max_pixels`) is refused from its header, before any pixel is decoded.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image, argument)
    if isinstance(image, np.ndarray):
        return to_rgb(_from_array(image, argument), argument)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageError(argument, f"file not found: {path}", "check the path")
        if path.is_dir():
            raise ImageError(argument, f"{path} is a folder", "pass an image file (or use `vitscope batch` for folders)")
        if not os.access(path, os.R_OK):
            raise ImageError(argument, f"cannot read {path}: permission denied", "check the file's permissions")
        if path.stat().st_size == 0:
            raise ImageError(argument, f"{path} is empty (0 bytes)", "pass a valid image file")
        cap = limits.max_pixels(max_pixels)
        try:
            with _header_only(cap), Image.open(path) as im:
                check_pixels(im.width, im.height, cap, argument, what=str(path))
                return to_rgb(open_image(im), argument)
        except UnidentifiedImageError:
            raise ImageError(argument, f"{path} is not an image PIL can read", "pass a PNG, JPEG, ... file") from None
        except Image.DecompressionBombError:  # PIL's own guard fired at open: say the size and the limit
            with _header_only(2**62), Image.open(path) as im:
                check_pixels(im.width, im.height, cap, argument, what=str(path))
            raise ImageError(argument, f"{path} is too large to decode safely", "downscale it first") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            if isinstance(exc, ImageError):
                raise
            msg = " ".join(str(exc).split()) or type(exc).__name__
            raise ImageError(argument, f"cannot read {path}: {msg}", "check the file is a complete image") from None
    raise ImageError(argument, f"unsupported type {type(image).__name__}", "pass a path, PIL image or numpy array")


_POLICIES = ("resize", "crop", "native")


def check_size_policy(policy: Any, size: Any) -> None:
    """``policy`` one of ``resize``/``crop``/``native`` (or ``None``: the model's), ``size`` ``None``, a positive
    int or a ``(height, width)`` pair of them; else a one-line error naming the argument."""
    if policy is not None and (not isinstance(policy, str) or policy not in _POLICIES):
        raise ImageError("policy", f"unknown size policy {policy!r}", "use 'resize', 'crop' or 'native'")
    if size is None:
        return
    pair = isinstance(size, (tuple, list))
    sides = tuple(size) if pair else (size,)
    shaped = len(sides) == 2 if pair else isinstance(size, (int, np.integer))
    if not shaped or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 for v in sides):
        raise ImageError("size", f"must be a positive int or (height, width), got {size!r}",
                         "pass e.g. size=224 or size=(224, 320)")


def _target_size(
    w: int, h: int, prep: Preprocess, patch: tuple[int, int], policy: SizePolicy, size: int | tuple[int, int] | None
) -> tuple[int, int]:
    """Output (height, width) for an image of (w, h) under ``policy``/``size``."""
    ph, pw = patch
    check_size_policy(policy, size)
    if size is not None:
        if isinstance(size, (int, np.integer)):
            # shorter side to `size`, aspect kept, sides rounded to a multiple of the patch
            scale = size / min(w, h)
            th, tw = max(ph, round(h * scale / ph) * ph), max(pw, round(w * scale / pw) * pw)
        else:
            th, tw = int(size[0]), int(size[1])
        return th, tw
    if policy == "resize":
        return prep.image_size
    if policy == "crop":
        return (h // ph) * ph, (w // pw) * pw
    if policy == "native":
        if prep.max_patches is not None:  # a variable-resolution model: aspect kept, within its patch budget
            rows, cols = native_grid(h, w, patch, prep.max_patches)
            return rows * ph, cols * pw
        return max(ph, round(h / ph) * ph), max(pw, round(w / pw) * pw)
    raise ImageError("policy", f"unknown size policy {policy!r}", "use 'resize', 'crop' or 'native'")


def image_to_pixels(
    img: Image.Image,
    prep: Preprocess,
    patch: tuple[int, int],
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    argument: str = "image",
) -> torch.Tensor:
    """One RGB PIL image -> normalised pixel values ``(C, H, W)``. Errors name ``argument``."""
    from vitscope.limits import check_tokens

    policy = policy or prep.policy
    th, tw = _target_size(img.width, img.height, prep, patch, policy, size)
    grid = (th // patch[0], tw // patch[1])
    check_tokens(grid[0] * grid[1], grid, argument="size")  # before resizing to a huge input
    if th < patch[0] or tw < patch[1]:
        raise ImageError(
            argument,
            f"{img.width}x{img.height} image gives {tw}x{th} input, smaller than one {patch[1]}x{patch[0]} patch",
            "use a larger image or `policy='resize'`",
        )
    if not prep.dynamic_size and (th, tw) != tuple(prep.image_size):
        raise ImageError(
            "size", f"this model only accepts {prep.image_size[0]}x{prep.image_size[1]} inputs, not {th}x{tw}",
            "use `policy='resize'`",
        )
    if policy == "crop" and size is None:
        # DINO's way: keep the resolution, crop (top-left anchored) to a multiple of the patch size
        img = img.crop((0, 0, tw, th))
    elif (img.height, img.width) != (th, tw):
        img = img.resize((tw, th), _RESAMPLE.get(prep.resample, Image.Resampling.BICUBIC))
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    if prep.channels == 1:
        arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arr = arr[..., None]
    mean = np.asarray(prep.mean[: prep.channels], dtype=np.float32)
    std = np.asarray(prep.std[: prep.channels], dtype=np.float32)
    arr = (arr - mean) / std
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def pixels_to_rgb(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo `image_to_pixels`' normalisation: ``(B, C, H, W)`` -> uint8 RGB ``(B, H, W, 3)`` (1 channel repeated)."""
    C = pixels.shape[1]
    m = torch.tensor(list(mean)[:C], dtype=torch.float32).reshape(1, C, 1, 1)
    s = torch.tensor(list(std)[:C], dtype=torch.float32).reshape(1, C, 1, 1)
    x = (pixels.detach().float().cpu() * s + m).clamp(0, 1)
    if C == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def preprocess(
    images: Any,
    prep: Preprocess,
    patch: tuple[int, int],
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Images (one or a list) -> ``(B, C, H, W)``. A tensor is returned as is (already pixel values)."""
    check_size_policy(policy, size)
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ImageError("images", f"tensor of shape {tuple(images.shape)}", "pass pixel values (B, C, H, W)")
        if images.numel() == 0:
            raise ImageError("images", f"tensor of shape {tuple(images.shape)} is empty",
                             "pass at least one image of at least one pixel")
        return images
    items: Sequence[Any]
    if isinstance(images, (list, tuple)):
        items = images
    else:
        items = [images]
    if len(items) == 0:
        raise ImageError("images", "no images given", "pass at least one image")
    names = [f"images[{i}]" if len(items) > 1 else "image" for i in range(len(items))]
    tensors = [
        image_to_pixels(load_image(im, name), prep, patch, policy, size, argument=name)
        for name, im in zip(names, items, strict=True)
    ]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ImageError(
            "images", f"images preprocess to different sizes {sorted(shapes)}",
            "pass size=(H, W) or policy='resize', or capture them one at a time",
        )
    return torch.stack(tensors)
