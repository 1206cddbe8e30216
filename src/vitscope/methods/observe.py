"""Observers: measures that ride on the forward pass a method runs anyway (one forward, several readings).

A `MapContext` built with ``observers=[...]`` hands each observer the forward pass of its first capture
(`MapContext.capture`) or, for a method that captures nothing through the context (gradient methods, streamed
rollout), one of its own (`MapContext.observe`). That pass (`observed_capture`) is `vitscope.capture`'s: the same
guards (token axis, batch axis, declared taps, budget), the same rows for the selected layers, queries and heads,
and, on top, every layer an observer asks for, each block's output token norms and the model's output, all from
the one forward. Batch mode's per-image measures (`vitscope.batch.stats.ImageMeasures`: attention distance,
token norms, prediction) are an observer, so a batch costs one forward pass, not two.

A layer whose full attention (every head, every query row) the capture keeps is handed to observers as that
tensor (``call.probs``), so an observer reads the captured attention instead of recomputing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vitscope.adapters.base import VitModel
from vitscope.capture.intercept import AttentionCall


class Observer:
    """Something that reads a forward pass it did not ask for. Subclasses override what they need.

    Attributes:
        layers: absolute indices of the layers whose attention `on_attention` gets (``()``: none).
        token_norms: whether `on_norms` gets every block's output token norms.
    """

    layers: tuple[int, ...] = ()
    token_norms: bool = False

    def on_attention(self, call: AttentionCall) -> None:
        """One of ``layers``' attention as the model computed it (q/k, or ``probs`` ``(B, H, N, N)``)."""

    def on_norms(self, norms: torch.Tensor) -> None:
        """Every block's output token norms ``(num_layers, B, N)`` float32 (when ``token_norms``)."""

    def on_output(self, output: Any) -> None:
        """The model's output of the same forward pass (`VitModel.logits` reads class logits from it)."""


def observed_capture(
    vit: VitModel,
    pixels: torch.Tensor,
    observers: Sequence[Observer],
    *,
    layers: int | Sequence[int] | None = None,
    queries: Any = None,
    heads: Any = "all",
    select: bool = True,
) -> tuple[Any, Any]:
    """``(Attentions or None, output)``: `vitscope.capture` of ``pixels`` (prepared: on the model's device) and
    the model's output, from one forward pass that also feeds ``observers``. ``select=False`` captures nothing
    (the pass only feeds the observers: `MapContext.observe`)."""
    from vitscope.attentions import Attentions
    from vitscope.capture.budget import check_capture_budget
    from vitscope.capture.core import (
        check_call_tokens,
        check_declared,
        guarded_forward,
        resolve_heads,
        resolve_layers,
        resolve_queries,
    )
    from vitscope.capture.prepare import prepare
    from vitscope.capture.windows import check_windowed_layers

    vit, pixels = prepare(vit, pixels)  # token limits and the measured layout, as capture checks them
    info = vit.info
    layer_ids = resolve_layers(layers, info.num_layers) if select else ()
    if select:
        check_windowed_layers(info, layer_ids, default=layers is None)
    head_sel = resolve_heads(heads, info.num_heads)
    dev = pixels.device
    B, _, Hpx, Wpx = pixels.shape
    grid = vit.grid_for((Hpx, Wpx))
    query_ids = resolve_queries(queries, info.prefix, grid, info.suffix)
    N = info.num_prefix_tokens + grid[0] * grid[1] + info.num_suffix_tokens
    n_heads = 1 if head_sel == "mean" else len(head_sel)
    n_q = N if query_ids is None else len(query_ids)
    if select:
        check_capture_budget(B, N, len(layer_ids), n_heads, n_q, n_heads=info.num_heads, grid=grid)
    weights = torch.empty(len(layer_ids), B, n_heads, n_q, N, dtype=torch.float32, device=dev)
    pos = {layer: i for i, layer in enumerate(layer_ids)}
    watched = sorted(set(layer_ids).union(*(o.layers for o in observers)))
    readers = {layer: [o for o in observers if layer in o.layers] for layer in watched}
    sites = [vit.sites[i] for i in watched]
    heads_kept = None if head_sel == "mean" else list(head_sel)
    # the captured rows are the layer's whole attention: observers read them instead of recomputing them
    whole = query_ids is None and heads_kept == list(range(info.num_heads))
    norms = torch.empty(info.num_layers, B, N, dtype=torch.float32, device=dev) \
        if any(o.token_norms for o in observers) else None
    declared: dict[int, dict[str, torch.Tensor]] = {}
    to_check = [vit.sites[i] for i in layer_ids if vit.sites[i].q is not None and vit.sites[i].k is not None]

    def on_call(call: AttentionCall) -> None:
        check_call_tokens(call, N, grid, info.num_prefix_tokens, info.num_suffix_tokens)
        if call.layer in declared:
            check_declared(call, vit.sites[call.layer], declared.pop(call.layer))
        if call.layer in pos:
            rows = call.rows(query_ids, heads_kept, head_sel == "mean", out=weights[pos[call.layer]])
            if whole:  # (B, H, N, N): the layer's attention, as captured
                call = AttentionCall(layer=call.layer, probs=rows, source="capture")
        for o in readers[call.layer]:
            o.on_attention(call)

    output = guarded_forward(vit, pixels, sites, on_call, rows=query_ids, tokens=N, to_check=to_check,
                             declared=declared, norms=norms)
    for o in observers:
        if norms is not None and o.token_norms:
            o.on_norms(norms)
        o.on_output(output)
    if not select:
        return None, output
    attn = Attentions(
        weights=weights, prefix=info.prefix, grid=grid, patch_size=info.patch_size, image_size=(Hpx, Wpx),
        layers=layer_ids, heads=head_sel, queries=query_ids, num_layers=info.num_layers,
        num_heads=info.num_heads, meta={"model": info.name, "family": info.family}, suffix=info.suffix,
    )
    return attn, output
