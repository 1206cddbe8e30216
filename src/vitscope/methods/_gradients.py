"""Attention and its gradient, with the model's fused attention left on.

One forward pass with autograd on; `vitscope.capture.intercept` reports each layer's attention where the model
computes it (hooks removed and training flags restored on exit). Per layer it gives q, k, the additive bias and
a tensor of the model's own graph: the kernel output ``O = A V`` (SDPA, ``nn.MultiheadAttention``) or ``A``
itself (an explicit softmax). Then

    A      = softmax(q k^T * scale + bias)     recomputed exactly (float32, or float64 for a float64 model)
    dL/dA  = dL/dO @ V^T                       exact, because O = A V    (or dL/dA directly for explicit A)

with ``dL/dO`` from ``torch.autograd.grad`` w.r.t. the graph tensors. ``torch.autograd.grad`` writes no
``.grad`` on any parameter, and the pixels get their own ``requires_grad`` copy so the graph exists even for
frozen models.

Gradient methods turn autograd on locally (`grad_enabled`), so they work the same inside a caller's
``torch.no_grad()`` or ``torch.inference_mode()`` block: inference mode is left for the method's duration and
the pixels are cloned out of it (an inference tensor cannot join an autograd graph).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from vitscope.adapters.base import AttentionSite, SizePolicy, VitModel
from vitscope.capture.core import check_call_tokens, resolve_layers
from vitscope.capture.hooks import _first_tensor, eval_mode, hooks_removed_on_exit, this_thread_only
from vitscope.capture.intercept import AttentionCall, observe_attention, prove_batch_axis, refuse_compiled
from vitscope.capture.windows import check_windowed_layers
from vitscope.errors import VitscopeError
from vitscope.layout import as_index
from vitscope.methods.registry import check_target
from vitscope.methods.targets import ClassName, TokenScore, resolve_target

#: A target (`vitscope.methods.targets`): ``None`` (the predicted class), a class index or name, one class per
#: image, ``"text:<prompt>"`` (or a list: one map each), ``"image:<path>"``, ``"patch:R,C"``, or a callable
#: taking the model output and returning one scalar per image ``(B,)``.
Target = (None | int | str | ClassName | TokenScore | Sequence[int | str] | torch.Tensor
          | Callable[[Any], torch.Tensor])

_P = ParamSpec("_P")
_R = TypeVar("_R")


def per_target(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Resolve ``fn``'s target (`vitscope.methods.targets.resolve_target`: names looked up, prompts encoded)
    and run ``fn`` once per text prompt or reference: several give ``(B * T, rows, cols)``, image-major
    (``map[b * T + t]`` is image ``b``, target ``t``)."""

    @functools.wraps(fn)
    def run(model: Any, images: Any, target: Target = None, **kwargs: Any) -> torch.Tensor:
        from vitscope.adapters import as_vit

        vit = as_vit(model)
        resolved = resolve_target(vit, target)
        if isinstance(resolved, list) and resolved and isinstance(resolved[0], TokenScore):
            maps = [fn(vit, images, r, **kwargs) for r in resolved]  # each (B, rows, cols)
            return maps[0] if len(maps) == 1 else torch.stack(maps, dim=1).flatten(0, 1)
        return fn(vit, images, resolved, **kwargs)

    return run


