"""Errors vitscope raises on bad input: one line that names the argument and the fix.

A fix that tells the caller to pass another argument names it in backticks as Python would write it,
```checkpoint='path/to/model.safetensors'``` or ```random_weights=True```: Python users read it as is, and the
``vitscope`` command renders each such span as its own option (``--checkpoint path/to/model.safetensors``,
``--random-weights``) through the same argument -> option mapping it uses for ``argument`` (`ARGUMENT_IN_FIX`).
"""

from __future__ import annotations

import re

#: An argument named inside a fix: ```name=value``` (value as Python writes it: ``True``, ``'text'``, ``224``,
#: ``<class index>``). Other backticked text (a shell command, a file name) is left alone.
ARGUMENT_IN_FIX = re.compile(r"`([a-z_][a-z0-9_]*)=([^`]*)`")


class VitscopeError(ValueError):
    """Bad input to vitscope. ``str(err)`` is one line: the argument, what is wrong, and how to fix it."""

    def __init__(self, argument: str, problem: str, fix: str | None = None) -> None:
        self.argument = argument
        self.problem = problem
        self.fix = fix
        msg = f"{argument}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class NotAViTError(VitscopeError):
    """The model has no attention blocks vitscope can read."""


class CheckpointError(VitscopeError):
    """A checkpoint is missing, unreadable, or would execute code."""


class ImageError(VitscopeError):
    """An input image cannot be read or used."""


class CaptureError(VitscopeError):
    """Attention could not be captured exactly: the layer and the reason, in one line."""


class VitscopeWarning(UserWarning):
    """Something vitscope did that the caller should know, e.g. a viewer that left layers out to fit its size
    budget. Shown once per place by Python's default warning filters (scripts and notebooks alike)."""
