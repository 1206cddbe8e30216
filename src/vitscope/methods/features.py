"""Patch features: one block's output tokens, read with a hook, for the DINO feature views (`pca`, `similarity`).

`patch_features` runs the model once and records the output of block ``layer`` (the residual stream after that
block, what transformers returns as ``hidden_states[layer + 1]`` and timm's ``forward_intermediates`` as
intermediate ``layer``). The hook lives in a context manager that always removes itself (also when the forward
pass raises), and the model's ``training`` flags are restored (`vitscope.capture.hooks`).

With ``norm=True`` the tokens are passed through the model's final norm, the one applied after the last block,
when the model has one: DINOv2 and DINOv3 (transformers ``layernorm`` / ``norm``, timm ``norm``), ViT / DeiT
(``layernorm``), CLIP / SigLIP vision towers (``post_layernorm``), AIMv2 (``rms_norm``), open_clip (``ln_post``), torchvision
(``encoder.ln``) and vitscope's own ViT (``norm``). It is the module of one of those names outside the blocks
whose width is the model's; a model without one (timm's average-pooling ViTs: ``norm`` is an identity) gets the
raw block output, and `Features.norm` says which module was applied (``None``: none). The DINOv2 notebooks
compute their PCA and patch similarities on the normalised last-layer patch tokens (``x_norm_patchtokens``):
the default.

Prefix tokens ([CLS], [DIST], registers) and suffix tokens are told apart by the model's token layout
(`vitscope.layout.TokenLayout`); `Features.patches` keeps the patches only, on the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitscope.errors import VitscopeError
from vitscope.layout import TokenLayout

__all__ = ["Features", "final_norm", "patch_features"]

#: module names (the last part of the dotted path) of a final norm, most specific first
_NORM_NAMES = ("post_layernorm", "ln_post", "layernorm", "rms_norm", "norm", "ln")


@dataclass
class Features:
    """Block-output tokens of one layer.

    Attributes:
        tokens: ``(B, N, D)`` float32, in the model's token order (prefix, patches row-major, suffix).
        layout: the token layout (prefix/suffix kinds and the patch grid).
        layer: the absolute layer index read.
        norm: the dotted name of the final norm applied, or ``None`` when none was.
    """

    tokens: torch.Tensor
    layout: TokenLayout
    layer: int
    norm: str | None

    @property
    def patches(self) -> torch.Tensor:
        """``(B, rows, cols, D)``: the patch tokens on the grid (height before width)."""
        B, _, D = self.tokens.shape
        rows, cols = self.layout.grid
        return self.tokens[:, self.layout.patch_slice].reshape(B, rows, cols, D)


def final_norm(vit: Any) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the model's norm after the last block (see the module docstring), or ``None``.

    Candidates are modules named like a final norm, not inside any attention block, with a weight of the
    model's width; the shallowest wins (a composite's vision tower before anything deeper)."""
    blocks = {id(m) for site in vit.sites for m in site.block.modules()}
    width = int(vit.info.embed_dim)
    found: list[tuple[int, int, str, nn.Module]] = []
    for name, module in vit.module.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last not in _NORM_NAMES or id(module) in blocks:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or int(weight.shape[0]) != width:
            continue  # an identity, or a norm of another width (a projection head's)
        found.append((name.count("."), _NORM_NAMES.index(last), name, module))
    if not found:
        return None
    _, _, name, module = min(found, key=lambda t: (t[0], t[1]))
    return name, module


def check_layer(layer: Any, num_layers: int, argument: str = "layer") -> int:
    """``layer`` (negatives count from the end) as an absolute index, or a one-line error."""
    from vitscope.layout import as_index

    fix = f"pass a layer index in [-{num_layers}, {num_layers - 1}]"
    index = as_index(layer, argument, "layer", fix)
    absolute = index + num_layers if index < 0 else index
    if not 0 <= absolute < num_layers:
        raise VitscopeError(argument, f"{layer} out of range for a model with {num_layers} layers", fix)
    return absolute


def patch_features(vit: Any, pixels: torch.Tensor, *, layer: int = -1, norm: bool = True) -> Features:
    """The output tokens of block ``layer`` for ``pixels`` ``(B, C, H, W)`` (prepared for ``vit``).

    Args:
        vit: a `VitModel`.
        pixels: preprocessed pixel values on the model's device.
        layer: block index (negatives count from the end; default the last).
        norm: apply the model's final norm (`final_norm`) when it has one.

    Returns:
        `Features` (float32, detached, on the model's device).
    """
    from contextlib import ExitStack

    from vitscope.adapters.base import refuse_compiled
    from vitscope.capture.hooks import eval_mode, record_block_outputs

    info = vit.info
    absolute = check_layer(layer, info.num_layers)
    if not isinstance(norm, bool):
        raise VitscopeError("norm", f"expected True or False, got {norm!r}", "pass norm=True or norm=False")
    grid = vit.grid_for((int(pixels.shape[-2]), int(pixels.shape[-1])))
    layout = TokenLayout(info.prefix, grid, suffix=info.suffix)
    seen: dict[int, torch.Tensor] = {}

    def on_block(index: int, x: torch.Tensor) -> None:
        seen.setdefault(index, x)  # the first call of the block: its output for these pixels

    refuse_compiled(vit.module)
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(eval_mode(vit.module))
        stack.enter_context(record_block_outputs([vit.sites[absolute]], on_block))
        vit(pixels)
    if absolute not in seen:
        raise VitscopeError("layer", f"block {absolute} did not run in the forward pass",
                            "pick another layer (vitscope info lists them)")
    x = seen[absolute]
    B = int(pixels.shape[0])
    if x.dim() == 4 and tuple(x.shape[1:3]) == grid and layout.num_prefix_tokens == layout.num_suffix_tokens == 0:
        x = x.reshape(B, grid[0] * grid[1], x.shape[-1])  # a (B, rows, cols, D) block output (SAM's global blocks)
    if x.dim() != 3 or int(x.shape[0]) != B or int(x.shape[1]) != layout.num_tokens:
        raise VitscopeError(
            "layer", f"block {absolute} returned shape {tuple(x.shape)}, not (batch {B}, tokens "
            f"{layout.num_tokens}, dim)", "pick a layer whose block outputs every token",
        )
    name = None
    found = final_norm(vit) if norm else None
    if found is not None:
        name, module = found
        with torch.no_grad():
            x = module(x)
    return Features(tokens=x.detach().float(), layout=layout, layer=absolute, norm=name)
