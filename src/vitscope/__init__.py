"""vitscope: see and measure what a Vision Transformer attends to.

>>> import vitscope
>>> vit = vitscope.load("vitscope:shapes")                         # doctest: +SKIP
>>> attn = vitscope.capture(vit, "cat.png", queries="cls")          # doctest: +SKIP
"""


from vitscope.adapters import ModelInfo, VitModel, load, wrap
from vitscope.attentions import Attentions
from vitscope.capture import capture
from vitscope.errors import VitscopeError
from vitscope.methods.registry import maps

__version__ = "0.1.0"

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
