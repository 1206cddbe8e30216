"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL).

Per layer ``l`` (from ``start_layer`` to the last captured one), with ``A_l`` the ``(N, N)`` attention of
one image (rows are queries):

    F_l  = fuse_h A_l                          head fusion: mean (paper), max or min
    D_l  = discard(F_l, discard_ratio)         zero the lowest entries, never the [CLS] key column
    Â_l  = (1 - a) D_l + a I                   residual weight a (paper: 0.5, i.e. 0.5 A + 0.5 I)
    Â_l  = Â_l / rowsum(Â_l)                   row renormalisation (a no-op for mean fusion, no discard)
    R    = Â_L · ... · Â_start                 (later layers on the left)

and the map is the [CLS] row of ``R`` over the patch columns (for models without [CLS]: the mean of the
patch rows). ``R[i, j]`` is the share of token ``i``'s output at the top that "comes from" input token ``j``.

Presets (``rollout(attn, preset=...)``); all use ``a = 0.5`` and row renormalisation:

- ``"abnar"`` (the default): mean fusion, no discard, all layers, as in the paper.
- ``"vit-explain"``: jacobgil/vit-explain's command-line defaults, ``head_fusion="max"``,
  ``discard_ratio=0.9``. Differences from its code: vit-explain flattens the whole ``N x N`` matrix and
  protects only the single ``[CLS, CLS]`` entry, ours protects the whole [CLS] key column; vit-explain
  divides by ``a.sum(dim=-1)`` without ``keepdim`` (which broadcasts over columns), ours divides rows as its
  comment intends; vit-explain also rescales its map by its maximum, which only changes the colour scale.
