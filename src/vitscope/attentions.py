"""`Attentions`: the one container every vitscope method reads.

Token layout is always ``[prefix tokens..., patch tokens (row-major), suffix tokens...]``; the prefix tokens are
described by their kinds in order (``"cls"``, ``"dist"`` for DeiT's distillation token, ``"register"``), the
suffix tokens likewise (``"det"`` for YOLOS's detection tokens; most models have none), so no code ever assumes
one prefix token, patches running to the end, or a square grid.

``weights`` has named dims ``(layer, batch, head, query, key)``:

- ``layer``: the captured layers, their absolute indices in ``layers``;
- ``head``: the captured heads (indices in ``heads``), or one fused head when ``heads == "mean"``;
- ``query``: the captured query tokens (token indices in ``queries``), or all ``N`` tokens when
  ``queries is None``;
- ``key``: always all ``N`` tokens, so every row is a full softmax distribution (sums to 1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vitscope._ops import fuse_heads
from vitscope.errors import VitscopeError
from vitscope.layout import (
    TOKEN_KINDS,
    TokenError,
    TokenKind,
    TokenLayout,
    check_frames,
    check_grids,
    check_kinds,
    per_frame,
)
from vitscope.layout import as_pair as _as_pair

__all__ = ["TOKEN_KINDS", "Attentions", "TokenKind"]


@dataclass
class Attentions:
    """Attention probabilities captured from one forward pass, with everything needed to read them.

    Attributes:
        weights: float tensor ``(layer, batch, head, query, key)``; each row sums to 1 over ``key``.
        prefix: kinds of the prefix tokens in token order, e.g. ``("cls",)``, ``("cls", "dist")``,
            ``("cls", "register", "register", "register", "register")`` or ``()`` (SigLIP).
        grid: patch grid ``(rows, cols)``; ``N = len(prefix) + rows * cols + len(suffix)``.
        patch_size: ``(height, width)`` of one patch in input pixels.
        image_size: ``(height, width)`` of the pixel tensor the model actually saw.
        layers: absolute layer index of each entry along dim 0.
        heads: head index of each entry along dim 2, or ``"mean"`` when heads were fused by averaging.
        queries: token index of each entry along dim 3, or ``None`` when every token is a query.
        num_layers: layers in the model (so negative indices and ranges can be checked).
        num_heads: heads per layer in the model.
        token_norms: optional ``(num_layers, batch, N)`` L2 norms of each block's output tokens (before the
            final norm), filled by ``capture(..., token_norms=True)``.
        meta: free-form provenance (model name, preprocessing, ...), kept JSON-serialisable.
        suffix: kinds of the tokens after the patches (``("det",) * 100`` for YOLOS), usually ``()``.
        grids: per-image patch grids ``(rows, cols)`` of a padded batch of images of different sizes (SigLIP2
            NaFlex, timm NaFlexViT run at each image's own aspect ratio), else ``None``. Image ``b``'s tokens are
            ``[prefix, grids[b] patches (row-major), suffix]`` followed by padding up to ``N``; ``grid`` is then
            ``(1, P)`` (``P`` patch slots: the largest image's patch count), ``image_size`` the bounding box of the
            images, and `valid` marks the real tokens. Padding keys have probability 0 (the model masks them, and
            capture proves it) and padding query rows are 0. Read each image on its own grid with `image` /
            `images` (exact ordinary `Attentions`); reading a padded batch on one grid (`to_grid`, a patch or
            ``"mean"`` query) is refused.
        frames: a video's token frames ``T'`` (input frames / ``tubelet``), 1 for an image. The patches are in
            token order ``(T', rows, cols)`` and ``grid`` is the stacked grid ``(T' * rows, cols)``
            (`vitscope.layout.TokenLayout`); `frame_grid` is one frame's, `per_frame` splits a map by frame.
        tubelet: input frames per token along time.
    """

    weights: torch.Tensor
    prefix: tuple[str, ...]
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    layers: tuple[int, ...]
    heads: tuple[int, ...] | Literal["mean"]
    queries: tuple[int, ...] | None
    num_layers: int
    num_heads: int
    token_norms: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    suffix: tuple[str, ...] = ()
    grids: tuple[tuple[int, int], ...] | None = None
    frames: int = 1
    tubelet: int = 1

    def __post_init__(self) -> None:
        self.prefix = tuple(self.prefix)
        self.suffix = tuple(self.suffix)
        check_kinds(self.prefix, self.suffix)
        self.grid = _as_pair(self.grid)
        self.patch_size = _as_pair(self.patch_size)
        self.image_size = _as_pair(self.image_size)
        check_frames(self.grid, self.frames, self.tubelet)
        self.layers = tuple(int(i) for i in self.layers)
        if self.heads != "mean":
            self.heads = tuple(int(h) for h in self.heads)
        if self.queries is not None:
            self.queries = tuple(int(q) for q in self.queries)
        if self.grids is not None:
            self.grids = tuple(_as_pair(g) for g in self.grids)
            check_grids(self.grids, self.grid)
        if self.weights.dim() != 5:
            raise VitscopeError(
                "weights", f"expected 5 dims (layer, batch, head, query, key), got shape {tuple(self.weights.shape)}"
            )
        L, _B, H, Q, N = self.weights.shape
        if self.num_tokens != N:
            raise VitscopeError(
                "weights", f"key dim is {N} but prefix ({len(self.prefix)}) + grid {self.grid} + suffix "
                f"({len(self.suffix)}) gives {self.num_tokens}"
            )
        if self.grids is not None and len(self.grids) != _B:
            raise VitscopeError("grids", f"{len(self.grids)} per-image grids for a batch of {_B} images",
                                "pass one (rows, cols) per image")
        if len(self.layers) != L:
            raise VitscopeError("weights", f"{L} layers along dim 0 but layers={self.layers}")
        expected_h = 1 if self.heads == "mean" else len(self.heads)
        if expected_h != H:
            raise VitscopeError("weights", f"{H} heads along dim 2 but heads={self.heads!r}")
        expected_q = N if self.queries is None else len(self.queries)
        if expected_q != Q:
            raise VitscopeError("weights", f"{Q} queries along dim 3 but queries={self.queries!r}")

    # ----------------------------------------------------------------------------------------- tokens
    @property
    def layout(self) -> TokenLayout:
        """The token layout (prefix kinds, grid, patch and image size) that owns token indexing."""
        return TokenLayout(self.prefix, self.grid, self.patch_size, self.image_size, self.suffix, self.grids,
                           self.frames, self.tubelet)

    @property
    def valid(self) -> torch.Tensor | None:
        """``(B, N)`` bool: the real tokens of each image of a padded batch (``None`` when not padded)."""
        counts = self.layout.valid_counts()
        if counts is None:
            return None
        n = torch.arange(self.num_tokens)
        return n[None, :] < torch.tensor(counts)[:, None]

    def image(self, b: int) -> Attentions:
        """Image ``b`` alone, on its own grid, as ordinary `Attentions` (padding tokens dropped: its rows still
        sum to 1, since padding keys have probability 0)."""
        from vitscope.layout import as_index

        B = self.batch_size
        i = as_index(b, "image", "image", f"pass an image index in [0, {B - 1}]")
        if not -B <= i < B:
            raise TokenError("image", f"image {i} out of range for a batch of {B}", f"pass an index in [0, {B - 1}]")
        i %= B
        norms = None if self.token_norms is None else self.token_norms[:, i:i + 1]
        if self.grids is None:
            return replace(self, weights=self.weights[:, i:i + 1], token_norms=norms)
        n = self.num_prefix_tokens + self.grids[i][0] * self.grids[i][1] + self.num_suffix_tokens
        w = self.weights[:, i:i + 1, :, :, :n]  # (L, 1, H, Q, n): the image's own keys
        if self.queries is None:
            w = w[:, :, :, :n]
        elif any(q >= n for q in self.queries):
            raise VitscopeError("image", f"image {i} has {n} tokens; query rows {list(self.queries)} include padding",
                                "capture prefix-token queries (e.g. 'cls') or every row (queries=None)")
        (ph, pw), (rows, cols) = self.patch_size, self.grids[i]
        return replace(self, weights=w, grid=(rows, cols), image_size=(rows * ph, cols * pw), grids=None,
                       token_norms=None if norms is None else norms[..., :n])

    def images(self) -> list[Attentions]:
        """Every image on its own grid (`image`)."""
        return [self.image(b) for b in range(self.batch_size)]


    @property
    def frame_grid(self) -> tuple[int, int]:
        """One frame's patch grid ``(rows, cols)`` (``grid`` for an image)."""
        return self.layout.frame_grid

    def per_frame(self, x: torch.Tensor) -> torch.Tensor:
        """A map on the stacked grid ``(..., T' * rows, cols)`` as ``(..., T', rows, cols)``."""
        out: torch.Tensor = per_frame(x, self.frames)
        return out

    @property
    def num_prefix_tokens(self) -> int:
        return self.layout.num_prefix_tokens

    @property
    def num_patches(self) -> int:
        return self.layout.num_patches

    @property
    def num_suffix_tokens(self) -> int:
        return len(self.suffix)

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def batch_size(self) -> int:
        return int(self.weights.shape[1])

    @property
    def cls_index(self) -> int | None:
        """Token index of [CLS], or ``None`` for models without one (e.g. SigLIP)."""
        return self.layout.cls_index

    @property
    def dist_index(self) -> int | None:
        return self.layout.dist_index

    @property
    def register_indices(self) -> tuple[int, ...]:
        return self.layout.register_indices

    @property
    def patch_slice(self) -> slice:
        return self.layout.patch_slice

    def patch_index(self, row: int, col: int) -> int:
        """Token index of the patch at grid position ``(row, col)`` (`TokenLayout.patch_index`)."""
        return self.layout.patch_index(row, col)

    def token_index(self, token: int | str | tuple[int, int]) -> int:
        """Resolve a query token given as an index, ``"cls"``/``"dist"``/``"register:K"``, or ``(row, col)``."""
        return self.layout.token_index(token)

    # ---------------------------------------------------------------------------------- selections
    def layer_position(self, layer: int) -> int:
        """Position along dim 0 of absolute layer ``layer`` (negative counts from the model's last layer)."""
        absolute = layer + self.num_layers if layer < 0 else layer
        if absolute not in self.layers:
            raise TokenError(
                "layer", f"layer {layer} not captured (captured layers {list(self.layers)}, model has "
                f"{self.num_layers})", "capture that layer, or pick one of the captured layers",
            )
        return self.layers.index(absolute)

    def query_position(self, token: int | str | tuple[int, int]) -> int:
        """Position along dim 3 of the query token (see `token_index`)."""
        idx = self.token_index(token)
        if self.queries is None:
            return idx
        if idx not in self.queries:
            raise VitscopeError(
                "query", f"query token {idx} was not captured (captured queries {list(self.queries)})",
                "capture with queries=None or include it",
            )
        return self.queries.index(idx)

    def require_full(self, method: str) -> None:
        """Raise unless every token was captured as a query (rollout, flow, distance need that)."""
        if self.queries is not None:
            raise VitscopeError(
                "attn", f"{method} needs every query row, but these attentions hold only queries "
                f"{list(self.queries)}", "capture with queries=None",
            )

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape a trailing dim of ``N`` tokens (or ``rows*cols`` patches) to ``(..., rows, cols)``.

        Prefix and suffix tokens are dropped when the trailing dim is ``N``.
        """
        self.layout.require_one_grid("to_grid")
        rows, cols = self.grid
        if x.shape[-1] == self.num_tokens:
            x = x[..., self.patch_slice]
        if x.shape[-1] != rows * cols:
            raise VitscopeError("x", f"to_grid: last dim {x.shape[-1]} is neither N={self.num_tokens} nor {rows * cols}")
        return x.reshape(*x.shape[:-1], rows, cols)

    def select(self, layers: Sequence[int] | None = None) -> Attentions:
        """A view restricted to some captured layers (absolute or negative indices)."""
        if layers is None:
            return self
        pos = [self.layer_position(i) for i in layers]
        return replace(self, weights=self.weights[pos], layers=tuple(self.layers[p] for p in pos))

    def fused(self, head_fusion: Literal["mean", "max", "min"] = "mean") -> torch.Tensor:
        """Weights with heads fused: ``(layer, batch, query, key)``."""
        return fuse_heads(self.weights, head_fusion, self.heads, dim=2)

    # -------------------------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an ``.npz`` (atomically): ``weights`` (float32), ``token_norms`` if present, and ``meta_json``."""
        from vitscope._io import atomic_savez

        arrays: dict[str, np.ndarray] = {"weights": self.weights.detach().float().cpu().numpy()}
        if self.token_norms is not None:
            arrays["token_norms"] = self.token_norms.detach().float().cpu().numpy()
        arrays["meta_json"] = np.array(json.dumps(self._header()))
        return atomic_savez(path, arrays)

    def _header(self) -> dict[str, Any]:
        return {
            "prefix": list(self.prefix),
            "suffix": list(self.suffix),
            "grid": list(self.grid),
            "grids": None if self.grids is None else [list(g) for g in self.grids],
            "patch_size": list(self.patch_size),
            "image_size": list(self.image_size),
            "layers": list(self.layers),
            "heads": self.heads if self.heads == "mean" else list(self.heads),
            "queries": None if self.queries is None else list(self.queries),
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "meta": self.meta,
            **({"frames": self.frames, "tubelet": self.tubelet} if self.frames > 1 or self.tubelet > 1 else {}),
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Attentions:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["meta_json"]))
            weights = torch.from_numpy(data["weights"].copy())
            norms = torch.from_numpy(data["token_norms"].copy()) if "token_norms" in data else None
        heads = header["heads"]
        return cls(
            weights=weights,
            prefix=tuple(header["prefix"]),
            grid=tuple(header["grid"]),  # type: ignore[arg-type]
            patch_size=tuple(header["patch_size"]),  # type: ignore[arg-type]
            image_size=tuple(header["image_size"]),  # type: ignore[arg-type]
            layers=tuple(header["layers"]),
            heads="mean" if heads == "mean" else tuple(heads),
            queries=None if header["queries"] is None else tuple(header["queries"]),
            num_layers=header["num_layers"],
            num_heads=header["num_heads"],
            token_norms=norms,
            meta=header.get("meta", {}),
            suffix=tuple(header.get("suffix", ())),
            grids=None if header.get("grids") is None else tuple(tuple(g) for g in header["grids"]),
            frames=int(header.get("frames", 1)),
            tubelet=int(header.get("tubelet", 1)),
        )

    def __repr__(self) -> str:
        L, B, H, Q, N = self.weights.shape
        return (
            f"Attentions(layers={L}/{self.num_layers}, batch={B}, heads={H if self.heads != 'mean' else 'mean'}, "
            f"queries={Q}, keys={N}, prefix={self.prefix}, grid={self.grid}, image_size={self.image_size}"
            + (f", suffix={len(self.suffix)} tokens" if self.suffix else "")
            + (f", grids={list(self.grids)}" if self.grids is not None else "")
            + (f", frames={self.frames} x {self.frame_grid}" if self.frames > 1 else "") + ")"
        )