def grad_enabled(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with autograd on and inference mode off, whatever the caller's grad mode: a gradient method
    called inside ``torch.no_grad()`` or ``torch.inference_mode()`` gives the same map as outside."""

    @functools.wraps(fn)
    def with_grad(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return with_grad


@dataclass
class Trace:
    """What one traced forward pass leaves: attention, values, graph-attached outputs per layer."""

    vit: VitModel
    pixels: torch.Tensor
    output: Any
    layers: tuple[int, ...]
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, N), detached
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, N, d), detached
    outs: dict[int, torch.Tensor] = field(default_factory=dict)  # O = A V (or A), in the graph
    calls: dict[int, AttentionCall] = field(default_factory=dict)  # what each layer's kernel saw
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # block outputs (B, N, D), in the graph
    last: torch.Tensor | None = None  # the model's last block output (B, N, D), in the graph (token targets)

    @property
    def prefix(self) -> tuple[str, ...]:
        return self.vit.info.prefix

    @property
    def suffix(self) -> tuple[str, ...]:
        return self.vit.info.suffix

    @property
    def grid(self) -> tuple[int, int]:
        return self.vit.grid_for((int(self.pixels.shape[-2]), int(self.pixels.shape[-1])))

    @property
    def patch_slice(self) -> slice:
        """The patch tokens ``[prefix, patches, suffix]``: after the prefix, before the suffix."""
        P0, (rows, cols) = len(self.prefix), self.grid
        return slice(P0, P0 + rows * cols)

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

        return module.register_forward_hook(this_thread_only(out_hook))

    def in_hook(_m: nn.Module, inp: Any) -> None:
        store(_first_tensor(inp))

    return module.register_forward_pre_hook(this_thread_only(in_hook))


def layers_from(model: Any, start_layer: int) -> list[int]:
    """Layers ``start_layer .. last`` of ``model`` (``start_layer`` may be negative)."""
    from vitscope.adapters import as_vit

    n = as_vit(model).info.num_layers
    start_layer = as_index(start_layer, "start_layer", "layer", f"pass an integer in [-{n}, {n - 1}]")
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
    last_block: bool = False,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> Trace:
    """Run ``model`` once on ``images`` with autograd on; see the module docstring. The caller keeps grad mode
    on while it uses the trace (`grad_enabled`). ``last_block``: keep the model's last block output
    (``Trace.last``), which text, image and patch targets score."""
    from vitscope.capture.prepare import prepare

    vit, pixels = prepare(model, images, policy=policy, size=size)
    layer_ids = resolve_layers(layers, vit.info.num_layers)
    check_windowed_layers(vit.info, layer_ids, default=layers is None)
    sites = [vit.sites[i] for i in layer_ids]
    with torch.inference_mode(False):  # a clone made here is a normal tensor, even from an inference tensor
        pixels = pixels.detach().clone().requires_grad_(True)  # the graph exists even if parameters are frozen
    t = Trace(vit=vit, pixels=pixels, output=None, layers=layer_ids)
    grid = t.grid
    N = vit.info.num_prefix_tokens + grid[0] * grid[1] + vit.info.num_suffix_tokens  # [prefix, patches, suffix]

    def on_call(call: AttentionCall) -> None:
        check_call_tokens(call, N, grid, vit.info.num_prefix_tokens, vit.info.num_suffix_tokens)
        layer = call.layer
        src = call.q if call.q is not None else call.probs
        assert src is not None
        dt = torch.float64 if src.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            t.attn[layer] = call.rows(None, None, False, dtype=dt)  # (B, H, N, N), detached
        if call.v is not None:
            t.values[layer] = call.v.detach()
        assert call.out is not None
        t.outs[layer] = call.out
        t.calls[layer] = call

    refuse_compiled(vit.module)
    with ExitStack() as stack, torch.inference_mode(False), torch.enable_grad():
        stack.enter_context(eval_mode(vit.module))
        prove_batch_axis(vit, pixels.detach(), sites, N)
        check = stack.enter_context(observe_attention(sites, on_call, graph=True, batch=int(pixels.shape[0]), tokens=N))
        handles = stack.enter_context(hooks_removed_on_exit())
        if blocks:
            for s in sites:
                handles.append(_hook_raw(s.block, "output", _store(t.blocks, s.layer)))
        last: dict[int, torch.Tensor] = {}
        if last_block:
            handles.append(_hook_raw(vit.sites[-1].block, "output", _store(last, -1)))
        t.output = vit(pixels)
        check()
    t.last = last.get(-1)
    return t


def resolve_classes(vit: VitModel, output: Any, target: Target) -> torch.Tensor | None:
    """Class index per image ``(B,)`` (``None`` for a callable or token target)."""
    if isinstance(target, TokenScore) or (callable(target) and not isinstance(target, torch.Tensor)):
        return None
    logits = vit.logits(output)
    if logits is None:
        from vitscope.methods.targets import _works

        raise VitscopeError("target", "this model has no classifier output to take a class from", _works(vit))
    B, C = logits.shape
    if target is None:
        return logits.detach().argmax(dim=-1)
    wanted = check_target(target)
    if any(not 0 <= c < C for c in wanted):
        raise VitscopeError("target", f"class out of range for {C} classes: {wanted}", f"use 0..{C - 1}")
    cls = torch.as_tensor(wanted, dtype=torch.long, device=logits.device)
    if cls.numel() == 1:
        cls = cls.expand(B)
    if cls.numel() != B:
        raise VitscopeError("target", f"{cls.numel()} classes for {B} images", "pass one class or one per image")
    if bool(((cls < 0) | (cls >= C)).any()):
        raise VitscopeError("target", f"class out of range for {C} classes: {cls.tolist()}", f"use 0..{C - 1}")
    return cls


def scores(vit: VitModel, output: Any, target: Target, classes: torch.Tensor | None) -> torch.Tensor:
    """One scalar per image ``(B,)``: the class logit, or the callable's value (``output``: the model's output;
    a `TokenScore` target scores the last block's tokens instead: `target_scores`)."""
    if classes is None:
        assert callable(target)
        s = target(output)
        if not isinstance(s, torch.Tensor):
            raise VitscopeError("target", f"the callable returned {type(s).__name__}", "return a (batch,) tensor")
        return s.reshape(s.shape[0], -1).sum(dim=1) if s.dim() > 1 else s.reshape(-1)
    logits = vit.logits(output)
    if logits is None and isinstance(output, torch.Tensor) and output.dim() == 2:
        logits = output  # a read-out's logits (LeGrad): transformers' own outputs wrap them, a read-out does not
    assert logits is not None
    return logits.gather(1, classes[:, None])[:, 0]


def target_scores(t: Trace, target: Target, classes: torch.Tensor | None) -> torch.Tensor:
    """The target's scores ``(B,)`` for a trace: a `TokenScore` on the last block's tokens, else `scores`."""
    if isinstance(target, TokenScore):
        assert t.last is not None, "trace(..., last_block=True) for a token target"
        return target.score(t.last, t.grid)
    return scores(t.vit, t.output, target, classes)


def attention_grads(t: Trace, score: torch.Tensor, layers: Sequence[int], retain_graph: bool = False,
                    ) -> dict[int, torch.Tensor]:
    """``dL/dA`` per layer ``(B, H, N, N)`` with ``L = score.sum()`` (images are independent)."""
    raws = [t.outs[i] for i in layers]
    grads = torch.autograd.grad(score.sum(), raws, retain_graph=retain_graph, allow_unused=True)
    out = {}
    for i, raw, g in zip(layers, raws, grads, strict=True):
        call = t.calls[i]
        a = t.attn[i]
        if g is None:
            g = torch.zeros_like(raw)
        if call.out_to_heads is None:  # the model's own A: its gradient is dL/dA
            out[i] = g.to(a.dtype).reshape(a.shape)  # (a softmax folding heads into the batch: (B*H, N, N))
            continue
        d_out = call.out_to_heads(g)  # (B, H, N, dv)
        out[i] = torch.matmul(d_out.to(a.dtype), t.values[i].to(a.dtype).transpose(-2, -1))  # (B, H, N, N)
    return out
