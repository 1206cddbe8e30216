"""Ctrl-C that is never lost and never deadlocks.

`handler` is vitscope's SIGINT handler: it records the interrupt in a flag, then raises `KeyboardInterrupt` as
Python's own handler does, except inside `deferred` (a phase with a writer thread, e.g. batch mode's loop), where
it only records it: the loop calls `check` at its safe points and raises there, so a `KeyboardInterrupt` never
lands inside a lock (``logging``'s, tqdm's, an import's) that another thread then waits on forever. A second
Ctrl-C inside `deferred` raises at once.

The flag also survives code that swallows the exception (a bare ``except`` around an import): an error handler
asks `requested` before recording a failure, and the CLI exits 130 when it is set.

The signal path takes no lock, logs nothing and allocates nothing but the exception: it reads and writes
module globals only.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

_requested = False  # a Ctrl-C arrived (since the last `reset`)
_deferred = 0  # depth of `deferred` blocks: > 0 means record only


def handler(signum: int, frame: FrameType | None) -> None:
    """SIGINT: record it; raise `KeyboardInterrupt` unless deferred (then only on a second Ctrl-C)."""
    global _requested
    again = _requested
    _requested = True
    if not _deferred or again:
        raise KeyboardInterrupt


def requested() -> bool:
    """Whether a Ctrl-C arrived (even one whose exception something swallowed)."""
    return _requested


def check() -> None:
    """Raise `KeyboardInterrupt` if a Ctrl-C arrived: call at a point where stopping is safe."""
    if _requested:
        raise KeyboardInterrupt


def reset() -> None:
    global _requested
    _requested = False


def installed() -> bool:
    return signal.getsignal(signal.SIGINT) is handler


def install() -> Any:
    """Make `handler` the SIGINT handler (main thread only); returns the previous one (None elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


@contextmanager
def handling() -> Iterator[None]:
    """`handler` for the block (main thread, when Python's default handler or none of vitscope's is in place);
    the previous handler afterwards. A block that installs it starts with a clear flag."""
    if installed() or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    reset()
    old = install()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a (first) Ctrl-C is only recorded; `check` raises it at a safe point, and so does the
    block's end."""
    global _deferred
    with handling():
        _deferred += 1
        try:
            yield
        finally:
            _deferred -= 1
        check()
