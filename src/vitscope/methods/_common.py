"""Helpers shared by the map methods: resolving layers, heads and queries, fusing heads, residual mixing.

Everything here reads `Attentions` through its public description (``prefix``, ``grid``, ``layers``,
``heads``, ``queries``), so no method assumes one prefix token, a square grid or a [CLS] token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")

#: A query for a map: ``"cls"``, ``"dist"``, ``"register:K"``, a token index, a patch ``(row, col)``, or
#: ``"mean"`` (the mean over all patch query rows: the global query of models without [CLS]).
Query = str | int | tuple[int, int] | None


def layer_position(attn: Attentions, layer: int) -> int:
    """Position along dim 0 of absolute/negative layer index ``layer``, as a one-line `VitscopeError`."""
    try:
        return attn.layer_position(int(layer))
    except IndexError as exc:
        raise VitscopeError("layer", str(exc), "capture that layer, or pick one of the captured layers") from None


def require_full(attn: Attentions, method: str) -> None:
    """`Attentions.require_full` as a one-line `VitscopeError`."""
    try:
        attn.require_full(method)
    except ValueError as exc:
        raise VitscopeError("attn", str(exc)) from None


def check_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise VitscopeError("head_fusion", f"unknown value {head_fusion!r}", "use 'mean', 'max' or 'min'")


def fuse_heads(w: torch.Tensor, head_fusion: str, heads: object, dim: int = 1) -> torch.Tensor:
    """Fuse the head dim ``dim`` of ``w`` by mean / max / min (dim removed)."""
    check_fusion(head_fusion)
    if head_fusion == "mean":
        return w.mean(dim=dim)
    if heads == "mean":
        raise VitscopeError(
            "head_fusion", f"{head_fusion!r} needs every head, but heads were averaged at capture time",
            "capture with heads='all', or use head_fusion='mean'",
        )
    return w.amax(dim=dim) if head_fusion == "max" else w.amin(dim=dim)


def head_position(attn: Attentions, head: int) -> int:
    """Position along dim 2 of the model's head ``head`` (negatives count from the model's last head)."""
    if attn.heads == "mean":
        raise VitscopeError(
            "head", f"head {head} requested but heads were averaged at capture time",
            "capture with heads='all', or use head='mean'",
        )
    h = int(head) + attn.num_heads if int(head) < 0 else int(head)
    if h not in attn.heads:
        raise VitscopeError(
            "head", f"head {head} was not captured (captured heads {list(attn.heads)})",
            f"pick one of {list(attn.heads)} or 'mean'/'max'/'min'",
        )
    return attn.heads.index(h)


def default_query(prefix: Sequence[str]) -> str:
    """``"cls"`` when the model has a [CLS] token, else ``"mean"`` (mean over patch query rows)."""
    return "cls" if "cls" in prefix else "mean"


def query_positions(attn: Attentions, query: Query) -> list[int]:
    """Positions along dim 3 whose rows are averaged for ``query`` (one position unless ``"mean"``).

    ``None`` means the default global query (`default_query`).
    """
    if query is None:
        query = default_query(attn.prefix)
    if query == "mean":
        patch_ids = range(attn.num_prefix_tokens, attn.num_tokens)
        if attn.queries is None:
            return list(patch_ids)
        pos = [i for i, q in enumerate(attn.queries) if q >= attn.num_prefix_tokens]
        if not pos:
            raise VitscopeError(
                "query", "'mean' averages the patch query rows, but none were captured",
                "capture with queries=None",
            )
        return pos
    try:
        return [attn.query_position(query)]  # type: ignore[arg-type]
    except (ValueError, IndexError) as exc:
        raise VitscopeError(
            "query", str(exc), "use 'cls', 'mean', 'register:K', a token index or a patch (row, col)"
        ) from None


def token_ids_for_query(prefix: Sequence[str], grid: tuple[int, int], query: Query) -> list[int]:
    """Token indices averaged for ``query`` when every row is available (rollout, gradient methods)."""
    n_prefix = len(prefix)
    rows, cols = grid
    probe = Attentions(
        weights=torch.zeros(0, 0, 1, n_prefix + rows * cols, n_prefix + rows * cols), prefix=tuple(prefix), grid=grid,
        patch_size=(1, 1), image_size=grid, layers=(), heads="mean", queries=None, num_layers=0, num_heads=0,
    )
    return query_positions(probe, query)


def contiguous_layers(attn: Attentions, start_layer: int = 0, method: str = "rollout") -> list[int]:
    """Positions (dim 0) of the captured layers from ``start_layer`` on, checked to be consecutive."""
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
    ok = 0.0 <= value <= 1.0 if closed_top else 0.0 <= value < 1.0
    if not ok:
        top = "]" if closed_top else ")"
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
