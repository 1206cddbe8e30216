"""Helpers shared by the map methods: resolving layers, heads and queries, fusing heads, residual mixing.

Everything here reads `Attentions` through its public description (``prefix``, ``grid``, ``layers``,
``heads``, ``queries``), so no method assumes one prefix token, a square grid or a [CLS] token.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from vitscope._ops import HEAD_FUSIONS, check_fusion, fuse_heads
from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.layout import TokenLayout, as_index

HeadFusion = Literal["mean", "max", "min"]
__all__ = ["HEAD_FUSIONS", "HeadFusion", "Query", "check_fusion", "fuse_heads"]

#: A query for a map: ``"cls"``, ``"dist"``, ``"register:K"``, a token index, a patch ``(row, col)``, or
#: ``"mean"`` (the mean over all patch query rows: the global query of models without [CLS]).
Query = str | int | tuple[int, int] | None


def layer_position(attn: Attentions, layer: int) -> int:
    """Position along dim 0 of absolute/negative layer index ``layer``, as a one-line `VitscopeError`."""
    layer = as_index(layer, "layer", "layer", "pass a layer index (negatives count from the end)")
    try:
        return attn.layer_position(layer)
    except IndexError as exc:
        raise VitscopeError("layer", str(exc), "capture that layer, or pick one of the captured layers") from None


def require_full(attn: Attentions, method: str) -> None:
    """`Attentions.require_full` as a one-line `VitscopeError`."""
    try:
        attn.require_full(method)
    except ValueError as exc:
        raise VitscopeError("attn", str(exc)) from None


def head_position(attn: Attentions, head: int) -> int:
    """Position along dim 2 of the model's head ``head`` (negatives count from the model's last head)."""
    if attn.heads == "mean":
        raise VitscopeError(
            "head", f"head {head} requested but heads were averaged at capture time",
            "capture with heads='all', or use head='mean'",
        )
    head = as_index(head, "head", "head", "pass a head index, or 'mean'/'max'/'min'")
    h = head + attn.num_heads if head < 0 else head
    if h not in attn.heads:
        raise VitscopeError(
            "head", f"head {head} was not captured (captured heads {list(attn.heads)})",
            f"pick one of {list(attn.heads)} or 'mean'/'max'/'min'",
        )
    return attn.heads.index(h)


def query_positions(attn: Attentions, query: Query) -> list[int]:
    """Positions along dim 3 whose rows are averaged for ``query`` (one position unless ``"mean"``).

    ``None`` means the default global query (`TokenLayout.default_query`).
    """
    ids = attn.layout.query_ids(query)
    if attn.queries is None:
        return ids
    if query == "mean" or (query is None and attn.layout.default_query == "mean"):
        patches = attn.patch_slice
        pos = [i for i, q in enumerate(attn.queries) if patches.start <= q < patches.stop]
        if not pos:
            raise VitscopeError(
                "query", "'mean' averages the patch query rows, but none were captured",
                "capture with queries=None",
            )
        return pos
    return [attn.query_position(ids[0])]


def token_ids_for_query(prefix: Sequence[str], grid: tuple[int, int], query: Query,
                        suffix: Sequence[str] = ()) -> list[int]:
    """Token indices averaged for ``query`` when every row is available (rollout, gradient methods)."""
    return TokenLayout(tuple(prefix), grid, suffix=tuple(suffix)).query_ids(query)


def contiguous_layers(attn: Attentions, start_layer: int = 0, method: str = "rollout") -> list[int]:
    """Positions (dim 0) of the captured layers from ``start_layer`` on, checked to be consecutive."""
    start_layer = as_index(start_layer, "start_layer", "layer", f"pass an integer in [-{attn.num_layers}, "
                           f"{attn.num_layers - 1}]")
    start = start_layer + attn.num_layers if start_layer < 0 else start_layer
    if not 0 <= start < attn.num_layers:
        raise VitscopeError(
            "start_layer", f"{start_layer} out of range for a model with {attn.num_layers} layers",
            f"use an index in [-{attn.num_layers}, {attn.num_layers - 1}]",
        )
    chosen = sorted((layer, pos) for pos, layer in enumerate(attn.layers) if layer >= start)
    if not chosen:
        raise VitscopeError(
            "start_layer", f"no captured layer at or after {start} (captured {list(attn.layers)})",
            "capture with layers=None",
        )
    ids = [layer for layer, _ in chosen]
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[0] != start:
        raise VitscopeError(
            "attn", f"{method} multiplies consecutive layers {start}..{ids[-1]}, but captured layers are "
            f"{list(attn.layers)}", "capture with layers=None",
        )
    return [pos for _, pos in chosen]


def check_unit(name: str, value: float, closed_top: bool = True) -> None:
    """``value`` a real number in [0, 1] (or [0, 1) with ``closed_top=False``); NaN, bools, strings refused."""
    top = "]" if closed_top else ")"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise VitscopeError(name, f"expected a number, got {value!r}", f"pass a value in [0, 1{top}")
    ok = 0.0 <= value <= 1.0 if closed_top else 0.0 <= value < 1.0
    if not ok:
        raise VitscopeError(name, f"{value} is outside [0, 1{top}", f"pass a value in [0, 1{top}")


def discard_lowest(a: torch.Tensor, ratio: float, protect: int | None) -> torch.Tensor:
    """Zero the ``ratio`` smallest entries of each ``(N, N)`` matrix in ``a`` ``(B, N, N)``.

    Entries in column ``protect`` (the [CLS] key) are never discarded. Per image, ``k = int(ratio * M)``
    entries are zeroed, where ``M`` is the number of candidate entries (all but the protected column).
    """
    if ratio <= 0.0:
        return a
    B, N, _ = a.shape
    scores = a.clone()
    if protect is not None:
        scores[:, :, protect] = float("inf")
    candidates = N * (N - (1 if protect is not None else 0))
    k = int(candidates * ratio)
    if k == 0:
        return a
    flat = scores.reshape(B, N * N)
    idx = flat.topk(k, dim=-1, largest=False).indices  # (B, k)
    out = a.clone().reshape(B, N * N)
    out.scatter_(1, idx, 0.0)
    return out.reshape(B, N, N)


def mix_residual(a: torch.Tensor, residual: float, renormalize: bool) -> torch.Tensor:
    """``(1 - residual) * a + residual * I``, then rows divided by their sum when ``renormalize``.

    a: ``(B, N, N)`` row-stochastic-ish matrices (rows are queries).
    """
    N = a.shape[-1]
    eye = torch.eye(N, dtype=a.dtype, device=a.device)
    out = (1.0 - residual) * a + residual * eye
    if renormalize:
        out = out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


def rows_needed(prefix: tuple[str, ...], query: Query) -> Query:
    """The ``queries=`` selection a map of ``query`` needs: the one row, or every row for a patch mean."""
    if query == "mean" or (query is None and "cls" not in prefix):
        return None  # the mean over patch query rows needs every row
    return "cls" if query is None else query


def per_image_maps(attn: Attentions, fn: Callable[[Attentions], torch.Tensor]) -> torch.Tensor:
    """``fn`` (a map ``(1, ..., rows, cols)`` of one image) on each image of a padded batch (`Attentions.grids`)
    on its own grid, from its own tokens (padding rows and keys dropped: `Attentions.image`), stacked NaN-padded
    to ``(batch, ..., max rows, max cols)``; image ``b``'s map is ``out[b, ..., :rows_b, :cols_b]``."""
    maps = [fn(a) for a in attn.images()]
    rows, cols = max(int(m.shape[-2]) for m in maps), max(int(m.shape[-1]) for m in maps)
    out = torch.full((len(maps), *maps[0].shape[1:-2], rows, cols), float("nan"), dtype=maps[0].dtype,
                     device=maps[0].device)
    if not out.is_floating_point():  # boolean masks: False outside an image's grid
        out = torch.zeros(out.shape, dtype=maps[0].dtype, device=maps[0].device)
    for b, m in enumerate(maps):
        out[b, ..., : m.shape[-2], : m.shape[-1]] = m[0]
    return out
