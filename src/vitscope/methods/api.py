"""Methods by name: the registry filled (every method module imported) and the calls every surface uses.

`get_method` / `method_names` read `vitscope.methods.registry.REGISTRY` after importing each method module
(they register themselves); `compute` runs one on a prepared `MapContext`; `maps` prepares the input once and
runs it (``vitscope.maps``).
"""

from __future__ import annotations

from typing import Any

import torch

from vitscope.errors import VitscopeError
from vitscope.methods import (  # noqa: F401  (each module registers its method on import)
    attn_gradcam,
    cls_attention,
    flow,
    grad_rollout,
    legrad,
    masks,
    pca,
    relevance,
    rollout,
    similarity,
)
from vitscope.methods.registry import REGISTRY, MapContext, MapResult, Method, check_params


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(REGISTRY)


def get_method(name: str, argument: str = "method") -> Method:
    """The method called ``name``, or a one-line error listing the names."""
    if name not in REGISTRY:
        raise VitscopeError(argument, f"unknown method {name!r}", f"use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def compute(ctx: MapContext, name: str, **params: Any) -> MapResult:
    """Run method ``name`` on a prepared context."""
    method = get_method(name)
    full = check_params(method, params)
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
            ``chefer``, ``legrad``, ``attn_gradcam``).
        policy, size, device: preparation (`vitscope.capture.prepare`).
        **params: the method's parameters (see ``get_method(method).params``); unknown names are an error.

    Returns:
        `MapResult`: ``map`` ``(batch, rows, cols)`` float32, ``extras`` and ``meta``.

    Example:
        >>> r = vitscope.maps("vitscope:shapes", "cat.png", "rollout", residual=0.5)  # doctest: +SKIP
        >>> r.map.shape  # (1, rows, cols)  # doctest: +SKIP
    """
    from vitscope.capture.prepare import prepare

    spec = get_method(method)
    check_params(spec, params)
    vit, pixels = prepare(model, images, policy=policy, size=size, device=device)
    return compute(MapContext(vit, pixels), method, **params)
