"""Gradient attention rollout (jacobgil/vit-explain, ``vit_grad_rollout.py``, 2020).

Rollout (Abnar & Zuidema 2020) where each layer's attention is first weighted by the gradient of the
target class logit ``y_c`` with respect to it:

    G_l  = dy_c / dA_l                                       (B, H, N, N), from one backward pass
    F_l  = relu( mean_h (A_l ⊙ G_l) )                        relu="fused" (vit-explain's code, default)
         = mean_h (A_l ⊙ relu(G_l))                          relu="grad"
    Â_l  = rownorm( (1 - a) discard(F_l) + a I )             a = 0.5, discard never hits the [CLS] column
    R    = Â_L ... Â_start,  map = R[cls, patches]

vit-explain zeroes negative values of the head-averaged product (``attention_heads_fused[... < 0] = 0``)
and uses ``discard_ratio=0.9`` by default; both are our defaults too. ``relu="grad"`` keeps only positive
gradients before the product, as in Chefer et al.'s relevance. The gradient is exact under fused attention:
``dL/dA = dL/dO @ V^T`` (see ``vitscope.methods._gradients``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from vitscope.adapters.base import SizePolicy
from vitscope.errors import VitscopeError
from vitscope.methods._common import Query, check_unit, discard_lowest, mix_residual
from vitscope.methods._gradients import (
    Target,
    attention_grads,
    grad_enabled,
    layers_from,
    per_target,
    resolve_classes,
    target_scores,
    trace,
)
from vitscope.methods.registry import MapContext, MapResult, Method, register
from vitscope.methods.rollout import map_from_matrix, rollout_product
from vitscope.methods.targets import TokenScore, target_meta


def weighted_attention(a: torch.Tensor, g: torch.Tensor, relu: str) -> torch.Tensor:
    """The gradient-weighted, head-fused attention ``F`` ``(B, N, N)`` from ``a``, ``g`` ``(B, H, N, N)``."""
    if relu == "fused":
        return (a * g).mean(dim=1).clamp_min(0.0)
    if relu == "grad":
        return (a * g.clamp_min(0.0)).mean(dim=1)
    raise VitscopeError("relu", f"unknown value {relu!r}", "use 'fused' (vit-explain) or 'grad'")


@per_target
@grad_enabled
def grad_rollout(
    model: Any,
    images: Any,
    target: Target = None,
    *,
    discard_ratio: float = 0.9,
    residual: float = 0.5,
    relu: Literal["fused", "grad"] = "fused",
    start_layer: int = 0,
    query: Query = None,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Gradient attention rollout map ``(batch, rows, cols)`` (vit-explain).

    Args:
        model: a `VitModel`, spec string or supported module (left unchanged: hooks removed, flags restored,
            no ``.grad`` written).
        images: anything `vitscope.capture` takes.
        target: class index (default: the predicted class), one class per image, or a callable on the model
            output returning one scalar per image.
        discard_ratio: share of each weighted matrix's lowest entries zeroed (default 0.9, vit-explain's).
        residual: identity weight ``a`` (default 0.5).
        relu: ``"fused"`` (clamp after the head mean, vit-explain) or ``"grad"`` (clamp the gradient first).
        start_layer: first layer (default 0).
        query: row of the product giving the map (default [CLS], or the mean of patch rows without one).
        policy, size: preprocessing (see `vitscope.capture`).
    """
    check_unit("discard_ratio", discard_ratio, closed_top=False)
    check_unit("residual", residual)
    from vitscope.adapters import as_vit

    vit = as_vit(model)
    t = trace(vit, images, layers_from(vit, start_layer), policy=policy, size=size,
              last_block=isinstance(target, TokenScore))
    layers = list(t.layers)
    classes = resolve_classes(t.vit, t.output, target)
    grads = attention_grads(t, target_scores(t, target, classes), layers)
    cls_index = t.prefix.index("cls") if "cls" in t.prefix else None
    factors = []
    for i in layers:
        f = weighted_attention(t.attn[i].double(), grads[i].double(), relu)  # (B, N, N)
        f = discard_lowest(f, discard_ratio, cls_index)
        factors.append(mix_residual(f, residual, True))
    return map_from_matrix(rollout_product(factors), t.prefix, t.grid, query, t.suffix).float().detach()



def _compute(ctx: MapContext, *, target: Target = None, discard_ratio: float = 0.9, residual: float = 0.5, relu: Literal['fused', 'grad'] = 'fused', start_layer: int = 0, query: Query = None) -> MapResult:
    classes = ctx.classes(target)
    grid_map = grad_rollout(ctx.vit, ctx.pixels, classes, discard_ratio=discard_ratio, residual=residual, relu=relu, start_layer=start_layer, query=query)
    return MapResult(map=grid_map.detach().float(), meta={"target": target_meta(classes)})


register(Method(
    name="grad_rollout", compute=_compute, needs="gradients",
    summary="gradient-weighted attention rollout (vit-explain): rollout of mean_h((dL/dA * A)^+) with discard",
    paper="Gildenblat, vit-explain (2020): gradient attention rollout, after Abnar & Zuidema 2020",
))
