"""Methods by name: the registry filled (every method module imported) and the calls every surface uses.

`get_method` / `method_names` read `vitscope.methods.registry.REGISTRY` after importing each method module
(they register themselves); `compute` runs one on a prepared `MapContext`; `maps` prepares the input once and
runs it (``vitscope.maps``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vitscope.errors import VitscopeError
from vitscope.methods import (  # noqa: F401  (each module registers its method on import)
    attn_gradcam,
    attnlrp,
    cls_attention,
    flow,
    grad_rollout,
    legrad,
    masks,
    pca,
    relevance,
    rollout,
    similarity,
    transformer_attribution,
)
from vitscope.methods.registry import REGISTRY, MapContext, MapResult, Method, check_params


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(REGISTRY)


def supported_methods(vit: Any) -> tuple[str, ...]:
    """The registered methods that can run on ``vit`` (a `VitModel`): those whose `Method.check` accepts it."""
    names = []
    for name, method in REGISTRY.items():
        if method.check is not None:
            try:
                method.check(vit)
            except VitscopeError:
                continue
        names.append(name)
    return tuple(names)


def get_method(name: str, argument: str = "method") -> Method:
    """The method called ``name``, or a one-line error listing the names."""
    if name not in REGISTRY:
        raise VitscopeError(argument, f"unknown method {name!r}", f"use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def compute(ctx: MapContext, name: str, **params: Any) -> MapResult:
    """Run method ``name`` on a prepared context."""
    method = get_method(name)
    full = check_params(method, params)
    if method.check is not None:
        method.check(ctx.vit)
    _check_selection(ctx, full)
    result = method.compute(ctx, **full)
    result.meta = {"method": name, **{k: _jsonable(v) for k, v in full.items() if not callable(v)}, **result.meta}
    return result


def _check_selection(ctx: MapContext, params: dict[str, Any]) -> None:
    """The layer and query parameters a method takes, checked against this model and grid before anything runs,
    so an error names the method's parameter (``layer``, ``start_layer``, ``query``)."""
    from vitscope.capture.core import resolve_layers
    from vitscope.layout import TokenLayout

    n = ctx.vit.info.num_layers
    for name in ("layer", "start_layer"):
        if name in params:
            resolve_layers(params[name], n, argument=name)
    if "query" in params:
        TokenLayout(ctx.vit.info.prefix, ctx.grid, suffix=ctx.vit.info.suffix).query_ids(params["query"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def maps(
    model: Any,
    images: Any,
    method: str = "cls",
    *,
    policy: Any = None,
    size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    **params: Any,
) -> MapResult:
    """One method's map of ``images``: prepare once, capture what the method declares, compute.

    Args:
        model: a `VitModel`, a spec string or an ``nn.Module``.
        images: a path, PIL image, array, a list of them, or pixel values ``(B, C, H, W)``.
        method: a registered name (`method_names()`: ``cls``, ``dino_mask``, ``rollout``, ``flow``, ``grad_rollout``,
            ``chefer``, ``legrad``, ``attn_gradcam``, ``transformer_attribution``, ``attnlrp``).
        policy, size, device: preparation (`vitscope.capture.prepare`).
        **params: the method's parameters (see ``get_method(method).params``); unknown names are an error.

    Returns:
        `MapResult`: ``map`` ``(batch, rows, cols)`` float32, ``extras`` and ``meta``. A list of images given to a
        variable-resolution model (SigLIP2 NaFlex, timm NaFlexViT) at its native aspect ratios runs as one padded
        batch (`vitscope.capture.padded`): each image's map is computed on its own grid from its own tokens
        (``result.images[b]``, ``result.grids``), and ``map`` is NaN-padded to the largest rows and columns.
        Gradient methods take such images one at a time.

    Example:
        >>> r = vitscope.maps("vitscope:shapes", "cat.png", "rollout", residual=0.5)  # doctest: +SKIP
        >>> r.map.shape  # (1, rows, cols)  # doctest: +SKIP
    """
    from vitscope.capture.prepare import prepare

    spec = get_method(method)
    check_params(spec, params)
    if isinstance(images, (list, tuple)) and len(images) > 1:
        from vitscope.capture.padded import padded_inputs

        vit, padded = padded_inputs(model, images, policy, size, device)
        if padded is not None:
            return _padded_maps(vit, padded, spec, params)
        # described once: a spec was loaded (and moved to `device`) by padded_inputs, a module wrapped
        model, device = vit, None if isinstance(model, (str, os.PathLike)) else device
    vit, pixels = prepare(model, images, policy=policy, size=size, device=device)
    return compute(MapContext(vit, pixels), method, **params)


class _PaddedBatch:
    """Captures of one padded batch (`vitscope.capture.padded.capture_padded`), one per selection."""

    def __init__(self, vit: Any, pixels: list[torch.Tensor]) -> None:
        self.vit, self.pixels = vit, pixels
        self._captures: dict[Any, Any] = {}

    def capture(self, layers: Any, queries: Any, heads: Any) -> Any:
        from vitscope.capture.padded import capture_padded

        key = tuple(tuple(x) if isinstance(x, list) else x for x in (layers, queries, heads))
        if key not in self._captures:
            try:
                attn = capture_padded(self.vit, self.pixels, layers=layers, queries=queries, heads=heads)
            except VitscopeError as exc:
                if exc.argument != "queries":
                    raise
                # a patch or "mean" query names other tokens in each image: every row, read per image
                attn = capture_padded(self.vit, self.pixels, layers=layers, queries=None, heads=heads)
            self._captures[key] = attn
        return self._captures[key]


class _ImageContext(MapContext):
    """Image ``b`` of a padded batch: its own pixels and grid, its attention read from the batch's capture."""

    def __init__(self, batch: _PaddedBatch, b: int) -> None:
        super().__init__(batch.vit, batch.pixels[b].unsqueeze(0))
        self.batch, self.b = batch, b

    def capture(self, layers: Any = None, queries: Any = None, heads: Any = "all") -> Any:
        return self.batch.capture(layers, queries, heads).image(self.b)


def _nan_pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.full((*x.shape[:-2], rows, cols), float("nan"), dtype=torch.float32, device=x.device)
    out[..., : x.shape[-2], : x.shape[-1]] = x
    return out


def _padded_maps(vit: Any, pixels: list[torch.Tensor], spec: Method, params: dict[str, Any]) -> MapResult:
    """``spec``'s map of each image of a padded batch, on its own grid, from the batch's one forward pass."""
    if spec.needs == "gradients":
        raise VitscopeError(
            "method", f"{spec.name} needs gradients per image, which a padded batch of images on different grids "
            "does not run", "pass the images one at a time (or resized to one size: policy='resize')",
        )
    batch = _PaddedBatch(vit, pixels)
    per_image = [compute(_ImageContext(batch, b), spec.name, **params) for b in range(len(pixels))]
    rows = max(int(r.map.shape[-2]) for r in per_image)
    cols = max(int(r.map.shape[-1]) for r in per_image)
    grids = [(int(r.map.shape[-2]), int(r.map.shape[-1])) for r in per_image]
    extras = {}
    for key in per_image[0].extras:
        items = [r.extras.get(key) for r in per_image]
        if all(t is not None and tuple(t.shape[-2:]) == g for t, g in zip(items, grids, strict=True)):
            extras[key] = torch.cat([_nan_pad(t, rows, cols) for t in items if t is not None])
    return MapResult(
        map=torch.cat([_nan_pad(r.map, rows, cols) for r in per_image]), extras=extras,
        meta={**per_image[0].meta, "padded": True, "grids": [list(g) for g in grids]}, images=per_image,
    )
