"""What a ViT's input and tokens look like: `Preprocess`, `SizePolicy` and `TokenLayout`.

This module imports nothing else of vitscope but its errors, so every layer (adapters, images, capture,
`Attentions`, methods) can share one definition of the token layout
``[prefix tokens..., patches (row-major), suffix tokens...]`` (suffix: e.g. YOLOS's detection tokens) and of token
indexing: ``"cls"``, ``"dist"``, ``"register:K"``, ``"det:K"``, a token index, a patch ``(row, col)``, and the
default query (``"cls"`` when the model has one, else ``"mean"``, the mean over patch query rows).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vitscope.errors import VitscopeError

SizePolicy = Literal["resize", "crop", "native"]
TokenKind = Literal["cls", "dist", "register"]
TOKEN_KINDS: tuple[str, ...] = ("cls", "dist", "register")
#: kinds of tokens after the patches: YOLOS's detection tokens, or ``"suffix"`` when nothing more is known
SUFFIX_KINDS: tuple[str, ...] = ("det", "suffix")
_QUERY_FIX = "use 'cls', 'mean', 'register:K', 'det:K', a token index or a patch (row, col)"


class TokenError(VitscopeError, IndexError):
    """A token, patch or layer selection outside what exists (also an ``IndexError``)."""


def as_index(value: Any, argument: str, what: str, fix: str) -> int:
    """``value`` as an integer index (Python, numpy or 0-d integer tensor); a bool, float, string or anything
    else is a one-line error naming ``argument`` (``1.5`` is no layer, ``True`` is not layer 1)."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):  # numpy, torch
        raise VitscopeError(argument, f"{what} {value!r} is a bool, not an index", fix)
    if getattr(value, "ndim", 0):  # a one-element array would pass as its element
        raise VitscopeError(argument, f"{what} {value!r} is an array, not an index", fix)
    try:
        return operator.index(value)
    except TypeError:
        raise VitscopeError(argument, f"{what} {value!r} is not an integer index", fix) from None


def resolve_indices(value: Any, n: int, argument: str, what: str) -> tuple[int, ...]:
    """One index or a list (tuple, range, 1-d array) of them, into ``n`` items: absolute (negatives count from
    the end), in range, each given once, at least one. Anything else is a one-line error naming ``argument``."""
    fix = f"pass one {what} index or a list of them, in [-{n}, {n - 1}]"
    if isinstance(value, (list, tuple, range)):
        items = list(value)
    elif getattr(value, "ndim", 0) >= 1:  # numpy array or tensor
        if value.ndim != 1:
            raise VitscopeError(argument, f"a {value.ndim}-d array of {what} indices", fix)
        items = list(value)
    else:
        items = [value]
    if not items:
        raise VitscopeError(argument, "empty selection", fix)
    out: dict[int, Any] = {}
    for item in items:
        i = as_index(item, argument, what, fix)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise TokenError(argument, f"{what} {i} out of range for a model with {n} {what}s", fix)
        if j in out:
            same = f" ({out[j]} and {i} are the same {what} here)" if out[j] != i else ""
            raise VitscopeError(argument, f"{what} {j} given twice{same}", "name each one once")
        out[j] = i
    return tuple(out)


@dataclass(frozen=True)
class Preprocess:
    """How the model wants its images.

    Attributes:
        image_size: default input ``(height, width)`` in pixels (the size it was trained at).
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        policy: default size policy: ``"resize"`` to ``image_size`` (the processors' way), ``"crop"`` the
            image at its own resolution down to a multiple of the patch size (DINO's way), or ``"native"``
            (resize so each side is the nearest multiple of the patch size, keeping the aspect ratio).
        resample: PIL resampling filter name used when resizing (``"bicubic"``, ``"bilinear"``).
        dynamic_size: the model accepts other sizes than ``image_size`` (positional embeddings interpolated).
        max_patches: the patch budget of a variable-resolution model (SigLIP2 NaFlex, timm NaFlexViT): under
            ``policy="native"`` each image is resized, aspect kept, to the largest grid with at most this many
            patches (`native_grid`, the NaFlex processors' rule); ``None``: no budget.
    """

    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    policy: SizePolicy = "resize"
    resample: str = "bicubic"
    dynamic_size: bool = True
    channels: int = 3
    max_patches: int | None = None


