"""Ctrl-C that is never lost and never deadlocks.

`handler` is vitscope's SIGINT handler: it records the interrupt in a flag, then raises `KeyboardInterrupt` as
Python's own handler does, except inside `deferred` (a phase with a writer thread, e.g. batch mode's loop), where
it only records it: the loop calls `check` at its safe points and raises there, so a `KeyboardInterrupt` never
lands inside a lock (``logging``'s, tqdm's, an import's) that another thread then waits on forever. A second
Ctrl-C inside `deferred` raises at once.

The flag also survives code that swallows the exception (a bare ``except`` around an import): an error handler
asks `requested` before recording a failure, and the CLI exits 130 when it is set.

A Ctrl-C that lands while a module imports is held, not raised: torch's import runs Python from C++ (its
``distributed`` set-up, through pybind11), and an exception raised there aborts the process (``terminate called
after throwing pybind11::error_already_set``, status -6) instead of unwinding. The handler sees the import
machinery on the interrupted stack, records the interrupt and arms a 20 ms timer (``SIGALRM``) that looks again
and raises as soon as no import is running.

The signal path takes no lock, logs nothing and allocates nothing but the exception: it reads and writes
module globals only (and sets the timer, a system call).
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
_held = False  # a Ctrl-C landed inside an import: raised by `_release` once the import is over

_IMPORT_FILES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
_RECHECK_S = 0.02  # how often a held Ctrl-C looks whether the import is over


def _importing(frame: FrameType | None) -> bool:
    """Whether the interrupted stack runs inside ``import`` (the frames chain through any C++ in between)."""
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_FILES:
            return True
        frame = frame.f_back
    return False


def _arm() -> bool:
    """Ask for `_release` in `_RECHECK_S`; False where no timer is free (no ``setitimer``, someone else's
    ``SIGALRM`` handler): the Ctrl-C is then raised at once, as Python's own handler would."""
    if not hasattr(signal, "setitimer"):
        return False
    current = signal.getsignal(signal.SIGALRM)
    if current is not _release:
        if current not in (signal.SIG_DFL, None):
            return False
        signal.signal(signal.SIGALRM, _release)
    signal.setitimer(signal.ITIMER_REAL, _RECHECK_S)
    return True


def _disarm() -> None:
    """Stop the timer of a held Ctrl-C and give ``SIGALRM`` back (the flag stays: `check` still raises)."""
    global _held
    _held = False
    if hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) is _release:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def handler(signum: int, frame: FrameType | None) -> None:
    """SIGINT: record it; hold it while an import runs; raise `KeyboardInterrupt` unless deferred (then only
    on a second Ctrl-C)."""
    global _requested, _held
    again = _requested and not _held
    _requested = True
    if _importing(frame) and _arm():
        _held = True
        return
    if _held:
        _disarm()
    if not _deferred or again:
        raise KeyboardInterrupt


def _release(signum: int, frame: FrameType | None) -> None:
    """SIGALRM of a held Ctrl-C: still importing, look again later; else raise it (unless deferred)."""
    if not _held:
        return
    if _importing(frame) and _arm():
        return
    _disarm()
    if not _deferred:
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
    _disarm()
    _requested = False


def settle() -> None:
    """The outcome is decided: a held Ctrl-C no longer raises (its flag stays for `requested`)."""
    _disarm()


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
        _disarm()
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
