"""Attention Grad-CAM: one layer's attention weighted per head by its mean gradient.

Grad-CAM (Selvaraju et al., ICCV 2017) applied to a transformer's attention, as Chefer et al. use it as a
baseline ("GradCAM" in "Transformer Interpretability Beyond Attention Visualization", CVPR 2021, Table 1):
for layer ``l`` (default the last) and query row ``q`` (default [CLS]),

    w_h   = mean_{j in patches} dL/dA_{l,h}[q, j]                    one weight per head
    map   = ReLU( mean_h  w_h * A_{l,h}[q, patches] )

with ``L`` the target class logit. It is class-specific like Chefer's relevance but uses one layer and no
propagation. vitscope's ``dL/dA`` is exact (`vitscope.methods._gradients`), so the model's fused attention stays
on; Chefer's published code (``generate_attn_gradcam``) reads the same tensors from its own explicit attention.
"""

from __future__ import annotations

from typing import Any

import torch

from vitscope.adapters.base import SizePolicy
from vitscope.methods._common import Query, token_ids_for_query
from vitscope.methods._gradients import (
    Target,
    attention_grads,
    grad_enabled,
    per_target,
    resolve_classes,
    target_scores,
    trace,
)
from vitscope.methods.registry import MapContext, MapResult, Method, register
from vitscope.methods.targets import TokenScore, target_meta


@per_target
@grad_enabled
def attn_gradcam(
    model: Any,
    images: Any,
    target: Target = None,
    *,
    layer: int = -1,
    query: Query = None,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention Grad-CAM map ``(batch, rows, cols)``; see the module docstring.

    Args:
        model: a `VitModel`, spec or module (left unchanged).
        images: anything `vitscope.capture` takes.
        target: class index (default the predicted class), one per image, or a callable on the output.
        layer: the attention layer (default the last).
        query: the query row (default [CLS], else the mean over patch rows).
        policy, size: preprocessing (see `vitscope.capture`).

    Example:
        >>> attn_gradcam("vitscope:shapes", "cat.png").shape  # (1, rows, cols)  # doctest: +SKIP
    """
    from vitscope.adapters import as_vit
    from vitscope.capture.core import resolve_layers

    vit = as_vit(model)
    (lid,) = resolve_layers([layer], vit.info.num_layers, argument="layer")
    t = trace(vit, images, [lid], policy=policy, size=size,
              last_block=isinstance(target, TokenScore))
    classes = resolve_classes(vit, t.output, target)
    grads = attention_grads(t, target_scores(t, target, classes), [lid])
    patches = t.patch_slice  # [prefix, patches, suffix]
    ids = token_ids_for_query(t.prefix, t.grid, query, t.suffix)
    a = t.attn[lid][:, :, ids].mean(dim=2)[..., patches].double()  # (B, H, P): the query row(s) over patches
    g = grads[lid][:, :, ids].mean(dim=2)[..., patches].double()
    w = g.mean(dim=-1, keepdim=True)  # (B, H, 1)
    cam = (w * a).mean(dim=1).clamp_min(0.0)  # (B, P)
    rows, cols = t.grid
    return cam.reshape(cam.shape[0], rows, cols).float().detach()


def _compute(ctx: MapContext, *, target: Target = None, layer: int = -1, query: Query = None) -> MapResult:
    classes = ctx.classes(target)
    grid_map = attn_gradcam(ctx.vit, ctx.pixels, classes, layer=layer, query=query)
    return MapResult(map=grid_map, meta={"target": target_meta(classes)})


register(Method(
    name="attn_gradcam", compute=_compute, needs="gradients",
    summary="attention Grad-CAM: ReLU(mean_h w_h A_h[cls]) with w_h the head's mean gradient (Chefer's baseline)",
    paper="Selvaraju et al., Grad-CAM, ICCV 2017; as a ViT baseline in Chefer, Gur & Wolf, CVPR 2021",
))
