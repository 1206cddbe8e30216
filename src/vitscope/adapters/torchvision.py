"""torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_l_32``, ...).

Token layout ``[CLS, patches]`` (``class_token``); each ``encoder.layers[i].self_attention`` is an
``nn.MultiheadAttention`` (batch first), read by `vitscope.capture.intercept` from its inputs and weights while
its own fast path runs, so outputs stay bit-identical. torchvision's ViT accepts only its own square
``image_size`` (its forward asserts it): inputs are resized to it.

Example:
    >>> vit = vitscope.load("torchvision:vit_b_16", checkpoint="vit_b_16.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import AttentionSite, ModelInfo, Preprocess, VitModel, import_optional
from vitscope.errors import CheckpointError, NotAViTError, VitscopeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)




def from_torchvision_model(module: nn.Module, name: str | None = None) -> VitModel:
    """Describe a ``torchvision.models.VisionTransformer`` instance (used as given)."""
    tv = import_optional("torchvision", "torchvision")
    if not isinstance(module, tv.models.VisionTransformer):
        raise NotAViTError(
            "model", f"torchvision model {type(module).__name__} is not a VisionTransformer",
            "vitscope reads torchvision's ViTs (vit_b_16, ...); Swin and MaxViT use windowed attention",
        )
    sites = []
    for i, layer in enumerate(module.encoder.layers):
        mha = layer.self_attention
        sites.append(AttentionSite(layer=i, block=layer, attn=mha, num_heads=int(mha.num_heads)))
    size = int(module.image_size)
    patch = int(module.patch_size)
    heads = getattr(module, "heads", None)
    head = getattr(heads, "head", None)
    num_classes = int(head.out_features) if isinstance(head, nn.Linear) else None
    info = ModelInfo(
        name=name or "torchvision.VisionTransformer", family="torchvision", num_layers=len(sites),
        num_heads=sites[0].num_heads, embed_dim=int(module.hidden_dim), patch_size=(patch, patch), prefix=("cls",),
        preprocess=Preprocess(image_size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, policy="resize",
                              resample="bilinear", dynamic_size=False, channels=3),
        num_classes=num_classes,
    )

    def forward(m: nn.Module, pixels: torch.Tensor) -> Any:
        if tuple(pixels.shape[-2:]) != (size, size):
            raise VitscopeError(
                "images", f"torchvision's ViT takes only {size}x{size} inputs, got {pixels.shape[-2]}x{pixels.shape[-1]}",
                f"use policy='resize' (the default) or size={size}",
            )
        return m(pixels)

    def readout(x: torch.Tensor) -> torch.Tensor:
        return module.heads(module.encoder.ln(x)[:, 0])

    return VitModel(module, info, sites, forward=forward, readout=readout if num_classes else None)


def load_torchvision(
    name: str, weights: str | None = None, checkpoint: str | os.PathLike[str] | None = None, **kwargs: Any
) -> VitModel:
    """Build ``torchvision.models.<name>`` (``weights="DEFAULT"`` downloads torchvision's; offline, pass a local
    ``checkpoint`` state dict, read with ``weights_only=True``)."""
    tv = import_optional("torchvision", "torchvision")
    builder = getattr(tv.models, name, None)
    if builder is None or not callable(builder):
        vits = [n for n in tv.models.list_models() if n.startswith("vit_")]
        raise VitscopeError("model", f"torchvision has no model {name!r}", f"use one of {', '.join(vits)}")
    state = None
    if checkpoint is not None:  # read and checked before the model is built
        from vitscope.adapters.checkpoint import read_state

        state = read_state(checkpoint)
    try:
        model = builder(weights=weights, **kwargs)
    except Exception as exc:
        if weights is None:
            raise VitscopeError("model", f"torchvision.models.{name}(...) failed: {exc}", "check the keyword arguments") from None
        raise CheckpointError(
            "weights", f"cannot download torchvision's weights for {name!r} ({type(exc).__name__})",
            "offline? pass checkpoint='path/to/state_dict.pth' instead",
        ) from None
    if checkpoint is not None:
        from vitscope.adapters.checkpoint import load_state_into

        load_state_into(model, checkpoint, f"torchvision {name}", state)
    return from_torchvision_model(model.eval(), name=f"torchvision:{name}")
