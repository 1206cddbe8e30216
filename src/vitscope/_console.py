"""The ``vitscope`` console script: Ctrl-C handling from its first moment, then `vitscope.cli.run`.

Kept apart from `vitscope.cli` so that nothing (typer, torch) is imported before the SIGINT handler is in place:
a Ctrl-C while the command's modules load is "interrupted", exit 130, never a traceback.
"""

from __future__ import annotations

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
        _interrupt.defer_rest()  # from here on a Ctrl-C is only recorded: the work is done or said
    if code:
        sys.exit(code)
