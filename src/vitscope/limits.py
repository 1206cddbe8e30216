"""Input limits: how large an image vitscope decodes, how many tokens a capture may have, how much attention
memory it may need, and how many pixels a figure may have.

Every limit is per call: pass it to the function (``load_image(..., max_pixels=)``, ``capture(..., max_tokens=,
max_bytes=)``, ``save_figure(..., max_pixels=)``, ``read_video(..., max_video_pixels=)``), or set it for a block
of code with `limits`::

    with vitscope.limits.limits(max_pixels=400_000_000):
        attn = vitscope.capture(vit, "huge_scan.png", queries="cls", size=1024)

`limits` uses context variables, so it holds for the current thread / task only and PIL's process-wide
``Image.MAX_IMAGE_PIXELS`` is never changed. A value of ``None`` inside `limits` keeps the default.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from vitscope.errors import VitscopeError

#: Largest decoded input image, in pixels (a 1 MB PNG can decode to gigabytes).
MAX_PIXELS = 100_000_000
#: Most tokens (prefix + patches) one capture may feed the model: its own attention costs ``N^2`` per head.
MAX_TOKENS = 20_000
#: Largest estimated attention memory of one capture (captured probabilities + scratch), in bytes.
MAX_BYTES = 4 * 2**30
#: Largest decoded video, in pixels over all its frames (frames x height x width): a small file of a still scene can
#: decode to hours of frames. Each frame is also held to `MAX_PIXELS`.
MAX_VIDEO_PIXELS = 20_000_000_000
#: Largest figure written or rendered, in pixels (width x height at the chosen dpi).
MAX_FIGURE_PIXELS = 50_000_000
#: Largest dpi of a raster figure.
MAX_DPI = 1200

_pixels: ContextVar[int | None] = ContextVar("vitscope_max_pixels", default=None)
_tokens: ContextVar[int | None] = ContextVar("vitscope_max_tokens", default=None)
_bytes: ContextVar[int | None] = ContextVar("vitscope_max_bytes", default=None)
_figure_pixels: ContextVar[int | None] = ContextVar("vitscope_max_figure_pixels", default=None)
_video_pixels: ContextVar[int | None] = ContextVar("vitscope_max_video_pixels", default=None)


def max_pixels(value: int | None = None) -> int:
    """``value`` if given, else the `limits` in force, else `MAX_PIXELS`."""
    return int(value if value is not None else _pixels.get() or MAX_PIXELS)


def max_tokens(value: int | None = None) -> int:
    return int(value if value is not None else _tokens.get() or MAX_TOKENS)


def max_bytes(value: int | None = None) -> int:
    return int(value if value is not None else _bytes.get() or MAX_BYTES)


def max_figure_pixels(value: int | None = None) -> int:
    return int(value if value is not None else _figure_pixels.get() or MAX_FIGURE_PIXELS)


def max_video_pixels(value: int | None = None) -> int:
    """``value`` if given, else the `limits` in force, else `MAX_VIDEO_PIXELS` (frames x pixels of one video)."""
    return int(value if value is not None else _video_pixels.get() or MAX_VIDEO_PIXELS)


def check_limit(name: str, value: object) -> int:
    """``value`` as a limit: a whole number >= 1 (an int, or a finite float, rounded down), else a
    `VitscopeError` naming ``name``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or int(value) < 1:  # type: ignore[call-overload]
        raise VitscopeError(name, f"must be a positive whole number, got {value!r}",
                            "pass a positive number; None keeps the default")
    return int(value)  # type: ignore[call-overload]


@contextmanager
def limits(
    *, max_pixels: int | None = None, max_tokens: int | None = None, max_bytes: int | None = None,
    max_figure_pixels: int | None = None, max_video_pixels: int | None = None,
) -> Iterator[None]:
    """Raise or lower vitscope's input limits inside a ``with`` block (this thread/task only). Each must be a
    positive whole number (a finite float is rounded down)."""
    for name, value in (("max_pixels", max_pixels), ("max_tokens", max_tokens), ("max_bytes", max_bytes),
                        ("max_figure_pixels", max_figure_pixels), ("max_video_pixels", max_video_pixels)):
        if value is not None:
            check_limit(name, value)
    tokens = [
        var.set(int(value) if value is not None else var.get())
        for var, value in ((_pixels, max_pixels), (_tokens, max_tokens), (_bytes, max_bytes),
                           (_figure_pixels, max_figure_pixels), (_video_pixels, max_video_pixels))
    ]
    try:
        yield
    finally:
        for var, token in zip((_pixels, _tokens, _bytes, _figure_pixels, _video_pixels), tokens, strict=True):
            var.reset(token)


def _human(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def check_tokens(tokens: int, grid: tuple[int, int] | None = None, limit: int | None = None,
                 argument: str = "size") -> None:
    """Refuse more than ``limit`` tokens (default `vitscope.limits.max_tokens`), naming the grid."""
    cap = max_tokens(limit)
    if tokens > cap:
        where = f"a {grid[0]}x{grid[1]} patch grid = " if grid is not None else ""
        raise VitscopeError(
            argument, f"the input gives {where}{tokens:,} tokens, more than the {cap:,}-token limit (the model's own "
            f"attention grows with tokens^2: one {tokens:,} x {tokens:,} float32 matrix is {_human(4 * tokens**2)})",
            "pass a smaller size, or raise max_tokens (CLI --max-tokens)",
        )
