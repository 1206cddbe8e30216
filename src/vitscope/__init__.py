"""vitscope: see and measure what a Vision Transformer attends to.

>>> import vitscope
>>> vit = vitscope.load("vitscope:shapes")                         # doctest: +SKIP
>>> attn = vitscope.capture(vit, "cat.png", queries="cls")          # doctest: +SKIP

The public names load on first use: ``import vitscope`` itself imports no torch, so the ``vitscope`` command can
install its Ctrl-C handler before torch loads (a Ctrl-C in the first seconds is then "interrupted", exit 130).
"""

import importlib as _importlib
import sys as _sys
import types as _types
import typing as _typing

from vitscope._version import __version__

if _typing.TYPE_CHECKING:
    from vitscope.adapters import ModelInfo, VitModel, load, wrap
    from vitscope.attentions import Attentions
    from vitscope.capture import capture
    from vitscope.errors import VitscopeError, VitscopeWarning
    from vitscope.evaluate import evaluate
    from vitscope.methods.api import maps
    from vitscope.methods.video import video_maps

#: public name -> the module that defines it
_EXPORTS = {
    "ModelInfo": "vitscope.adapters", "VitModel": "vitscope.adapters", "load": "vitscope.adapters",
    "wrap": "vitscope.adapters", "Attentions": "vitscope.attentions", "capture": "vitscope.capture",
    "VitscopeError": "vitscope.errors", "VitscopeWarning": "vitscope.errors", "maps": "vitscope.methods.api",
    "evaluate": "vitscope.evaluate",
    "video_maps": "vitscope.methods.video",
}

__all__ = [
    "Attentions",
    "ModelInfo",
    "VitModel",
    "VitscopeError",
    "VitscopeWarning",
    "__version__",
    "capture",
    "evaluate",
    "load",
    "maps",
    "video_maps",
    "wrap",
]


class _Package(_types.ModuleType):
    """The ``vitscope`` module: the first public name used imports them all (and with them the submodules they
    import, as an eager ``__init__`` would); the subpackage ``vitscope.capture`` never hides the function."""

    def __getattr__(self, name: str) -> _typing.Any:
        if name.startswith("_"):  # private names and dunder probes (copy, pickle, inspect) load nothing
            raise AttributeError(f"module 'vitscope' has no attribute {name!r}")
        for public, module in _EXPORTS.items():
            if public not in self.__dict__:
                _types.ModuleType.__setattr__(self, public, getattr(_importlib.import_module(module), public))
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'vitscope' has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: _typing.Any) -> None:
        if name in _EXPORTS and isinstance(value, _types.ModuleType):  # the import system naming a subpackage
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_EXPORTS))


_sys.modules[__name__].__class__ = _Package
