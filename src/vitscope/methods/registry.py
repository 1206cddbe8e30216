"""The one table of maps: each method is declared once, in its own module, with what it needs.

A `Method` names the map the way users type it (``vitscope maps --method rollout``, ``vitscope.maps(...,
"rollout")``, ``vitscope batch --method rollout``, the report's ``--methods``), its parameters and defaults (the
keyword-only arguments of its ``compute`` function), its paper, and what it needs from the forward pass.
``compute(ctx, **params)`` receives a `MapContext`: the model and the pixels, prepared once, and a cache of
captures, so a report that runs several methods on the same images captures each selection once.

Adding a method is one module under ``vitscope/methods/`` that ends with ``register(Method(...))`` (imported by
`vitscope.methods.api`, which looks methods up by name) plus its test; every surface (CLI choices and help,
batch, report, figures) reads this registry. Registering a name twice is refused, as timm's model registry does.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vitscope.errors import VitscopeError


@dataclass
class MapResult:
    """A method's output: the map on the patch grid and what comes with it.

    For a padded batch of images on different grids (`vitscope.maps` of a variable-resolution model at native
    aspect ratios) ``images`` holds each image's own result on its own grid, ``grids`` the grids, and ``map``
    (and each extra whose last two dims are the grid) is NaN-padded to ``(B, max rows, max cols)``.
    """

    map: torch.Tensor  # (B, rows, cols) float32
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "heads" (B, H, rows, cols), "mask"
    meta: dict[str, Any] = field(default_factory=dict)  # method settings as used (JSON-able)
    images: list[MapResult] | None = None  # per image, on its own grid (padded batches only)

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Each image's patch grid ``(rows, cols)``."""
        if self.images is not None:
            return [(int(r.map.shape[-2]), int(r.map.shape[-1])) for r in self.images]
        return [(int(self.map.shape[-2]), int(self.map.shape[-1]))] * int(self.map.shape[0])


class MapContext:
    """The model and pixels of one call, prepared once, with captures cached by selection.

    ``observers`` (`vitscope.methods.observe.Observer`) ride on this context's first capture's forward pass, or,
    when the method captures nothing through the context, on one forward of their own (`observe`).
    """

    def __init__(self, vit: Any, pixels: torch.Tensor, observers: Sequence[Any] = ()) -> None:
        self.vit = vit
        self.pixels = pixels
        self._captures: dict[Any, Any] = {}
        self._observers = tuple(observers)  # fed once, by the first forward this context runs

    @property
    def grid(self) -> tuple[int, int]:
        return self.vit.grid_for((int(self.pixels.shape[-2]), int(self.pixels.shape[-1])))

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid
        return int(self.vit.info.num_prefix_tokens + rows * cols + self.vit.info.num_suffix_tokens)

    def capture(self, layers: int | Sequence[int] | None = None, queries: Any = None, heads: Any = "all") -> Any:
        """`vitscope.capture` of these pixels, computed once per selection (also reused by wider selections:
        a capture of every row and layer serves any request)."""
        from vitscope.capture.core import capture

        key = (_key(layers), _key(queries), _key(heads))
        full = (None, None, "all")
        if key not in self._captures and full in self._captures:
            return self._captures[full]
        if key not in self._captures and self._observers:
            self._captures[key] = self._observed(layers=layers, queries=queries, heads=heads)
        if key not in self._captures:
            self._captures[key] = capture(self.vit, self.pixels, layers=layers, queries=queries, heads=heads)
        return self._captures[key]

    # ---- observers (batch mode's per-image measures from the method's own forward pass)
    @property
    def observing(self) -> bool:
        """Observers are waiting for this context's first forward pass (a method with a pass of its own, like
        streamed rollout, would make them run a second one)."""
        return bool(self._observers)

    def observe(self) -> None:
        """Feed the observers, with a forward pass of their own unless a capture already carried them (a method
        that captured nothing through this context: gradient methods, streamed rollout). Also caches the
        predicted classes of that pass, so a gradient method's default target needs no forward of its own."""
        if self._observers:
            self._observed(select=False)

    def _observed(self, **selection: Any) -> Any:
        from vitscope.methods.observe import observed_capture

        observers, self._observers = self._observers, ()
        attn, output = observed_capture(self.vit, self.pixels, observers, **selection)
        logits = self.vit.logits(output)
        if logits is not None:  # the same forward as `classes`' own (no grad, eval mode, these pixels)
            self._captures.setdefault("predicted", logits.argmax(dim=-1).tolist())
        return attn

    def classes(self, target: Any) -> list[int] | Any:
        """The target of a gradient method as one class per image: ``None`` -> the predicted classes (one
        forward pass, cached); an int or a class name -> that class for every image; a callable is passed
        through; text prompts and references -> a list of `vitscope.methods.targets.TokenScore` (one map each)."""
        from vitscope.methods.targets import TokenScore, resolve_target

        if callable(target) and not isinstance(target, torch.Tensor):
            return target
        if target is not None:
            target = resolve_target(self.vit, target)
            if isinstance(target, list) and target and isinstance(target[0], TokenScore):
                return target
            t = check_target(target)
            return [t[0]] * int(self.pixels.shape[0]) if len(t) == 1 else t
        if "predicted" not in self._captures:
            with torch.no_grad():
                logits = self.vit.logits(self.vit(self.pixels.to(self.vit.device, self.vit.dtype)))
            if logits is None:
                from vitscope.methods.targets import _works

                raise VitscopeError("target", "the model has no classifier to take a class from",
                                    _works(self.vit))
            self._captures["predicted"] = logits.argmax(dim=-1).tolist()
        return self._captures["predicted"]

    def attention_bytes(self) -> int:
        """Bytes of every layer's full ``H x N x N`` float32 attention for these pixels."""
        info = self.vit.info
        return int(4 * self.pixels.shape[0] * info.num_layers * info.num_heads * self.num_tokens**2)