def native_grid(height: int, width: int, patch: tuple[int, int], max_patches: int) -> tuple[int, int]:
    """The largest patch grid ``(rows, cols)`` with ``rows * cols <= max_patches`` for an image of ``height x
    width`` pixels scaled by one factor (aspect kept, each side rounded up to whole patches, at least one).

    The grid at scale ``s`` is ``(ceil(s h / ph), ceil(s w / pw))``; it only grows, and changes only where a side
    reaches a whole number of patches (``s = r ph / h`` or ``c pw / w``), so the answer is the grid at the largest
    such scale whose grid fits the budget, computed in exact integer arithmetic.
    """
    ph, pw = patch
    best: tuple[int, int] = (1, 1)
    best_scale = (0, 1)  # a fraction (numerator, denominator)
    for side, cell in ((height, ph), (width, pw)):
        for k in range(1, max_patches + 1):
            num, den = k * cell, side  # s = k * cell / side: this side is exactly k patches
            rows = max(1, -(-height * num // (den * ph)))
            cols = max(1, -(-width * num // (den * pw)))
            if rows * cols > max_patches:
                break
            if num * best_scale[1] > best_scale[0] * den:
                best, best_scale = (rows, cols), (num, den)
    return best


def as_pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


@dataclass(frozen=True)
class TokenLayout:
    """``[prefix..., patches, suffix...]``: the prefix token kinds in order, the patch grid ``(rows, cols)``, the
    patch size, the input size in pixels (height first) and the kinds of the tokens after the patches.

    A padded batch of images of different sizes (SigLIP2 NaFlex, timm NaFlexViT) has ``grids``: image ``b``'s
    tokens are ``[prefix, grids[b] patches (row-major), suffix, padding]`` and ``grid`` is ``(1, P)``, the ``P``
    patch slots of the longest image (`padded_grid`); `valid_counts` says how many tokens of each image are real.
    ``grids`` is ``None`` when every image is on ``grid``.

    Video (``frames > 1``): the patches are ``frames`` tubelets deep, in token order ``(frames, rows, cols)``
    (time slowest); ``grid`` is then the *stacked* grid ``(frames * rows, cols)`` (the frames' grids one under
    the other), so every token index and every image method reads a video unchanged, and `frame_grid` is one
    frame's ``(rows, cols)``. ``tubelet``: input frames per token along time (VideoMAE, ViViT: 2).
    """

    prefix: tuple[str, ...]
    grid: tuple[int, int]
    patch_size: tuple[int, int] = (1, 1)
    image_size: tuple[int, int] | None = None
    suffix: tuple[str, ...] = ()
    grids: tuple[tuple[int, int], ...] | None = None
    frames: int = 1
    tubelet: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", tuple(self.prefix))
        object.__setattr__(self, "suffix", tuple(self.suffix))
        object.__setattr__(self, "grid", as_pair(self.grid))
        object.__setattr__(self, "patch_size", as_pair(self.patch_size))
        check_kinds(self.prefix, self.suffix)
        check_frames(self.grid, self.frames, self.tubelet)
        if self.grids is not None:
            grids = tuple(as_pair(g) for g in self.grids)
            object.__setattr__(self, "grids", grids)
            check_grids(grids, self.grid)

    @property
    def padded(self) -> bool:
        """Images of this batch sit on their own grids, padded to one token count (`grids` is set)."""
        return self.grids is not None

    def valid_counts(self) -> tuple[int, ...] | None:
        """Real (not padding) tokens of each image, ``prefix + rows_b * cols_b + suffix``; ``None`` unpadded."""
        if self.grids is None:
            return None
        return tuple(self.num_prefix_tokens + r * c + self.num_suffix_tokens for r, c in self.grids)

    def image(self, b: int) -> TokenLayout:
        """Image ``b``'s own layout (its grid, no padding): the layout itself when not padded."""
        if self.grids is None:
            return self
        return TokenLayout(self.prefix, self.grids[b], self.patch_size, None, self.suffix)

    def require_one_grid(self, what: str) -> None:
        """Refuse reading a padded batch of images on one grid (each image has its own)."""
        if self.grids is not None:
            raise VitscopeError(
                "attn", f"{what}: this padded batch holds images on {len(set(self.grids))} different grids "
                f"{list(self.grids)}; reading them on one grid would put image tokens and padding in wrong places",
                "read each image on its own grid: attn.image(b) (or attn.images())",
            )

    @property
    def frame_grid(self) -> tuple[int, int]:
        """One frame's patch grid ``(rows, cols)`` (``grid`` itself for an image)."""
        return (self.grid[0] // self.frames, self.grid[1])

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_suffix_tokens(self) -> int:
        return len(self.suffix)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches + self.num_suffix_tokens

    @property
    def patch_slice(self) -> slice:
        """The patch tokens: after the prefix, before the suffix."""
        return slice(self.num_prefix_tokens, self.num_prefix_tokens + self.num_patches)

    @property
    def cls_index(self) -> int | None:
        """Token index of [CLS], or ``None`` for models without one (e.g. SigLIP)."""
        return self.prefix.index("cls") if "cls" in self.prefix else None

    @property
    def dist_index(self) -> int | None:
        return self.prefix.index("dist") if "dist" in self.prefix else None

    @property
    def register_indices(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.prefix) if k == "register")

    @property
    def default_query(self) -> str:
        """``"cls"`` when the model has a [CLS] token, else ``"mean"`` (the mean over patch query rows)."""
        return "cls" if "cls" in self.prefix else "mean"

    def patch_index(self, row: int, col: int) -> int:
        """Token index of the patch at grid position ``(row, col)``."""
        self.require_one_grid(f"patch ({row}, {col})")
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise TokenError("query", f"patch at row {row}, column {col} is outside the {rows}x{cols} grid", _QUERY_FIX)
        return self.num_prefix_tokens + row * cols + col

    def token_index(self, token: int | str | tuple[int, int]) -> int:
        """A token given as an index, ``"cls"``/``"dist"``/``"register:K"``, or ``(row, col)``."""
        if isinstance(token, tuple):
            if len(token) != 2:
                raise VitscopeError("query", f"a patch is (row, col), got {token!r}", _QUERY_FIX)
            row, col = (as_index(v, "query", "patch coordinate", _QUERY_FIX) for v in token)
            return self.patch_index(row, col)
        if isinstance(token, str):
            if token in ("cls", "dist"):
                idx = self.cls_index if token == "cls" else self.dist_index
                if idx is None:
                    fix = ("this model has no [CLS] (e.g. SigLIP pools patches): use the mean over patch rows "
                           "(queries=None, query='mean')") if token == "cls" else _QUERY_FIX
                    raise VitscopeError("query", f"this model has no {token} token (prefix={self.prefix})", fix)
                return idx
            if token.startswith("register"):
                try:
                    k = int(token.split(":", 1)[1]) if ":" in token else 0
                except ValueError:
                    raise VitscopeError("query", f"cannot parse {token!r}", "use register:K") from None
                regs = self.register_indices
                if not 0 <= k < len(regs):
                    raise TokenError("query", f"{token!r}: the model has {len(regs)} register tokens", _QUERY_FIX)
                return regs[k]
            kind, _, num = token.partition(":")
            if kind in SUFFIX_KINDS:
                ids = [self.num_prefix_tokens + self.num_patches + i for i, s in enumerate(self.suffix) if s == kind]
                try:
                    k = int(num) if num else 0
                except ValueError:
                    raise VitscopeError("query", f"cannot parse {token!r}", f"use {kind}:K") from None
                if not 0 <= k < len(ids):
                    raise TokenError("query", f"{token!r}: the model has {len(ids)} {kind} tokens", _QUERY_FIX)
                return ids[k]
            raise VitscopeError("query", f"unknown token {token!r}", _QUERY_FIX)
        idx = as_index(token, "query", "token", _QUERY_FIX)
        if idx < 0:
            idx += self.num_tokens
        if not 0 <= idx < self.num_tokens:
            raise TokenError("query", f"token {token} out of range for {self.num_tokens} tokens", _QUERY_FIX)
        return idx

    def query_ids(self, query: Any) -> list[int]:
        """Token indices whose rows a map of ``query`` averages: one token, or every patch for ``"mean"``;
        ``None`` is the default query."""
        if query is None:
            query = self.default_query
        if query == "mean":
            self.require_one_grid("the mean over patch rows")
            return list(range(self.num_prefix_tokens, self.num_prefix_tokens + self.num_patches))
        return [self.token_index(query)]

    def resolve_queries(self, queries: Any) -> tuple[int, ...] | None:
        """The capture selection: ``None`` (every row), or distinct token indices of ``"cls"``, indices, patches."""
        if queries is None:
            return None
        listed = isinstance(queries, (list, range)) or getattr(queries, "ndim", 0) >= 1  # or an array/tensor
        if getattr(queries, "ndim", 1) > 1:
            raise VitscopeError("query", f"a {queries.ndim}-d array of tokens", "pass a list of token indices")
        items = list(queries) if listed else [queries]  # one token: "cls", an index, a (row, col) tuple
        if not items:
            raise VitscopeError("query", "empty selection", "use None for every row, or name at least one token")
        out: dict[int, Any] = {}
        for q in items:
            i = self.token_index(q)
            if i in out:
                raise VitscopeError("query", f"token {i} given twice ({out[i]!r} and {q!r})", "name each one once")
            out[i] = q
        return tuple(out)


def padded_grid(grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(1, P)``: the patch slots of a padded batch, ``P`` the largest image's patch count."""
    return (1, max(r * c for r, c in grids))


def check_grids(grids: Sequence[tuple[int, int]], grid: tuple[int, int]) -> None:
    """Per-image grids of a padded batch against its ``(1, P)`` slots: the largest image fills them."""
    if not grids or any(r < 1 or c < 1 for r, c in grids):
        raise VitscopeError("grids", f"per-image grids {list(grids)} must be non-empty with positive sides",
                            "pass one (rows, cols) per image")
    if tuple(grid) != padded_grid(grids):
        raise VitscopeError("grids", f"the padded batch has {grid[0] * grid[1]} patch slots but its largest image "
                            f"is {max(r * c for r, c in grids)} patches ({list(grids)})",
                            "pass grid=(1, P) with P the largest image's patch count")


def check_frames(grid: tuple[int, int], frames: int, tubelet: int) -> None:
    """A video's stacked grid ``(frames * rows, cols)`` holds whole frames; ``frames`` and ``tubelet`` >= 1."""
    for argument, value in (("frames", frames), ("tubelet", tubelet)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VitscopeError(argument, f"expected a positive integer, got {value!r}", "use 1 for an image")
    if grid[0] % frames:
        raise VitscopeError("frames", f"a grid of {grid[0]} rows does not stack {frames} frames",
                            "the grid of a video is (frames * rows, cols)")


def per_frame(x: Any, frames: int) -> Any:
    """A stacked-grid map ``(..., frames * rows, cols)`` as ``(..., frames, rows, cols)`` (a tensor or array)."""
    *lead, R, C = x.shape
    if R % frames:
        raise VitscopeError("frames", f"{R} grid rows do not stack {frames} frames", "pass the stacked video grid")
    return x.reshape(*lead, frames, R // frames, C)


def check_kinds(prefix: Sequence[str], suffix: Sequence[str] = ()) -> None:
    """Prefix kinds from `TOKEN_KINDS`, suffix kinds from `SUFFIX_KINDS`, else a one-line error."""
    for argument, kinds, known in (("prefix", prefix, TOKEN_KINDS), ("suffix", suffix, SUFFIX_KINDS)):
        for kind in kinds:
            if kind not in known:
                raise VitscopeError(argument, f"unknown token kind {kind!r}", f"use kinds from {known}, in token order")


def parse_query(text: str | None, argument: str = "--query") -> str | int | tuple[int, int] | None:
    """A query typed on the command line: ``"cls"``, ``"mean"``, ``"dist"``, ``"register:K"``, ``"ROW,COL"`` (a
    patch) or ``"7"`` (a token index); ``None``/``""``/``"default"`` is the default query."""
    fix = "use cls, mean, dist, register:K, det:K, ROW,COL or a token index"
    if text is None or text in ("", "default"):
        return None
    if text in ("cls", "mean", "dist") or text.startswith(("register", "det", "suffix")):
        return text
    try:
        if "," in text:
            r, c = (int(t) for t in text.split(","))
            return (r, c)
        return int(text)
    except ValueError:
        raise VitscopeError(argument, f"cannot parse {text!r}", fix) from None
