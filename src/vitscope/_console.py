"""The ``vitscope`` console script: Ctrl-C handling from its first moment, then `vitscope.cli.run`.

Kept apart from `vitscope.cli` so that nothing (typer, torch) is imported before the SIGINT handler is in place:
a Ctrl-C while the command's modules load is "interrupted", exit 130, never a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys

from vitscope import _interrupt


def _interrupted() -> None:
    try:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    except Exception:  # a closed or broken stderr: the exit code still says it
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vitscope`` console script: returns on success, else exits with `run`'s code."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the shell made us ignore it
        _interrupt.reset()
        _interrupt.install()
    try:
        from vitscope.cli import run

        code = run(argv)
    except KeyboardInterrupt:  # while vitscope.cli loaded, or just after `run` said how it ended
        code = 130
        _interrupted()
    finally:
        # the outcome is said: a Ctrl-C from here on (even a second one, even while the interpreter shuts down,
        # when Python would restore the default action and die of SIGINT) is ignored, so the exit code stays
        if _interrupt.installed():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _interrupt.settle()
    if code == 130:
        _exit_interrupted()
    if code:
        sys.exit(code)


def _exit_interrupted() -> None:
    """Exit 130 after the usual clean-up. Not through ``sys.exit``: when a Ctrl-C landed inside code that a C
    extension ran while a module imported (torch's import does this), CPython remembers the KeyboardInterrupt as
    unhandled even though vitscope caught it, and at exit kills the process with SIGINT (status -2, no message)
    whatever the program returned. ``os._exit`` after the atexit handlers (Ray's shutdown, loader workers'
    joins) keeps the code the user was told."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: the exit code still says it
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(130)
