"""Any ``nn.Module`` plus a small declaration of where its attention is.

Example (a model whose blocks are ``model.layers[i]`` with a fused ``attn.qkv`` Linear and ``attn.proj``)::

    vit = vitscope.wrap(
        model, blocks="layers.*", qkv="attn.qkv", out="attn.proj", num_heads=8,
        patch_size=16, image_size=(224, 224),
    )

``blocks`` is a dotted pattern where ``*`` matches one name component (``"blocks.*"``,
``"encoder.layer.*"``) or an explicit list of modules; ``qkv``/``q``/``k``/``v``/``out`` are paths relative
to each block. ``out`` names the output projection: its input is the heads-concatenated attention output
(needed only for gradient methods).

The token layout needs no declaration: vitscope measures which tokens are patches (and where each sits), and
which come before (``prefix``) or after (``suffix``) them, by probing the model (`vitscope.capture.probe`). Declared
``prefix``/``suffix`` kinds are kept (a measurement cannot tell [CLS] from a register) and cross-checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import AttentionSite, ModelInfo, Preprocess, Tap, VitModel
from vitscope.errors import NotAViTError, VitscopeError
from vitscope.layout import check_kinds


def find_blocks(module: nn.Module, pattern: str) -> list[nn.Module]:
    """Submodules whose dotted name matches ``pattern`` (``*`` = one name component), in model order."""
    rx = re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")
    return [m for name, m in module.named_modules() if rx.match(name)]


def _sub(block: nn.Module, path: str, argument: str) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        names = sorted(n for n, _ in block.named_modules() if n)[:12]
        raise VitscopeError(
            argument, f"no submodule {path!r} in block {type(block).__name__}",
            f"paths are relative to each block, e.g. one of {names}",
        ) from None


def _per_channel(values: float | Sequence[float], channels: int, argument: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        return (float(values),) * max(channels, 3)
    out = tuple(float(v) for v in values)
    if len(out) < channels or len(out) not in (channels, 3):  # 3: an RGB default reused for one channel
        raise VitscopeError(argument, f"{len(out)} values for {channels} channels", "give one value per channel")
    return out


def wrap_custom(
    module: nn.Module,
    *,
    blocks: str | Sequence[nn.Module],
    num_heads: int,
    patch_size: int | tuple[int, int],
    attn: str | None = None,
    qkv: str | None = None,
    q: str | None = None,
    k: str | None = None,
    v: str | None = None,
    out: str | None = None,
    scale: float | None = None,
    prefix: Sequence[str] | None = None,
    suffix: Sequence[str] | None = None,
    image_size: int | tuple[int, int] = 224,
    mean: float | Sequence[float] = (0.485, 0.456, 0.406),
    std: float | Sequence[float] = (0.229, 0.224, 0.225),
    channels: int = 3,
    dynamic_size: bool = False,
    policy: str = "resize",
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    logits: Callable[[Any], torch.Tensor | None] | None = None,
    name: str | None = None,
) -> VitModel:
    """Describe a user's ViT: where its attention blocks are, and what its tokens and pixels look like.

    Capture reads each layer's attention where the block computes it (``scaled_dot_product_attention``, an
    explicit softmax, or an ``nn.MultiheadAttention``), so ``blocks`` and ``num_heads`` are all it needs; ``attn``
    narrows it to a submodule of each block. Optionally declare ``qkv`` (one Linear producing q, k, v stacked as
    ``(3, heads, head_dim)``) or ``q`` and ``k`` (Linears producing ``(heads * head_dim)`` each; ``v``
    optional) with ``scale`` (default ``head_dim ** -0.5``): capture then checks that they give the attention
    the model computes, and refuses a declaration that does not (RoPE or qk-norm after the projections, a wrong
    scale). ``mean``/``std`` take one value per channel (a single number is used for all).

    ``prefix``/``suffix``: the kinds of the tokens before the patches (``"cls"``, ``"dist"``, ``"register"``) and
    after them (``"det"``, ``"suffix"``), in token order. Leave both out and the layout is measured on first use:
    the first prefix token is named ``"cls"``, the others ``"register"``, suffix tokens ``"suffix"``. Declared,
    they are checked against the measurement (a wrong count is a one-line error).
    """
    measured = prefix is None and suffix is None
    prefix, suffix = tuple(prefix or ()), tuple(suffix or ())
    check_kinds(prefix, suffix)
    if policy not in ("resize", "crop", "native"):
        raise VitscopeError("policy", f"unknown size policy {policy!r}", "use 'resize', 'crop' or 'native'")
    norm = {"mean": _per_channel(mean, channels, "mean"), "std": _per_channel(std, channels, "std")}
    if any(s <= 0 for s in norm["std"]):
        raise VitscopeError("std", f"{norm['std']} has a value <= 0", "pass positive standard deviations")
    block_list = find_blocks(module, blocks) if isinstance(blocks, str) else list(blocks)
    if not block_list:
        raise NotAViTError(
            "blocks", f"pattern {blocks!r} matches no submodule of {type(module).__name__}",
            "use a dotted pattern such as 'blocks.*' or 'encoder.layer.*' (see model.named_modules())",
        )
    if qkv is None and (q is None) != (k is None):
        raise VitscopeError("qkv", "only one of q and k was given", "name both projections, or neither")
    sites = []
    embed_dim = 0
    for i, blk in enumerate(block_list):
        tq: Tap | None = None
        tk: Tap | None = None
        tv: Tap | None = None
        width = 0
        if qkv is not None:
            lin = _sub(blk, qkv, "qkv")
            tq, tk, tv = (Tap(lin, layout="qkv", index=j) for j in range(3))
            width = getattr(lin, "out_features", 0) // 3
        elif q is not None and k is not None:
            q_mod, k_mod = _sub(blk, q, "q"), _sub(blk, k, "k")
            tq, tk = Tap(q_mod), Tap(k_mod)
            tv = Tap(_sub(blk, v, "v")) if v is not None else None
            width = getattr(q_mod, "out_features", 0)
        if width and width % num_heads:
            raise VitscopeError("num_heads", f"{num_heads} does not divide the projection width {width}")
        embed_dim = embed_dim or width
        head_dim = width // num_heads if width else 0
        sc = scale if scale is not None else (head_dim**-0.5 if head_dim else None)
        if sc is None and tq is not None:
            raise VitscopeError("scale", "cannot infer head_dim from the projection", "pass scale=")
        tout = Tap(_sub(blk, out, "out"), where="input") if out is not None else None
        sites.append(
            AttentionSite(layer=i, block=blk, attn=_sub(blk, attn, "attn") if attn else blk, q=tq, k=tk, v=tv,
                          out=tout, num_heads=num_heads, scale=sc)
        )
    ps = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    info = ModelInfo(
        name=name or type(module).__name__, family="custom", num_layers=len(sites), num_heads=num_heads,
        embed_dim=embed_dim, patch_size=ps, prefix=prefix, suffix=suffix, measured=measured,  # type: ignore[arg-type]
        preprocess=Preprocess(
            image_size=size, mean=norm["mean"], std=norm["std"], policy=policy,  # type: ignore[arg-type]
            dynamic_size=dynamic_size, channels=channels,
        ),
    )
    return VitModel(module, info, sites, forward=forward, logits=logits)
