"""vitscope: see and measure what a Vision Transformer attends to.

>>> import vitscope
>>> vit = vitscope.load("vitscope:shapes")                         # doctest: +SKIP
>>> attn = vitscope.capture(vit, "cat.png", queries="cls")          # doctest: +SKIP
"""


from vitscope._version import __version__
from vitscope.adapters import ModelInfo, VitModel, load, wrap
from vitscope.attentions import Attentions
from vitscope.capture import capture
from vitscope.errors import VitscopeError
from vitscope.methods.api import maps

__all__ = [
    "Attentions",
    "ModelInfo",
    "VitModel",
    "VitscopeError",
    "__version__",
    "capture",
    "load",
    "maps",
    "wrap",
]
