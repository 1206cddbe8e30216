"""Context managers that always undo what they did: module ``training`` flags and hook handles."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own ``training`` flag on exit."""
    flags = {m: m.training for m in module.modules()}
    if not any(flags.values()):  # already in eval mode: nothing to switch (saves a walk per forward)
        yield module
        return
    try:
        module.eval()
        yield module
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextmanager
def hooks_removed_on_exit() -> Iterator[list[RemovableHandle]]:
    """Collect hook handles; remove all of them on exit, also when an exception is raised."""
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        handles.clear()
