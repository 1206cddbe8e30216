"""`similarity`: cosine similarity of one token's feature to every patch (the DINOv2 notebooks' click-a-patch
view; Oquab et al. 2024, "DINOv2: Learning Robust Visual Features without Supervision", TMLR, Sec. 7.4).

With ``f`` the block-output features of layer ``layer`` (after the model's final norm, see
`vitscope.methods.features`) and ``q`` the feature of the query token,

    map[b, r, c] = <q_b, f[b, patch(r, c)]> / (|q_b| |f[b, patch(r, c)]|)

in [-1, 1]. The query is a patch ``(row, col)`` (default: the centre patch), ``"cls"``, ``"register:K"``, a token
index or ``"mean"`` (the mean patch feature). ``reference`` takes the query from another image: an int picks image
``k`` of the same call (every image is compared with image ``k``'s token), anything else is an image (path, PIL,
array) prepared the model's way, whose token is compared with every image of the call.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from vitscope.errors import VitscopeError
from vitscope.layout import TokenLayout, as_index
from vitscope.methods._common import Query
from vitscope.methods.features import patch_features
from vitscope.methods.registry import MapContext, MapResult, Method, register

__all__ = ["cosine_map", "query_feature"]


def query_feature(tokens: torch.Tensor, layout: TokenLayout, query: Query) -> torch.Tensor:
    """The feature ``(B, D)`` of ``query`` in ``tokens`` ``(B, N, D)`` (the centre patch for ``None``)."""
    if query is None:
        rows, cols = layout.grid
        query = (rows // 2, cols // 2)
    ids = layout.query_ids(query)  # one token, or every patch for "mean"
    return tokens[:, ids].mean(dim=1)


def cosine_map(query: torch.Tensor, patches: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of ``query`` ``(B, D)`` to ``patches`` ``(B, rows, cols, D)``: ``(B, rows, cols)``."""
    q = query / query.norm(dim=-1, keepdim=True).clamp_min(eps)
    p = patches / patches.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.einsum("bd,brcd->brc", q, p)


def _compute(ctx: MapContext, *, layer: int = -1, norm: bool = True, query: Query = None,
             reference: Any = None) -> MapResult:
    feats = patch_features(ctx.vit, ctx.pixels, layer=layer, norm=norm)
    if query is None and (reference is None or isinstance(reference, (bool, numbers.Integral))):
        query = (feats.layout.grid[0] // 2, feats.layout.grid[1] // 2)  # the centre patch, named in meta
    B = int(ctx.pixels.shape[0])
    described: Any = None
    if reference is None:
        q = query_feature(feats.tokens, feats.layout, query)  # (B, D)
    elif isinstance(reference, (bool, numbers.Integral)):
        k = as_index(reference, "reference", "image", f"pass an image index in [0, {B - 1}]")
        if not 0 <= k < B:
            raise VitscopeError("reference", f"image {k} out of range for {B} images", f"pass an index in [0, {B - 1}]")
        q = query_feature(feats.tokens[k:k + 1], feats.layout, query).expand(B, -1)
        described = k
    else:
        from vitscope.capture.prepare import prepare

        try:
            _, ref_pixels = prepare(ctx.vit, reference)
        except VitscopeError as exc:  # the reader names "image"/"images": here it is the reference
            raise VitscopeError("reference", exc.problem, exc.fix) from None
        if int(ref_pixels.shape[0]) != 1:
            raise VitscopeError("reference", f"{int(ref_pixels.shape[0])} images given", "pass one reference image")
        ref = patch_features(ctx.vit, ref_pixels, layer=layer, norm=norm)
        q = query_feature(ref.tokens, ref.layout, query).expand(B, -1)
        described = str(reference) if isinstance(reference, str) else type(reference).__name__
    sim = cosine_map(q, feats.patches)
    shown = list(query) if isinstance(query, tuple) else query
    return MapResult(map=sim.float(), meta={"layer": feats.layer, "norm": feats.norm, "query": shown,
                                            "reference": described})


register(Method(
    name="similarity", compute=_compute, needs="features",
    summary="cosine similarity of one patch's (or token's) feature to every patch, of the same or another image",
    paper="Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024",
))
