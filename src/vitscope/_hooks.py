"""Context managers that always undo what they did: module ``training`` flags and hook handles."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.hooks import RemovableHandle

#: module id -> (how many eval_mode blocks hold it, every submodule's own flag before the first one)
_HELD: dict[int, tuple[int, dict[nn.Module, bool]]] = {}
_HELD_LOCK = threading.Lock()


def submodules(root: nn.Module) -> list[nn.Module]:
    """``root`` and every module under it, each once (what ``root.modules()`` yields, breadth first): read straight
    from each module's ``_modules``, about 2.5x faster than torch's generator (~0.1 ms for a ViT-S), which a
    small input's capture runs twice per call."""
    out, seen, i = [root], {id(root)}, 0
    while i < len(out):
        for child in out[i]._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
        i += 1
    return out


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own ``training`` flag on exit.

    Counted per module across threads: while captures of one model overlap (several threads), the first one
    switches it to eval mode and the last one to leave restores the flags, never one in the middle of another's
    forward pass."""
    key = id(module)
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is None:
            flags = {m: m.training for m in submodules(module)}
            if not any(flags.values()):  # already in eval mode: nothing to switch (saves a walk per forward)
                flags = {}
            else:
                module.eval()
                _HELD[key] = (1, flags)
        else:
            flags = held[1]
            _HELD[key] = (held[0] + 1, flags)
    if not flags:
        yield module
        return
    try:
        yield module
    finally:
        with _HELD_LOCK:
            count, saved = _HELD[key]
            if count > 1:
                _HELD[key] = (count - 1, saved)
            else:
                del _HELD[key]
                for m, flag in saved.items():
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
