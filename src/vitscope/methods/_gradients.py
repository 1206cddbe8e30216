"""Attention and its gradient, with the model's fused attention left on.

One forward pass with hooks (removed on exit, training flags restored) reads per layer ``q, k, v`` and the
raw tensor at the adapter's ``out`` tap (the per-head attention output ``O = A V`` before the projection),
which stays in the autograd graph. Then

    A      = softmax(q k^T * scale)            recomputed exactly (float32, or float64 for a float64 model)
    dL/dA  = dL/dO @ V^T                       exact, because O = A V

with ``dL/dO`` from ``torch.autograd.grad`` w.r.t. the raw tapped tensors (a reshaped view of them would
not be on the graph's path). ``torch.autograd.grad`` writes no ``.grad`` on any parameter, and the pixels
get their own ``requires_grad`` copy so the graph exists even for frozen models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import AttentionSite, SizePolicy, VitModel
from vitscope.capture.core import resolve_layers
from vitscope.capture.hooks import _first_tensor, eval_mode, hooks_removed_on_exit, record_sites
from vitscope.errors import VitscopeError

#: A target: ``None`` (the predicted class), a class index, one class per image, or a callable taking the
#: model output and returning one scalar per image ``(B,)``.
Target = None | int | Sequence[int] | torch.Tensor | Callable[[Any], torch.Tensor]


@dataclass
class Trace:
    """What one traced forward pass leaves: attention, values, graph-attached outputs per layer."""

    vit: VitModel
    pixels: torch.Tensor
    output: Any
    layers: tuple[int, ...]
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, N), detached
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, d), detached
    outs: dict[int, torch.Tensor] = field(default_factory=dict)  # raw tensor at the out tap, in the graph
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # block outputs (B, N, D), in the graph

    @property
    def prefix(self) -> tuple[str, ...]:
        return self.vit.info.prefix

    @property
    def grid(self) -> tuple[int, int]:
        return self.vit.grid_for((int(self.pixels.shape[-2]), int(self.pixels.shape[-1])))

    def site(self, layer: int) -> AttentionSite:
        return self.vit.sites[layer]


def _store(into: dict[int, torch.Tensor], layer: int) -> Callable[[torch.Tensor], None]:
    def store(x: torch.Tensor) -> None:
        into[layer] = x

    return store


def _hook_raw(module: nn.Module, where: str, store: Callable[[torch.Tensor], None]) -> Any:
    if where == "output":

        def out_hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            store(_first_tensor(out))

        return module.register_forward_hook(out_hook)

    def in_hook(_m: nn.Module, inp: Any) -> None:
        store(_first_tensor(inp))

    return module.register_forward_pre_hook(in_hook)


def layers_from(model: Any, start_layer: int) -> list[int]:
    """Layers ``start_layer .. last`` of ``model`` (``start_layer`` may be negative)."""
    from vitscope.adapters import as_vit

    n = as_vit(model).info.num_layers
    start = start_layer + n if start_layer < 0 else start_layer
    if not 0 <= start < n:
        raise VitscopeError(
            "start_layer", f"{start_layer} out of range for a model with {n} layers", f"use an index in [-{n}, {n - 1}]"
        )
    return list(range(start, n))


def trace(
    model: Any,
    images: Any,
    layers: int | Sequence[int] | None = None,
    *,
    blocks: bool = False,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> Trace:
    """Run ``model`` once on ``images`` with autograd on; see the module docstring."""
    from vitscope.adapters import as_vit

    vit = as_vit(model)
    layer_ids = resolve_layers(layers, vit.info.num_layers)
    sites = [vit.sites[i] for i in layer_ids]
    for s in sites:
        if s.v is None or s.out is None:
            raise VitscopeError(
                "model", f"layer {s.layer}: the adapter gives no v/out tap, needed for attention gradients",
                "use a model whose adapter declares them (vitscope, timm, transformers ViTs)",
            )
    pixels = vit.preprocess(images, policy=policy, size=size).to(vit.device, vit.dtype)
    pixels = pixels.detach().clone().requires_grad_(True)  # the graph exists even if parameters are frozen
    t = Trace(vit=vit, pixels=pixels, output=None, layers=layer_ids)

    def on_layer(layer: int, x: dict[str, torch.Tensor]) -> None:
        q, k, v = x["q"], x["k"], x["v"]  # (B, H, N, d)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        site = vit.sites[layer]
        logits = torch.matmul(q.to(dt), k.to(dt).transpose(-2, -1)) * site.scale  # (B, H, N, N)
        t.attn[layer] = logits.softmax(dim=-1)
        t.values[layer] = v

    with ExitStack() as stack, torch.enable_grad():
        stack.enter_context(eval_mode(vit.module))
        stack.enter_context(record_sites(sites, ("q", "k", "v"), on_layer, detach=True))
        handles = stack.enter_context(hooks_removed_on_exit())
        for s in sites:
            out_tap = s.out
            assert out_tap is not None
            handles.append(_hook_raw(out_tap.module, out_tap.where, _store(t.outs, s.layer)))
            if blocks:
                handles.append(_hook_raw(s.block, "output", _store(t.blocks, s.layer)))
        t.output = vit(pixels)
    missing = [i for i in layer_ids if i not in t.attn or i not in t.outs]
    if missing:
        raise VitscopeError("model", f"layers {missing} were not reached in the forward pass", "check the adapter")
    return t


def resolve_classes(vit: VitModel, output: Any, target: Target) -> torch.Tensor | None:
    """Class index per image ``(B,)`` (``None`` for a callable target)."""
    if callable(target) and not isinstance(target, torch.Tensor):
        return None
    logits = vit.logits(output)
    if logits is None:
        raise VitscopeError(
            "target", "this model has no classifier output to take a class from",
            "pass a callable target(output) -> (batch,) scores",
        )
    B, C = logits.shape
    if target is None:
        return logits.detach().argmax(dim=-1)
    cls = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if cls.numel() == 1:
        cls = cls.expand(B)
    if cls.numel() != B:
        raise VitscopeError("target", f"{cls.numel()} classes for {B} images", "pass one class or one per image")
    if bool(((cls < 0) | (cls >= C)).any()):
        raise VitscopeError("target", f"class out of range for {C} classes: {cls.tolist()}", f"use 0..{C - 1}")
    return cls


def scores(vit: VitModel, output: Any, target: Target, classes: torch.Tensor | None) -> torch.Tensor:
    """One scalar per image ``(B,)``: the class logit, or the callable's value."""
    if classes is None:
        assert callable(target)
        s = target(output)
        if not isinstance(s, torch.Tensor):
            raise VitscopeError("target", f"the callable returned {type(s).__name__}", "return a (batch,) tensor")
        return s.reshape(s.shape[0], -1).sum(dim=1) if s.dim() > 1 else s.reshape(-1)
    logits = vit.logits(output)
    assert logits is not None
    return logits.gather(1, classes[:, None])[:, 0]


def attention_grads(t: Trace, score: torch.Tensor, layers: Sequence[int], retain_graph: bool = False,
                    ) -> dict[int, torch.Tensor]:
    """``dL/dA`` per layer ``(B, H, N, N)`` with ``L = score.sum()`` (images are independent)."""
    raws = [t.outs[i] for i in layers]
    grads = torch.autograd.grad(score.sum(), raws, retain_graph=retain_graph, allow_unused=True)
    out = {}
    for i, raw, g in zip(layers, raws, grads, strict=True):
        site = t.site(i)
        assert site.out is not None
        if g is None:
            g = torch.zeros_like(raw)
        d_out = site.out.extract(g, site.num_heads)  # (B, H, N, d)
        a = t.attn[i]
        out[i] = torch.matmul(d_out.to(a.dtype), t.values[i].to(a.dtype).transpose(-2, -1))  # (B, H, N, N)
    return out