_TARGET_FIX = ("pass a class index or name, one per image, 'text:<prompt>', 'image:<path>', 'patch:ROW,COL', or "
               "in Python a callable scoring each image")


def check_target(target: Any) -> list[int]:
    """A gradient method's class target (not ``None``, not a callable) as a list of class indices: an int, a
    list/tuple/1-d array of ints or an integer tensor; bools, floats, strings and empty lists are refused."""
    from vitscope.layout import as_index

    if isinstance(target, (list, tuple, range)) or getattr(target, "ndim", 0) >= 1:
        if getattr(target, "ndim", 1) != 1:
            raise VitscopeError("target", f"a {target.ndim}-d array of classes", _TARGET_FIX)
        items = list(target)
        if not items:
            raise VitscopeError("target", "no class given", _TARGET_FIX)
        return [as_index(t, "target", "class", _TARGET_FIX) for t in items]
    return [as_index(target, "target", "class", _TARGET_FIX)]


def _key(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


Needs = Literal["attention", "gradients", "features"]


@dataclass(frozen=True)
class Method:
    """One map, declared once.

    Attributes:
        name: what users type (``"cls"``, ``"rollout"``, ...).
        compute: ``compute(ctx: MapContext, **params) -> MapResult``; its keyword-only arguments are the
            method's parameters and their defaults.
        summary: one line for ``--help`` and docs.
        paper: the reference (authors, title, venue year).
        needs: ``"attention"`` (a forward pass, no autograd), ``"gradients"`` (a target class, backward) or
            ``"features"`` (one block's output tokens, no attention: the feature views ``pca``, ``similarity``).
        upsample: how the map is brought to pixels (``"bilinear"``; ``"nearest"`` for masks).
        check: ``check(vit)`` (its return value unused) raises the one-line `VitscopeError` when the method cannot run on this model at all
            (an optional package missing, a family without its rules); ``None``: every model. Cheap: no forward
            pass. `vitscope.methods.api.supported_methods` reads it (the report's default list).
    """

    name: str
    compute: Callable[..., MapResult]
    summary: str
    paper: str
    needs: Needs = "attention"
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    check: Callable[[Any], object] | None = None

    @property
    def params(self) -> dict[str, Any]:
        """Parameter name -> default, from ``compute``'s keyword-only arguments."""
        sig = inspect.signature(self.compute)
        return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a second method of the same name is refused)."""
    old = REGISTRY.get(method.name)
    if old is not None and old.compute is not method.compute:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def check_params(method: Method, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` completed with the method's defaults; an unknown name is a one-line error."""
    known = method.params
    bad = sorted(set(params) - set(known))
    if bad:
        raise VitscopeError(
            bad[0], f"method {method.name!r} has no parameter {bad[0]!r}",
            f"its parameters are {', '.join(known) or 'none'}",
        )
    for name, value in params.items():
        _check_type(name, known[name], value)
    return {**known, **params}


def _check_type(name: str, default: Any, value: Any) -> None:
    """A parameter whose default is a bool, an int or a float takes a value of that kind (a finite number for
    floats); the method itself checks its range."""
    from vitscope.layout import as_index

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise VitscopeError(name, f"expected True or False, got {value!r}", f"pass {name}=True or {name}=False")
    elif isinstance(default, int):
        as_index(value, name, name.replace("_", " "), f"pass an integer, e.g. {name}={default}")
    elif isinstance(default, float) and (
        isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
    ):
        raise VitscopeError(name, f"expected a finite number, got {value!r}", f"pass a number, e.g. {name}={default}")
