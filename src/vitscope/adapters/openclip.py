"""open_clip's ``VisionTransformer`` (the image tower of ``open_clip.create_model("ViT-B-32")`` and friends).

Token layout ``[CLS, patches]`` (``class_embedding``); each ``transformer.resblocks[i].attn`` is an
``nn.MultiheadAttention`` (or open_clip's own ``Attention`` for custom blocks), read where it computes its
attention. The grid is fixed by ``positional_embedding`` (``image_size`` may be non-square): inputs are resized
to it. Models with a timm trunk (``model.visual.trunk``) are described by the timm adapter.

Example:
    >>> vit = vitscope.load("open_clip:ViT-B-32", checkpoint="open_clip_pytorch_model.bin")  # doctest: +SKIP
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
    TextTower,
    VitModel,
    choose_weights,
    import_optional,
    scaled_cosine,
    with_weights,
)
from vitscope.errors import CheckpointError, NotAViTError, VitscopeError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)




def _pair(x: Any) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def from_open_clip_model(module: nn.Module, name: str | None = None) -> VitModel:
    """Describe an open_clip ``CLIP`` model (its ``visual`` tower runs) or a ``VisionTransformer``."""
    open_clip = import_optional("open_clip", "'vitscope[open_clip]'")
    from open_clip.transformer import VisionTransformer

    visual = getattr(module, "visual", module)
    trunk = getattr(visual, "trunk", None)
    if isinstance(trunk, nn.Module):  # TimmModel: a timm ViT inside
        from vitscope.adapters.timm import from_timm_model

        return from_timm_model(trunk, name=name)
    if not isinstance(visual, VisionTransformer):
        raise NotAViTError(
            "model", f"open_clip model {type(visual).__name__} is not a VisionTransformer",
            "vitscope reads open_clip's ViT towers (ViT-B-32, ...); ResNet (ModifiedResNet) towers have no attention",
        )
    del open_clip
    sites = []
    for i, blk in enumerate(visual.transformer.resblocks):
        attn = blk.attn
        heads = getattr(attn, "num_heads", None)
        if not isinstance(heads, int):
            raise NotAViTError("model", f"block {i}: {type(attn).__name__} has no num_heads")
        sites.append(AttentionSite(layer=i, block=blk, attn=attn, num_heads=heads))
    size, patch = _pair(visual.image_size), _pair(visual.patch_size)
    mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)
    info = ModelInfo(
        name=name or "open_clip.VisionTransformer", family="open_clip", num_layers=len(sites),
        num_heads=sites[0].num_heads, embed_dim=int(visual.conv1.out_channels), patch_size=patch, prefix=("cls",),
        preprocess=Preprocess(image_size=size, mean=mean, std=std, policy="resize",  # type: ignore[arg-type]
                              resample="bicubic", dynamic_size=False, channels=3),
    )

    def forward(m: nn.Module, pixels: torch.Tensor) -> Any:
        if tuple(pixels.shape[-2:]) != size:
            raise VitscopeError(
                "images", f"this open_clip ViT takes only {size[0]}x{size[1]} inputs, got "
                f"{pixels.shape[-2]}x{pixels.shape[-1]}", "use policy='resize' (the default)",
            )
        return getattr(m, "visual", m)(pixels)

    def embed(x: torch.Tensor) -> torch.Tensor:  # open_clip's own read-out: ln_post, pooling, projection
        pooled = visual._pool(x)[0]
        return pooled @ visual.proj if visual.proj is not None else pooled

    return VitModel(module, info, sites, forward=forward, embed=embed, final_norm=visual.ln_post,
                    text=_text_tower(module, name))


def _text_tower(module: nn.Module, name: str | None) -> TextTower | None:
    """The text side of an open_clip ``CLIP``/``CustomTextCLIP`` (``None`` for a bare ``VisionTransformer``):
    open_clip's tokenizer for the model (its bundled BPE vocabulary for OpenAI-style towers, offline), the
    model's ``encode_text`` and its logit scale (and SigLIP's bias)."""
    if not callable(getattr(module, "encode_text", None)) or getattr(module, "logit_scale", None) is None:
        return None
    import open_clip

    context = int(getattr(module, "context_length", 77) or 77)
    arch = (name or "").removeprefix("open_clip:")

    def tokenize(prompts: Any) -> torch.Tensor:
        if arch in open_clip.list_models():
            try:
                return open_clip.get_tokenizer(arch, context_length=context)(list(prompts))
            except Exception as exc:  # a Hugging Face tokenizer that cannot be downloaded offline
                raise VitscopeError("target", f"cannot load open_clip's tokenizer for {arch!r} "
                                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})",
                                    "run once online so the tokenizer is cached") from None
        return open_clip.tokenizer.SimpleTokenizer(context_length=context)(list(prompts))

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        device = next(module.parameters()).device
        return module.encode_text(tokens.to(device))  # type: ignore[operator, no-any-return]

    bias, scale = getattr(module, "logit_bias", None), module.logit_scale
    assert isinstance(scale, torch.Tensor)
    return TextTower(tokenize=tokenize, encode=encode,
                     logits=scaled_cosine(scale, bias if isinstance(bias, torch.Tensor) else None))


def load_open_clip(
    name: str, pretrained: str | None = None, checkpoint: str | os.PathLike[str] | None = None,
    random_weights: bool = False, **kwargs: Any
) -> VitModel:
    """``open_clip.create_model(name, pretrained=...)`` with open_clip's published weights (``pretrained``: a tag,
    default the model's first one, ``open_clip.list_pretrained_tags_by_model``), or a local ``checkpoint`` state
    dict instead, or untrained with ``random_weights=True`` (announced with a `VitscopeWarning`)."""
    open_clip = import_optional("open_clip", "'vitscope[open_clip]'")
    names = open_clip.list_models()
    if name not in names and not name.startswith(("hf-hub:", "local-dir:")):
        import difflib

        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        raise VitscopeError("model", f"open_clip has no model {name!r}",
                            f"did you mean {', '.join(close)}?" if close else "use a name such as ViT-B-32 or ViT-B-16")
    choice = choose_weights(checkpoint, random_weights, pretrained)
    tag = None
    if choice == "pretrained":
        tag = pretrained
        if tag in (None, "default"):
            tags = open_clip.list_pretrained_tags_by_model(name)
            if not tags:
                raise CheckpointError("model", f"open_clip publishes no weights for {name!r}",
                                      "pass `checkpoint='path/to/weights'`, or `random_weights=True` for an "
                                      "untrained model")
            tag = tags[0]
    state = None
    if checkpoint is not None:  # read and checked before the model is built
        from vitscope.adapters.checkpoint import read_state

        state = read_state(checkpoint)
    import logging

    was_disabled = logging.root.manager.disable
    try:
        logging.disable(max(was_disabled, logging.ERROR))  # open_clip logs a failed download on the root logger: said below instead
        model = open_clip.create_model(name, pretrained=tag, **kwargs)
    except Exception as exc:
        if tag and "not found" not in str(exc):  # offline, huggingface_hub's errors (after its retries)
            raise CheckpointError(
                "model", f"cannot download open_clip's weights {tag!r} for {name!r}",
                "offline? download them on a connected machine and pass "
                "`checkpoint='path/to/open_clip_model.safetensors'`, or pass `random_weights=True` for an "
                "untrained model",
            ) from None
        if not isinstance(exc, RuntimeError):
            raise
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        raise VitscopeError("model", f"open_clip cannot build {name!r}: {' '.join(str(exc).split())[:150]}",
                            f"did you mean {', '.join(close)}?" if close else "use an open_clip model name such as "
                            "ViT-B-32 or ViT-B-16") from None
    finally:
        logging.disable(was_disabled)
    if checkpoint is not None:
        from vitscope.adapters.checkpoint import load_state_into

        load_state_into(model, checkpoint, f"open_clip {name}", state)
    vit = from_open_clip_model(model.eval(), name=f"open_clip:{name}")
    return with_weights(vit, f"checkpoint {checkpoint}" if choice == "checkpoint" else choice)
