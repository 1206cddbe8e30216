"""Errors vitscope raises on bad input: one line that names the argument and the fix."""

from __future__ import annotations


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