- ``"chefer"``: the rollout baseline of Chefer et al. 2021: ``(A + I)`` with rows normalised, heads averaged;
  identical to ``"abnar"`` because mean-fused rows already sum to 1 (``(A + I) / 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.methods._common import (
    Query,
    check_unit,
    contiguous_layers,
    discard_lowest,
    fuse_heads,
    mix_residual,
    per_image_maps,
    require_full,
    token_ids_for_query,
)
from vitscope.methods.registry import MapContext, MapResult, Method, register


@dataclass(frozen=True)
class RolloutSettings:
    """Settings of one rollout variant (see the module docstring)."""

    head_fusion: str = "mean"
    residual: float = 0.5
    discard_ratio: float = 0.0
    renormalize: bool = True


#: Named settings: ``rollout(attn, preset="vit-explain")``.
PRESETS: dict[str, RolloutSettings] = {
    "abnar": RolloutSettings(),
    "vit-explain": RolloutSettings(head_fusion="max", discard_ratio=0.9),
    "chefer": RolloutSettings(),
}


def _settings(preset: str | None, **overrides: Any) -> RolloutSettings:
    if preset is None:
        base = RolloutSettings()
    elif isinstance(preset, str) and preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise VitscopeError("preset", f"unknown preset {preset!r}", f"use one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if not isinstance(given.get("renormalize", True), bool):
        raise VitscopeError("renormalize", f"expected True or False, got {given['renormalize']!r}",
                            "pass renormalize=True or False")
    return RolloutSettings(**{**base.__dict__, **given})


def rollout_step(
    a: torch.Tensor, s: RolloutSettings, cls_index: int | None, heads: object = "all"
) -> torch.Tensor:
    """One layer's rollout factor ``Â`` from its attention ``a`` ``(B, H, N, N)``: ``(B, N, N)``."""
    fused = fuse_heads(a.double(), s.head_fusion, heads, dim=1)  # (B, N, N)
    fused = discard_lowest(fused, s.discard_ratio, cls_index)
    return mix_residual(fused, s.residual, s.renormalize)


def rollout_product(factors: list[torch.Tensor]) -> torch.Tensor:
    """``R = F_last @ ... @ F_first`` for factors ``(B, N, N)`` in depth order."""
    result = factors[0]
    for f in factors[1:]:
        result = f @ result
    return result


def map_from_matrix(r: torch.Tensor, prefix: tuple[str, ...], grid: tuple[int, int], query: Query,
                    suffix: tuple[str, ...] = ()) -> torch.Tensor:
    """Row(s) of a token-to-token matrix ``(B, N, N)`` for ``query``, over the patch columns: ``(B, rows, cols)``
    (the columns after the prefix tokens and before the suffix tokens)."""
    ids = token_ids_for_query(prefix, grid, query, suffix)
    P0 = len(prefix)
    rows = r[:, ids].mean(dim=1)[:, P0:P0 + grid[0] * grid[1]]  # (B, P)
    return rows.reshape(r.shape[0], *grid)


def rollout_matrix(
    attn: Attentions,
    *,
    preset: str | None = None,
    head_fusion: str | None = None,
    residual: float | None = None,
    discard_ratio: float | None = None,
    start_layer: int = 0,
    renormalize: bool | None = None,
) -> torch.Tensor:
    """The full rollout matrix ``R`` ``(batch, N, N)`` (float64); see `rollout` for the arguments."""
    attn.layout.require_one_grid("rollout_matrix")
    require_full(attn, "rollout")
    s = _settings(
        preset, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, renormalize=renormalize
    )
    check_unit("residual", s.residual)
    check_unit("discard_ratio", s.discard_ratio, closed_top=False)
    positions = contiguous_layers(attn, start_layer, "rollout")
    factors = [rollout_step(attn.weights[p], s, attn.cls_index, attn.heads) for p in positions]
    return rollout_product(factors)


def rollout_all_rows(attn: Attentions, batch: int = 0, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout for every query row, cumulative over the captured layers (in depth order).

    With ``Â_l = rownorm(residual * I + (1 - residual) * mean_h A_l)`` (one factor of
    `vitscope.methods.rollout`, mean head fusion, no discard), returns ``R`` ``(layers, N, N)`` float32 with
    ``R_0 = Â_0`` and ``R_l = Â_l @ R_{l-1}``: row ``q`` of ``R_l`` is how much token ``q`` after layer ``l``
    draws from each input token (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers";
    residual 0.5 as in the paper). Needs every query row.
    """
    if not 0.0 <= residual <= 1.0:
        raise VitscopeError("residual", f"{residual} is outside [0, 1]", "use 0.5 (Abnar & Zuidema)")
    if attn.queries is not None:
        raise VitscopeError("attn", "rollout needs every query row", "capture with queries=None")
    settings = RolloutSettings(head_fusion="mean", residual=residual, discard_ratio=0.0, renormalize=True)
    L, N = attn.weights.shape[0], attn.num_tokens
    out = torch.empty(L, N, N, dtype=torch.float32)
    acc: torch.Tensor | None = None
    for pos in sorted(range(L), key=lambda i: attn.layers[i]):
        a = attn.weights[pos, batch : batch + 1].detach().cpu()  # (1, H, N, N)
        factor = rollout_step(a, settings, attn.cls_index, attn.heads)[0]  # (N, N) float64
        acc = factor if acc is None else factor @ acc
        out[pos] = acc.float()
    return out


def rollout(
    attn: Attentions,
    *,
    preset: str | None = None,
    head_fusion: str | None = None,
    residual: float | None = None,
    discard_ratio: float | None = None,
    start_layer: int = 0,
    renormalize: bool | None = None,
    query: Query = None,
) -> torch.Tensor:
    """Attention rollout map ``(batch, rows, cols)`` (Abnar & Zuidema 2020).

    ``R = Â_L ... Â_start`` with ``Â_l = rownorm((1 - a) discard(fuse_h A_l) + a I)``; the map is
    ``R[cls, patches]`` (see the module docstring for every step and the presets).

    Args:
        attn: attentions with every query row (``capture(..., queries=None)``) of consecutive layers.
        preset: ``"abnar"`` (default settings), ``"vit-explain"`` or ``"chefer"``; explicit arguments
            override the preset's.
        head_fusion: ``"mean"`` (default), ``"max"`` or ``"min"``.
        residual: weight ``a`` of the identity (default 0.5: ``0.5 A + 0.5 I``).
        discard_ratio: share of each fused matrix's lowest entries set to 0 before adding the identity,
            never in the [CLS] key column (default 0).
        start_layer: first layer multiplied (absolute or negative; default 0 = all layers).
        renormalize: divide each ``Â_l``'s rows by their sum (default True).
        query: which row(s) of ``R`` make the map: default ``"cls"``, or ``"mean"`` over patch rows for models
            without [CLS]; any query accepted by `cls_map`.

    Returns:
        float32 ``(batch, rows, cols)``. With mean fusion, no discard and renormalisation, every row of ``R``
        sums to 1, so the map sums to the share of the query's rollout mass on patches.
    """
    if attn.grids is not None:  # a padded batch: each image's own tokens (padding dropped before the product)
        return per_image_maps(attn, lambda a: rollout(a, preset=preset, head_fusion=head_fusion, residual=residual,
                                                      discard_ratio=discard_ratio, start_layer=start_layer,
                                                      renormalize=renormalize, query=query))
    r = rollout_matrix(
        attn, preset=preset, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio,
        start_layer=start_layer, renormalize=renormalize,
    )
    return map_from_matrix(r, attn.prefix, attn.grid, query, attn.suffix).float()


#: with batch mode's observers waiting, rollout reads the context's capture (one forward pass for the map and the
#: per-image measures) while every layer's attention stays below this many bytes; above it, it streams
OBSERVED_BYTES = 256 * 2**20


def _compute(ctx: MapContext, *, preset: str | None = None, head_fusion: str | None = None,
             residual: float | None = None, discard_ratio: float | None = None, start_layer: int = 0,
             renormalize: bool | None = None, query: Query = None) -> MapResult:
    """The registry's rollout: rows pushed down the layers (`streaming_rollout`), never ``N x N x N`` products;
    the strategy (dense at small inputs; at large ones fused for mean fusion without discard, else streaming) is
    `vitscope.capture.budget.choose_strategy`'s.
    In batch mode, with per-image measures waiting on the context (`MapContext.observing`) and every layer's
    attention below `OBSERVED_BYTES`, it reads the context's capture instead, so the map and the measures come
    from one forward pass (the same map: tests/test_batch_onepass.py)."""
    from vitscope.capture.streaming import StreamRun
    from vitscope.methods.streaming import streaming_rollout

    s = _settings(preset, head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio,
                  renormalize=renormalize)
    check_unit("residual", s.residual)
    check_unit("discard_ratio", s.discard_ratio, closed_top=False)
    if ctx.observing and ctx.attention_bytes() <= OBSERVED_BYTES:
        # batch mode's measures ride on the context's capture: one forward pass for the map and the measures
        attn = ctx.capture()
        grid_map = rollout(attn, head_fusion=s.head_fusion, residual=s.residual, discard_ratio=s.discard_ratio,
                           start_layer=start_layer, renormalize=s.renormalize, query=query)
        return MapResult(map=grid_map, meta={"strategy": "captured", **s.__dict__})
    run = StreamRun(ctx.vit, ctx.pixels, ctx.grid, ctx.num_tokens)  # prepared once, by the context
    rows = streaming_rollout(
        run, ctx.pixels, residual=s.residual, head_fusion=s.head_fusion,  # type: ignore[arg-type]
        discard_ratio=s.discard_ratio, start_layer=start_layer, renormalize=s.renormalize,
        queries="auto" if query is None else query,
    )
    return MapResult(map=rows.maps()[:, 0].float(), meta={"strategy": rows.meta["strategy"], **s.__dict__})


register(Method(
    name="rollout", compute=_compute,
    summary="attention rollout: the product of residual-mixed, head-fused attention over layers",
    paper="Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020",
))
