"""Hook plumbing: context managers that always remove their hooks and restore model state.

`record_sites` hooks the q/k/v/out taps of chosen layers and hands each layer's tensors to a callback as soon
as they are all seen, so at most one layer's q and k are alive at a time. Hooks never return a value, so the
model's outputs are untouched (bit-identical to an uncaptured run).

Hooks live on the modules, so a hook registered by one capture also fires for a forward pass of the same
model in another thread. Every vitscope hook is wrapped in `this_thread_only`: it acts only on forward passes
run by the thread that registered it, so concurrent captures of one model each see their own pass only.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import torch
from torch import nn

from vitscope._hooks import eval_mode, hooks_removed_on_exit
from vitscope.adapters.base import AttentionSite, Tap

__all__ = ["StopForward", "eval_mode", "hooks_removed_on_exit", "record_block_outputs", "record_sites",
           "this_thread_only"]

_Hook = TypeVar("_Hook", bound=Callable[..., None])


def this_thread_only(hook: _Hook) -> _Hook:
    """``hook`` made to run only for forward passes of the thread that calls this (where the hook is
    registered); in any other thread it does nothing (returns ``None``: the module's input/output unchanged)."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> None:
        if threading.get_ident() == owner:
            hook(*args, **kwargs)

    return cast(_Hook, guarded)


class StopForward(BaseException):
    """Raised by a hook to end a forward pass once everything wanted from it is in hand
    (`vitscope.capture.intercept.observe_attention`'s ``until_captured``); caught by the caller around the
    forward pass. A ``BaseException``, so a model's own ``except Exception`` does not
    swallow it and carry on half done."""


LayerCallback = Callable[[int, dict[str, torch.Tensor]], None]


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"hooked module produced {type(value).__name__}, expected a tensor")


@contextmanager
def record_sites(
    sites: Sequence[AttentionSite],
    names: Sequence[str],
    on_layer: LayerCallback,
    detach: bool = True,
) -> Iterator[None]:
    """Hook taps ``names`` (from ``"q"``, ``"k"``, ``"v"``, ``"out"``) of ``sites``.

    ``on_layer(layer, {"q": (B, H, N, d), ...})`` is called once per layer per forward pass. With
    ``detach=False`` the tensors stay in the autograd graph (gradient methods).
    """
    # One hook per (module, where) dispatching to every tap that reads it (a fused qkv Linear feeds q, k, v).
    routes: dict[tuple[int, str], list[tuple[AttentionSite, str, Tap]]] = {}
    modules: dict[int, nn.Module] = {}
    for site in sites:
        for name in names:
            tap: Tap | None = getattr(site, name)
            if tap is None:
                raise ValueError(f"layer {site.layer}: the adapter gives no {name!r} tap, needed here")
            key = (id(tap.module), tap.where)
            routes.setdefault(key, []).append((site, name, tap))
            modules[id(tap.module)] = tap.module

    pending: dict[int, dict[str, torch.Tensor]] = {}
    wanted = set(names)

    def deliver(entries: list[tuple[AttentionSite, str, Tap]], value: Any) -> None:
        tensor = _first_tensor(value)
        if detach:
            tensor = tensor.detach()
        for site, name, tap in entries:
            got = pending.setdefault(site.layer, {})
            got[name] = tap.extract(tensor, site.num_heads)
            if wanted.issubset(got):
                on_layer(site.layer, pending.pop(site.layer))

    with hooks_removed_on_exit() as handles:
        for (mid, where), entries in routes.items():
            module = modules[mid]
            if where == "output":

                def out_hook(_m: nn.Module, _inp: Any, out: Any, entries: Any = entries) -> None:
                    deliver(entries, out)

                handles.append(module.register_forward_hook(this_thread_only(out_hook)))
            else:

                def in_hook(_m: nn.Module, inp: Any, entries: Any = entries) -> None:
                    deliver(entries, inp)

                handles.append(module.register_forward_pre_hook(this_thread_only(in_hook)))
        try:
            yield
        finally:
            pending.clear()


@contextmanager
def record_block_outputs(sites: Sequence[AttentionSite], on_block: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Hook every block's output tokens ``(B, N, D)`` (before the final norm)."""
    with hooks_removed_on_exit() as handles:
        for site in sites:

            def hook(_m: nn.Module, _inp: Any, out: Any, layer: int = site.layer) -> None:
                on_block(layer, _first_tensor(out).detach())

            handles.append(site.block.register_forward_hook(this_thread_only(hook)))
        yield


@contextmanager
def record_token_norms(sites: Sequence[AttentionSite], norms: torch.Tensor) -> Iterator[None]:
    """Fill ``norms[layer]`` ``(B, N)`` float32 with the L2 norm of every block's output tokens (before the final
    norm): what ``token_norms=True`` means everywhere (`vitscope.capture`, `distance_pass`)."""

    def on_block(layer: int, x: torch.Tensor) -> None:
        norms[layer] = x.float().norm(dim=-1)

    with record_block_outputs(sites, on_block):
        yield

