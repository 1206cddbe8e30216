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

from vitscope.adapters.base import (
    AttentionSite,
    ModelInfo,
    Preprocess,
    VitModel,
    choose_weights,
    import_optional,
    with_weights,
)
from vitscope.errors import CheckpointError, NotAViTError, VitscopeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)




def from_torchvision_model(module: nn.Module, name: str | None = None) -> VitModel:
    """Describe a ``torchvision.models.VisionTransformer`` instance (used as given)."""
    tv = import_optional("torchvision", "'vitscope[torchvision]'")
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


def _not_downloadable(tv: Any, name: str, tag: str) -> str | None:
    """Why torchvision's ``tag`` weights of ``name`` cannot be had now (not in torch's hub cache and their server
    unreachable), or ``None`` (cached, reachable, or unknown: torchvision itself then decides)."""
    from pathlib import Path
    from urllib.parse import urlparse

    try:
        enum = tv.models.get_model_weights(name)
        url = str((enum.DEFAULT if tag == "DEFAULT" else enum[tag]).url)
    except Exception:  # an unknown tag: torchvision's own error says which exist
        return None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        return None
    from vitscope.adapters._hub import unreachable

    reason = unreachable(url)
    return None if reason is None else f"offline ({reason})"


def load_torchvision(
    name: str, weights: str | None = None, checkpoint: str | os.PathLike[str] | None = None,
    random_weights: bool = False, **kwargs: Any
) -> VitModel:
    """Build ``torchvision.models.<name>`` with torchvision's pretrained weights (``weights``: a tag such as
    ``"IMAGENET1K_V1"``, default ``"DEFAULT"``; downloaded, or read from torch's hub cache), or a local
    ``checkpoint`` state dict (read with ``weights_only=True``), or untrained with ``random_weights=True``
    (announced with a `VitscopeWarning`)."""
    tv = import_optional("torchvision", "'vitscope[torchvision]'")
    builder = getattr(tv.models, name, None)
    if builder is None or not callable(builder):
        vits = [n for n in tv.models.list_models() if n.startswith("vit_")]
        raise VitscopeError("model", f"torchvision has no model {name!r}", f"use one of {', '.join(vits)}")
    choice = choose_weights(checkpoint, random_weights, weights)
    tag = (weights or "DEFAULT") if choice == "pretrained" else None
    state = None
    if checkpoint is not None:  # read and checked before the model is built
        from vitscope.adapters.checkpoint import read_state

        state = read_state(checkpoint)
    offline_fix = ("download torchvision's .pth on a connected machine and pass `checkpoint='path/to/state_dict.pth'` "
                   "(or load it once online: torch's hub cache is used offline), or pass `random_weights=True` for "
                   "an untrained model")
    if tag is not None:  # not cached and the server unreachable: say so at once, not after the download's retries
        reason = _not_downloadable(tv, name, tag)
        if reason is not None:
            raise CheckpointError("model", f"cannot download torchvision's weights for {name!r}: {reason}",
                                  offline_fix)
    try:
        model = builder(weights=tag, **kwargs)
    except Exception as exc:
        if tag is None:
            raise VitscopeError("model", f"torchvision.models.{name}(...) failed: {exc}", "check the keyword arguments") from None
        raise CheckpointError(
            "model", f"cannot download torchvision's weights for {name!r} ({type(exc).__name__})", offline_fix,
        ) from None
    if checkpoint is not None:
        from vitscope.adapters.checkpoint import load_state_into

        load_state_into(model, checkpoint, f"torchvision {name}", state)
    vit = from_torchvision_model(model.eval(), name=f"torchvision:{name}")
    return with_weights(vit, f"checkpoint {checkpoint}" if choice == "checkpoint" else choice)
