"""Gradient-weighted relevance (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV; the self-attention rule, Eq. 5-6).

With ``y_c`` the target logit and ``A_l`` layer ``l``'s attention ``(H, N, N)``:

    Ā_l = mean_h ( (∇A_l ⊙ A_l)^+ ),   ∇A_l = dy_c / dA_l
    R_0 = I,   R_l = R_{l-1} + Ā_l R_{l-1}        (layers start_layer .. last, in depth order)

and the map is the [CLS] row of ``R`` over the patch columns (for models without [CLS]: the mean of the
patch rows). ``(x)^+`` keeps positive values; the ReLU is applied per head, before the head mean.
"""

from __future__ import annotations

from typing import Any

import torch

from vitscope.adapters.base import SizePolicy
from vitscope.methods._common import Query
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
from vitscope.methods.rollout import map_from_matrix
from vitscope.methods.targets import TokenScore, target_meta


def relevance_update(r: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One layer of the rule: ``R + mean_h((g ⊙ a)^+) R`` with ``r`` ``(B, N, N)``, ``a, g`` ``(B, H, N, N)``."""
    a_bar = (g * a).clamp_min(0.0).mean(dim=1)  # (B, N, N)
    return r + a_bar @ r


@per_target
@grad_enabled
def chefer_relevance(
    model: Any,
    images: Any,
    target: Target = None,
    *,
    start_layer: int = 0,
    query: Query = None,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Chefer et al. (2021) relevance map ``(batch, rows, cols)``; see the module docstring.

    Args:
        model: a `VitModel`, spec or module (left unchanged).
        images: anything `vitscope.capture` takes.
        target: class index (default the predicted class), one per image, or a callable on the output
            returning one scalar per image.
        start_layer: first layer of the update (default 0: all layers).
        query: row of ``R`` giving the map (default [CLS], else the mean over patch rows).
        policy, size: preprocessing (see `vitscope.capture`).
    """
    from vitscope.adapters import as_vit

    vit = as_vit(model)
    t = trace(vit, images, layers_from(vit, start_layer), policy=policy, size=size,
              last_block=isinstance(target, TokenScore))
    layers = list(t.layers)
    classes = resolve_classes(vit, t.output, target)
    grads = attention_grads(t, target_scores(t, target, classes), layers)
    B, _, N, _ = t.attn[layers[0]].shape
    r = torch.eye(N, dtype=torch.float64, device=t.pixels.device).expand(B, N, N).clone()
    for i in layers:
        r = relevance_update(r, t.attn[i].double(), grads[i].double())
    return map_from_matrix(r, t.prefix, t.grid, query, t.suffix).float().detach()


def _compute(ctx: MapContext, *, target: Target = None, start_layer: int = 0, query: Query = None) -> MapResult:
    classes = ctx.classes(target)
    grid_map = chefer_relevance(ctx.vit, ctx.pixels, classes, start_layer=start_layer, query=query)
    return MapResult(map=grid_map.detach().float(), meta={"target": target_meta(classes)})


register(Method(
    name="chefer", compute=_compute, needs="gradients",
    summary="Chefer relevance: R <- R + mean_h((dL/dA * A)^+) R over layers, the query row over patches",
    paper="Chefer, Gur & Wolf, Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers, ICCV 2021",
))
