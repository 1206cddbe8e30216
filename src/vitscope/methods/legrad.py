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

Reproducing the official code. For a text prompt on an open_clip ViT, the authors' ``compute_legrad_clip``
scores ``cos(text, ln_post(mean_i x_l[i]) @ proj)`` at each layer ``l >= start_layer`` (their default: the last
two), upsamples each layer's map by the patch size (bilinear) and min-maxes the sum. vitscope's
``legrad(model, image, "text:...", readout="official", start_layer=-2, normalize=False)`` upsampled the same way
(``torch.nn.functional.interpolate(m[:, None], scale_factor=patch, mode="bilinear")``) and min-maxed equals it:
the model's logit is ``logit_scale.exp() * cos (+ bias)``, a positive scale and a constant that the ReLU and the
min-max remove.
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
    per_target,
    resolve_classes,
    scores,
    trace,
)
from vitscope.methods.registry import MapContext, MapResult, Method, register
from vitscope.methods.targets import TokenScore, target_meta

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


def token_readout(readout: Readout | str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tokens as a text/reference target reads them at each layer: as they are (``"model"``: the model's own
    embedding of the layer's tokens) or every token replaced by their mean (``"official"``: the authors' CLIP
    read-out, ``ln_post(mean_i x_l[i]) @ proj``)."""
    if readout in (None, "model"):
        return lambda x: x
    if readout == "official":
        return lambda x: x.mean(dim=1, keepdim=True).expand_as(x)
    raise VitscopeError("readout", f"{readout!r} with a text, image or patch target",
                        "use readout='model' or 'official': these targets read out through the model's own embedding")


@per_target
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
        target: class index or name (default: the predicted class of the full model), one per image, a callable
            applied to each layer's read-out output, returning one scalar per image, or a text prompt /
            reference (`vitscope.methods.targets`), scored on each layer's tokens through the model's own
            embedding (``readout="official"``: of their mean token).
        start_layer: first layer aggregated (default 0: all layers).
        readout: ``"model"`` (default: the model's own read-out, known for vitscope, timm, transformers and
            torchvision classifiers), ``"official"`` (the authors' CLIP read-out: the mean of all tokens through
            the same final norm and head), or a callable mapping block-output tokens ``(B, N, D)`` to an output.
        normalize: min-max normalise each map (the paper's last step); False returns ``sum_l E_l``.
        policy, size: preprocessing (see `vitscope.capture`).
    """
    from vitscope.adapters import as_vit

    vit = as_vit(model)
    token = target if isinstance(target, TokenScore) else None  # scored on the model's own embedding
    read = token_readout(readout) if token is not None else resolve_readout(vit, readout)
    t = trace(vit, images, layers_from(vit, start_layer), blocks=True, policy=policy, size=size)
    classes = resolve_classes(vit, t.output, target)
    total: torch.Tensor | None = None
    for n, i in enumerate(t.layers):
        x = read(t.blocks[i])
        s = token.score(x, t.grid) if token is not None else scores(vit, x, target, classes)  # (B,) at layer i
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
    return MapResult(map=grid_map.detach().float(), meta={"target": target_meta(classes)})


register(Method(
    name="legrad", compute=_compute, needs="gradients",
    summary="LeGrad: per layer, the gradient of the read-out score w.r.t. the attention, averaged and min-maxed",
    paper="Bousselham et al., LeGrad: An Explainability Method for Vision Transformers via Feature Formation Sensitivity, 2024",
))
