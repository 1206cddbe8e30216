"""Padded variable-resolution batches: several images, each at its own aspect ratio, in one forward pass.

Variable-resolution ViTs (SigLIP2 NaFlex, timm NaFlexViT) take each image on its own patch grid, within a patch
budget (`vitscope.layout.native_grid`), padded to the longest image's patch count, with a mask that hides the
padding from attention. vitscope runs them so under ``policy="native"`` (their default): a list of images whose
native grids differ is captured in one padded batch (`capture_padded`), and the result carries each image's grid
(`Attentions.grids`) and its real tokens (`Attentions.valid`); `Attentions.image` gives each image alone.

Nothing about the layout is trusted:

- each image's grid and padding are *measured* (`vitscope.capture.probe.probe_padded`: perturb image ``b``'s
  pixels and see which of its tokens move, and where) and the grid the model is told (SigLIP2's
  ``spatial_shapes``, NaFlexViT's ``patch_coord``, both from the image's size) is a cross-check: an image that
  is really 4x4 plus 8 padding tokens is never read as 4x6 (one-line `CaptureError`);
- the padding must be masked by the model: every captured row of a real token gives padding keys probability 0,
  else a one-line `CaptureError` (a model that attends to its padding has no per-image map);
- every call still proves itself (`A @ V == O` on sampled rows, mask included: `vitscope.capture.intercept`).

Padding query rows are set to 0 in ``weights``; padding keys are 0 already.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from vitscope.adapters.base import VitModel
from vitscope.attentions import Attentions
from vitscope.capture.budget import check_capture_budget
from vitscope.capture.core import (
    HeadSpec,
    QuerySpec,
    check_call_tokens,
    resolve_heads,
    resolve_layers,
)
from vitscope.capture.core import capture as capture_one_geometry
from vitscope.capture.hooks import eval_mode, record_token_norms
from vitscope.capture.intercept import (
    AttentionCall,
    CaptureError,
    observe_attention,
    prove_batch_axis,
    refuse_compiled,
)
from vitscope.capture.probe import check_token_axis, probe_padded
from vitscope.capture.windows import check_windowed_layers
from vitscope.errors import ImageError, VitscopeError
from vitscope.layout import SizePolicy, TokenLayout, padded_grid

__all__ = ["capture", "capture_padded", "padded_inputs"]

#: Probability a real token's row may give the padding keys in all (0 when the model masks them).
PADDING_LEAK = 1e-6


def padded_inputs(
    model: Any, images: Any, policy: SizePolicy | None, size: Any, device: str | torch.device | None,
) -> tuple[VitModel, list[torch.Tensor] | None]:
    """``(vit, pixels)``: the described model (loaded, and moved to ``device``, when ``model`` is a spec) and, when ``images`` should run as one padded batch, one pixel
    tensor ``(C, H_b, W_b)`` per image on the model's device (else ``None``: the ordinary route).

    A padded batch is used for a list of several images (paths, PIL images, arrays, or 3-d pixel tensors used as
    is) given to a variable-resolution model (``vit.padded``) under ``policy="native"`` (its default) without a
    ``size``, whose native grids are not all the same."""
    from vitscope.adapters import as_vit
    from vitscope.capture.prepare import check_loaded, resolve_device
    from vitscope.images import check_size_policy, image_to_pixels, load_image

    vit = as_vit(model)
    if device is not None and isinstance(model, (str, os.PathLike)):
        check_loaded(vit)
        vit.module.to(resolve_device(device, vit.device))  # loaded here from a spec: nobody else holds it
    check_size_policy(policy, size)
    listed = isinstance(images, (list, tuple)) and len(images) > 1
    if vit.padded is None or not listed or size is not None or (policy or vit.info.preprocess.policy) != "native":
        return vit, None
    check_loaded(vit)
    pixels = []
    for b, item in enumerate(images):
        name = f"images[{b}]"
        if isinstance(item, torch.Tensor):
            if item.dim() != 3:
                raise ImageError(name, f"a pixel tensor of shape {tuple(item.shape)} in a list of images",
                                 "pass one (C, H, W) pixel tensor per image")
            pixels.append(item)
        else:
            pixels.append(image_to_pixels(load_image(item, name), vit.info.preprocess, vit.info.patch_size,
                                          "native", None, argument=name))
    if len({tuple(p.shape) for p in pixels}) == 1:
        return vit, None  # one geometry: an ordinary batch
    return vit, [p.to(vit.device, vit.dtype) for p in pixels]


def capture(
    model: Any,
    images: Any,
    *,
    layers: int | Sequence[int] | None = None,
    queries: QuerySpec = None,
    heads: HeadSpec = "all",
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    token_norms: bool = False,
    device: str | torch.device | None = None,
    max_tokens: int | None = None,
    max_bytes: int | None = None,
) -> Attentions:
    """`vitscope.capture`: run ``model`` once on ``images`` and return its attention probabilities exactly.

    The arguments are those of `vitscope.capture.core.capture`, which runs images of one geometry. A
    variable-resolution model (SigLIP2 NaFlex, timm NaFlexViT) under ``policy="native"`` (its default) runs each
    image at its own aspect ratio within its patch budget; a list of images whose grids differ is captured in
    one padded batch (`capture_padded`): the result has per-image ``grids`` and a ``valid`` token mask, and
    ``attn.image(b)`` is image ``b`` alone on its own grid.

    Example:
        >>> attn = vitscope.capture("vitscope:shapes", "cat.png", layers=[-1], queries="cls")  # doctest: +SKIP
    """
    if isinstance(images, (list, tuple)) and len(images) > 1:
        vit, padded = padded_inputs(model, images, policy, size, device)
        if padded is not None:
            return capture_padded(vit, padded, layers=layers, queries=queries, heads=heads, token_norms=token_norms,
                                  max_tokens=max_tokens, max_bytes=max_bytes)
        # described once: a spec was loaded (and moved to `device`) by padded_inputs, a module wrapped
        model, device = vit, None if isinstance(model, (str, os.PathLike)) else device
    return capture_one_geometry(
        model, images, layers=layers, queries=queries, heads=heads, policy=policy, size=size,
        token_norms=token_norms, device=device, max_tokens=max_tokens, max_bytes=max_bytes,
    )


def _check_pixels(vit: VitModel, pixels: Sequence[torch.Tensor]) -> None:
    (ph, pw), channels = vit.info.patch_size, vit.info.preprocess.channels
    for b, p in enumerate(pixels):
        C, H, W = p.shape
        if channels != C:
            raise VitscopeError(f"images[{b}]", f"{C} channels but the model expects {channels}",
                                "pass pixel values with the model's channel count")
        if H % ph or W % pw or ph > H or pw > W:
            raise ImageError(f"images[{b}]", f"pixel values of {H}x{W} are not a whole number of {ph}x{pw} patches",
                             f"crop them to {H // ph * ph}x{W // pw * pw}, or pass the image itself")


def capture_padded(
    vit: VitModel,
    pixels: Sequence[torch.Tensor],
    *,
    layers: int | Sequence[int] | None = None,
    queries: QuerySpec = None,
    heads: HeadSpec = "all",
    token_norms: bool = False,
    max_tokens: int | None = None,
    max_bytes: int | None = None,
) -> Attentions:
    """Capture images of different sizes, ``(C, H_b, W_b)`` each, in one padded batch (``vit.padded``).

    ``queries``: ``None`` (every row) or prefix tokens (``"cls"``, ``"register:K"``, their indices): a patch or
    ``"mean"`` query names different tokens in each image (capture every row and read each image with
    `Attentions.image`). Returns `Attentions` with ``grids`` (each image's measured grid) and `valid`.
    """
    info = vit.info
    if vit.padded is None:
        raise VitscopeError("model", f"{info.name} does not take padded batches of images of different sizes",
                            "resize the images to one size (policy='resize'), or capture them one at a time")
    if info.suffix:
        raise VitscopeError("images", f"{info.name} has {len(info.suffix)} tokens after its patches: a padded batch "
                            "cannot hold them", "capture the images one at a time")
    if not isinstance(token_norms, bool):
        raise VitscopeError("token_norms", f"expected True or False, got {token_norms!r}", "pass token_norms=True")
    _check_pixels(vit, pixels)
    layer_ids = resolve_layers(layers, info.num_layers)
    check_windowed_layers(info, layer_ids, default=layers is None)
    head_sel = resolve_heads(heads, info.num_heads)
    B, prefix = len(pixels), info.num_prefix_tokens
    declared = [vit.grid_for((int(p.shape[-2]), int(p.shape[-1]))) for p in pixels]
    grid = padded_grid(declared)
    N = prefix + grid[1]
    measured = probe_padded(vit, pixels)
    for b, (m, (r, c)) in enumerate(zip(measured, declared, strict=True)):
        if (m.num_prefix, m.grid, m.num_suffix) != (prefix, (r, c), N - prefix - r * c):
            raise CaptureError(
                "images", f"image {b} of the padded batch: measured {m.num_prefix} prefix + {m.grid[0]}x{m.grid[1]} "
                f"patches + {m.num_suffix} padding tokens, but it is read as {prefix} prefix + {r}x{c} patches + "
                f"{N - prefix - r * c} padding tokens", "the model's grid declaration (spatial_shapes, patch_coord) "
                "does not match its tokens: capture the images one at a time",
            )
    layout = TokenLayout(info.prefix, grid, info.patch_size, None, (), tuple(m.grid for m in measured))
    query_ids = _prefix_queries(layout, queries)
    n_heads = 1 if head_sel == "mean" else len(head_sel)
    n_q = N if query_ids is None else len(query_ids)
    check_capture_budget(B, N, len(layer_ids), n_heads, n_q, n_heads=info.num_heads, grid=grid,
                         limit_bytes=max_bytes, max_tokens=max_tokens)
    dev = pixels[0].device
    counts = torch.tensor(layout.valid_counts() or (), device=dev)
    valid = torch.arange(N, device=dev)[None, :] < counts[:, None]  # (B, N)
    q_valid = valid if query_ids is None else valid[:, list(query_ids)]  # (B, Q)
    weights = torch.empty(len(layer_ids), B, n_heads, n_q, N, dtype=torch.float32, device=dev)
    norms = torch.empty(info.num_layers, B, N, dtype=torch.float32, device=dev) if token_norms else None
    pos = {layer: i for i, layer in enumerate(layer_ids)}
    sites = [vit.sites[i] for i in layer_ids]
    heads_kept = None if head_sel == "mean" else list(head_sel)

    def on_call(call: AttentionCall) -> None:
        check_call_tokens(call, N, grid, prefix)
        w = call.rows(query_ids, heads_kept, head_sel == "mean", out=weights[pos[call.layer]])  # (B, H', Q, N)
        leak = (w * ~valid[:, None, None, :]).sum(dim=-1).amax(dim=1)  # (B, Q): mass on padding keys
        leak = torch.where(q_valid, leak, torch.zeros_like(leak))
        if bool((leak > PADDING_LEAK).any()):
            b = int(leak.amax(dim=1).argmax())
            raise CaptureError(
                "model", f"layer {call.layer}: image {b}'s tokens attend to its padding (probability "
                f"{float(leak[b].max()):.3g}): the model does not mask the padding of a padded batch",
                "capture the images one at a time (or resized to one size: policy='resize')",
            )
        w.masked_fill_(~q_valid[:, None, :, None], 0.0)  # padding query rows: no map

    refuse_compiled(vit.module)
    C, H0, W0 = (int(v) for v in pixels[0].shape)
    r0, c0 = declared[0]
    check_token_axis(vit, sites, (C, H0, W0), pixels[0].dtype, dev, prefix + r0 * c0)  # once per model
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(eval_mode(vit.module))
        # batch == heads (or heads folded into the batch): proven once per module on image 0 (as B copies)
        prove_batch_axis(vit, pixels[0].unsqueeze(0).expand(B, -1, -1, -1), sites, prefix + r0 * c0)
        check = stack.enter_context(observe_attention(sites, on_call, batch=B, rows=query_ids, tokens=N))
        if norms is not None:
            stack.enter_context(record_token_norms(vit.sites, norms))
        vit.padded.forward(vit.module, list(pixels))
        check()
    if norms is not None:
        norms.masked_fill_(~valid[None], 0.0)
    ph, pw = info.patch_size
    return Attentions(
        weights=weights, prefix=info.prefix, grid=grid, patch_size=info.patch_size,
        image_size=(max(r for r, _ in layout.grids or ()) * ph, max(c for _, c in layout.grids or ()) * pw),
        layers=layer_ids, heads=head_sel, queries=query_ids, num_layers=info.num_layers, num_heads=info.num_heads,
        token_norms=norms, meta={"model": info.name, "family": info.family, "padded": True}, grids=layout.grids,
    )


def _prefix_queries(layout: TokenLayout, queries: QuerySpec) -> tuple[int, ...] | None:
    """Query rows of a padded capture: every row, or prefix tokens only (the same token in every image)."""
    if queries is None:
        return None
    fix = "capture every row (queries=None) and read each image with attn.image(b), or name prefix tokens ('cls')"
    if (isinstance(queries, str) and queries == "mean") or isinstance(queries, tuple):
        raise VitscopeError("queries", f"{queries!r} names different tokens in each image of a padded batch", fix)
    try:
        ids = layout.resolve_queries(queries)
    except VitscopeError as exc:
        raise VitscopeError("queries", exc.problem, fix) from None
    assert ids is not None
    if any(i >= layout.num_prefix_tokens for i in ids):
        raise VitscopeError("queries", f"token {max(ids)} is a patch or padding token in a padded batch (images on "
                            f"grids {list(layout.grids or ())})", fix)
    return ids
