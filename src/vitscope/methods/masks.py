"""`dino_mask`: per head, the smallest set of patches holding a fraction ``tau`` of the attention mass.

DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", Sec. 4.2.1 and
``visualize_attention.py``): the [CLS] attention of each last-layer head over the patches is normalised to
sum to 1, sorted, cumulatively summed and thresholded, keeping the top patches that hold ``tau = 0.6`` of
the mass; the mask is unsorted back onto the grid.
"""

from __future__ import annotations

import torch

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.methods._common import Query, check_unit, per_image_maps, rows_needed
from vitscope.methods.registry import MapContext, MapResult, Method, register

#: Tolerance on the mass comparison (float32 maps carry ~1e-7 relative rounding).
MASS_SLACK = 1e-6


def mass_mask(maps: torch.Tensor, tau: float = 0.6) -> torch.Tensor:
    """Smallest top set of each map ``(..., rows, cols)`` holding at least ``tau`` of its mass.

    Each map is first normalised over its cells (``m / sum m``); cell ``i`` (in decreasing order) is kept
    iff the mass of the cells strictly before it is ``< tau``, which is DINO's "sort, cumsum, threshold at
    ``1 - tau`` from below, unsort" stated without the floating-point asymmetry of comparing against
    ``1 - tau``. Ties are broken by the sort (stable, so by position). Computed in float64, with a slack of
    `MASS_SLACK` so float32 rounding of maps that hit ``tau`` exactly does not add a cell (the kept cells
    hold at least ``tau - MASS_SLACK`` of the mass).

    Returns:
        bool tensor of the same shape.
    """
    check_unit("tau", tau)
    if maps.dim() < 2:
        raise VitscopeError("maps", f"shape {tuple(maps.shape)} has no (rows, cols) grid", "pass (..., rows, cols)")
    if (maps < 0).any():
        raise VitscopeError("maps", "has negative values; a mass mask needs non-negative maps", "clamp or shift it")
    lead, (rows, cols) = maps.shape[:-2], maps.shape[-2:]
    m = maps.reshape(-1, rows * cols).double()  # (M, P)
    m = m / m.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    val, idx = torch.sort(m, dim=-1, descending=True, stable=True)  # (M, P)
    before = val.cumsum(dim=-1) - val  # mass of the cells strictly before each one
    keep_sorted = before < tau - MASS_SLACK
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, idx, keep_sorted)  # unsort
    return keep.reshape(*lead, rows, cols)


def dino_mask(
    attn: Attentions | torch.Tensor,
    tau: float = 0.6,
    *,
    layer: int = -1,
    query: Query = None,
) -> torch.Tensor:
    """DINO's attention masks: per head, keep the smallest set of patches holding ``tau`` of the mass.

    ``mask[b, h] = topset(a / sum a, tau)`` with ``a = A[layer, b, h, q, patches]`` the query row (default
    [CLS], or the mean over patch rows for models without one) restricted to the patches and normalised over
    them first (so register/[CLS] mass does not count), as DINO's ``visualize_attention.py`` does.

    Args:
        attn: `Attentions` (heads kept separate), or maps ``(..., rows, cols)`` (non-negative) to threshold.
        tau: fraction of the mass to keep (DINO: 0.6).
        layer: layer of ``attn`` (default the last).
        query: query token (see `cls_map`).

    Returns:
        bool ``(batch, heads, rows, cols)`` for `Attentions`; same shape as the maps for a tensor.
    """
    if isinstance(attn, Attentions) and attn.grids is not None:  # a padded batch: each image on its own grid
        return per_image_maps(attn, lambda a: dino_mask(a, tau, layer=layer, query=query))
    if isinstance(attn, Attentions):
        from vitscope.methods.cls_attention import cls_map

        maps = cls_map(attn, layer=layer, head="all", query=query, renormalize=True)  # (B, H, rows, cols)
    else:
        maps = attn
    return mass_mask(maps, tau)


def _compute(ctx: MapContext, *, tau: float = 0.6, layer: int = -1, head: str | int = "mean",
             query: Query = None) -> MapResult:
    attn = ctx.capture(layers=[layer], queries=rows_needed(ctx.vit.info.prefix, query))
    mask = dino_mask(attn, tau, layer=layer, query=query)  # (B, H, rows, cols) bool
    if not isinstance(head, str):  # a head index (checked: an int in range)
        from vitscope.methods._common import head_position

        grid_map = mask[:, head_position(attn, head)].float()
    elif head != "mean":
        raise VitscopeError("head", f"unknown value {head!r}", "use 'mean' (the share of heads) or a head index")
    else:
        grid_map = mask.float().mean(dim=1)  # share of heads whose mask keeps each patch
    return MapResult(map=grid_map, extras={"mask": mask}, meta={"layer": attn.layers[-1]})


register(Method(
    name="dino_mask", compute=_compute, upsample="nearest",
    summary="per head, the smallest patch set holding tau of the [CLS] attention; the map is the share of heads",
    paper="Caron et al., Emerging Properties in Self-Supervised Vision Transformers (DINO), ICCV 2021",
))
