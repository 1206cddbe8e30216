"""`cls_map`: the raw attention of one query (by default [CLS]) over the patches, at one layer.

The map DINO popularised (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
Fig. 1): row ``q`` of layer ``l``'s attention, restricted to the patch keys and laid out on the patch grid,

    map[b, r, c] = fuse_h A[l, b, h, q, patch(r, c)]

optionally renormalised over the patches, ``map / sum_patches map``, because register tokens (Darcet et al.
2024) and [CLS] itself can take much of each row's mass.
"""

from __future__ import annotations

from typing import Literal

import torch

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.methods._common import (
    HEAD_FUSIONS,
    Query,
    fuse_heads,
    head_position,
    layer_position,
    per_image_maps,
    query_positions,
    rows_needed,
)
from vitscope.methods.registry import MapContext, MapResult, Method, register
from vitscope.methods.upsample import UpsampleMode, upsample

HeadSpec = Literal["mean", "max", "min", "all"] | int


def cls_map(
    attn: Attentions,
    *,
    layer: int = -1,
    head: HeadSpec = "mean",
    query: Query = None,
    renormalize: bool = False,
    upsample_mode: UpsampleMode | None = None,
) -> torch.Tensor:
    """Attention of one query token over the patches of one layer.

    ``map[b, r, c] = fuse_h( mean_{q in Q} A[layer, b, h, q, patch(r, c)] )`` with ``Q`` one query row, or
    all patch rows for ``query="mean"``. For models without [CLS] (SigLIP, ``prefix == ()``) the default
    query is ``"mean"``: the mean over all patch query rows (how much each patch is attended on average),
    the closest analogue of a global query. Heads are fused per query row first (mean/max/min over heads),
    then rows are averaged, then (optionally) the map is renormalised over patches only.

    Args:
        attn: captured attentions (the query rows needed must have been captured).
        layer: absolute or negative layer index (default the last layer).
        head: ``"mean"``/``"max"``/``"min"`` to fuse heads, a head index, or ``"all"`` to keep every captured
            head (then the result is ``(batch, heads, rows, cols)``).
        query: ``"cls"``, ``"dist"``, ``"register:K"``, a token index, a patch ``(row, col)`` or ``"mean"``;
            default ``"cls"`` when the model has one, else ``"mean"``.
        renormalize: divide by the map's sum over patches, so each map sums to 1 whatever mass the prefix
            tokens took (without it, a map sums to the share of attention the query gave to patches).
        upsample_mode: also resize to the input image (``attn.image_size``) with `upsample`.

    Returns:
        ``(batch, rows, cols)`` float tensor (``(batch, heads, rows, cols)`` for ``head="all"``), or the same
        at ``(height, width)`` pixels when ``upsample_mode`` is given.

    Example:
        >>> attn = vitscope.capture("vitscope:shapes", "cat.png", queries="cls")  # doctest: +SKIP
        >>> cls_map(attn, layer=-1, head="mean", renormalize=True).shape  # (1, rows, cols)  # doctest: +SKIP
    """
    if attn.grids is not None:  # a padded batch: each image on its own grid, NaN-padded (per_image_maps)
        return per_image_maps(attn, lambda a: cls_map(a, layer=layer, head=head, query=query, renormalize=renormalize,
                                                      upsample_mode=upsample_mode))
    pos = layer_position(attn, layer)
    rows_pos = query_positions(attn, query)
    run = len(rows_pos) > 1 and rows_pos == list(range(rows_pos[0], rows_pos[0] + len(rows_pos)))
    # every patch row (a [CLS]-free default query): a view of the rows, not a gathered copy of them
    w = attn.weights[pos][:, :, rows_pos[0]:rows_pos[0] + len(rows_pos)] if run else \
        attn.weights[pos][:, :, rows_pos]  # (B, H, q, N)
    if head == "all":
        fused = w  # (B, H, q, N)
    elif isinstance(head, str):
        if head not in HEAD_FUSIONS:
            raise VitscopeError("head", f"unknown value {head!r}", "use 'mean', 'max', 'min', 'all' or a head index")
        fused = fuse_heads(w, head, attn.heads, dim=1).unsqueeze(1)  # (B, 1, q, N)
    elif isinstance(head, int):
        fused = w[:, head_position(attn, head)].unsqueeze(1)  # (B, 1, q, N)
    else:
        raise VitscopeError("head", f"unknown value {head!r}", "use 'mean', 'max', 'min', 'all' or a head index")
    rows = fused.mean(dim=2)[..., attn.patch_slice].float()  # (B, H', P)
    if renormalize:
        rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    maps = attn.to_grid(rows)  # (B, H', rows, cols)
    if head != "all":
        maps = maps[:, 0]
    if upsample_mode is not None:
        maps = upsample(maps, attn.image_size, upsample_mode)
    return maps


def _compute(ctx: MapContext, *, layer: int = -1, head: HeadSpec = "mean", query: Query = None,
             renormalize: bool = False) -> MapResult:
    attn = ctx.capture(layers=[layer], queries=rows_needed(ctx.vit.info.prefix, query))
    heads = cls_map(attn, layer=layer, head="all", query=query, renormalize=renormalize)  # (B, H, rows, cols)
    fused = cls_map(attn, layer=layer, head=head, query=query, renormalize=renormalize)
    return MapResult(map=fused.float(), extras={"heads": heads.float()}, meta={"layer": attn.layers[-1]})


register(Method(
    name="cls", compute=_compute, summary="one layer's [CLS] (or query) attention over the patches, heads fused",
    paper="Caron et al., Emerging Properties in Self-Supervised Vision Transformers (DINO), ICCV 2021",
))
