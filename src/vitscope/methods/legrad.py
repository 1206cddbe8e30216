"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne 2024, "LeGrad: An Explainability Method for
Vision Transformers via Feature Formation Sensitivity", arXiv:2404.03214, ICCV 2025).

Each layer's output tokens ``x_l`` are read out as if they were the last layer's (final norm and head: for a
[CLS] classifier ``s_l = head(norm(x_l)[cls])``), giving a per-layer score ``s_l^c`` for the target. The
signal is the gradient of that score w.r.t. the *same* layer's attention map:

    E_l = mean_h mean_i relu( ds_l^c / dA_l )[h, i, patches]      mean over heads and all N query rows
    map = minmax( sum_{l >= start_layer} E_l )                      min-max normalised per image

This follows the authors' reference implementation (``WalBouss/LeGrad``, ``compute_legrad_clip``: ReLU of
the gradient, mean over heads, mean over query rows, prefix columns dropped, sum over layers, min-max).
The paper aggregates all layers (our default ``start_layer=0``); the authors' OpenCLIP wrapper defaults to
the last two (``start_layer=-2``). Gradients are exact under fused attention (``dL/dA = dL/dO @ V^T``).

Read-out. vitscope's default (``readout="model"``) reads each layer out exactly as the model reads its last
layer (the adapter's `VitModel.readout`: final norm and head on [CLS], or DINOv2's [CLS] + patch-mean head),
so that ``s_l`` for the last layer *is* the model's own score. The authors' CLIP code (``compute_legrad_clip``)
instead pools the mean of all tokens, ``ln_post(mean_i x_l[i]) @ proj``; ``readout="official"`` does that
(the mean token put through the same final norm and head). The other difference from the authors' code is the
order of the last two steps: it upsamples every layer's map bilinearly and min-maxes the upsampled sum,
vitscope min-maxes on the patch grid (maps are returned on the grid; `upsample` them after), so the peak value
of an upsampled vitscope map can differ from theirs by the interpolation at the peak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vitscope._ops import minmax
from vitscope.adapters.base import SizePolicy, VitModel
from vitscope.errors import VitscopeError
from vitscope.methods._gradients import (
    Target,
    attention_grads,
    grad_enabled,
    layers_from,
    resolve_classes,
    scores,
    trace,
)
from vitscope.methods.registry import MapContext, MapResult, Method, register

Readout = Callable[[torch.Tensor], Any]


def default_readout(vit: VitModel) -> Readout:
    """The adapter's read-out (final norm + pooling + head on tokens ``(B, N, D)``), or a one-line error."""
    if vit.readout is None:
        raise VitscopeError(
            "readout", f"vitscope does not know how to read out intermediate tokens of {type(vit.module).__name__}",
            "pass readout=lambda tokens: <final norm + head applied to tokens (B, N, D)>",
        )
    return vit.readout


def resolve_readout(vit: VitModel, readout: Readout | str | None) -> Readout:
    """The read-out function for ``readout`` (see `legrad`)."""
    if callable(readout):
        return readout
    if readout in (None, "model"):
        return default_readout(vit)
    if readout == "official":
        base = default_readout(vit)

        def mean_token(x: torch.Tensor) -> Any:  # every token replaced by the mean token (B, N, D)
            return base(x.mean(dim=1, keepdim=True).expand_as(x))

        return mean_token
    raise VitscopeError("readout", f"unknown read-out {readout!r}", "use 'model', 'official' or a callable")


@grad_enabled
def legrad(
    model: Any,
    images: Any,
    target: Target = None,
    *,
    start_layer: int = 0,
    readout: Readout | str | None = None,
    normalize: bool = True,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """LeGrad map ``(batch, rows, cols)``; see the module docstring.

    Args:
        model: a `VitModel`, spec or module (left unchanged).
        images: anything `vitscope.capture` takes.
        target: class index (default: the predicted class of the full model), one per image, or a callable
            applied to each layer's read-out output, returning one scalar per image.
        start_layer: first layer aggregated (default 0: all layers).
        readout: ``"model"`` (default: the model's own read-out, known for vitscope, timm, transformers and
            torchvision classifiers), ``"official"`` (the authors' CLIP read-out: the mean of all tokens through
            the same final norm and head), or a callable mapping block-output tokens ``(B, N, D)`` to an output.
        normalize: min-max normalise each map (the paper's last step); False returns ``sum_l E_l``.
        policy, size: preprocessing (see `vitscope.capture`).
    """
    from vitscope.adapters import as_vit

    vit = as_vit(model)
    read = resolve_readout(vit, readout)
    t = trace(vit, images, layers_from(vit, start_layer), blocks=True, policy=policy, size=size)
    classes = resolve_classes(vit, t.output, target)
    total: torch.Tensor | None = None
    for n, i in enumerate(t.layers):
        s = scores(vit, read(t.blocks[i]), target, classes)  # (B,) score read out at layer i
        g = attention_grads(t, s, [i], retain_graph=n < len(t.layers) - 1)[i]  # (B, H, N, N)
        e = g.clamp_min(0.0).mean(dim=1).mean(dim=1)[:, t.patch_slice]  # (B, P): all query rows, patch columns
        total = e if total is None else total + e
    assert total is not None
    out = total.reshape(total.shape[0], *t.grid).detach()
    return (minmax(out) if normalize else out).float()


def _compute(ctx: MapContext, *, target: Target = None, start_layer: int = 0, readout: str = "model",
             normalize: bool = True) -> MapResult:
    classes = ctx.classes(target)
    grid_map = legrad(ctx.vit, ctx.pixels, classes, start_layer=start_layer, readout=readout, normalize=normalize)
    return MapResult(map=grid_map.detach().float(), meta={"target": classes if isinstance(classes, list) else None})


register(Method(
    name="legrad", compute=_compute, needs="gradients",
    summary="LeGrad: per layer, the gradient of the read-out score w.r.t. the attention, averaged and min-maxed",
    paper="Bousselham et al., LeGrad: An Explainability Method for Vision Transformers via Feature Formation Sensitivity, 2024",
))
