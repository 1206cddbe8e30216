"""The ``vitscope`` console script: Ctrl-C handling from its first moment, then `vitscope.cli.run`.

Kept apart from `vitscope.cli` so that nothing (typer, torch) is imported before the SIGINT handler is in place:
a Ctrl-C while the command's modules load is "interrupted", exit 130, never a traceback.
"""

from __future__ import annotations

import signal
import sys

from vitscope import _interrupt


def _interrupted() -> int:
    try:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    except Exception:  # a closed or broken stderr: the exit code still says it
        pass
    return 130


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vitscope`` console script: returns on success, else exits with `run`'s code."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the shell made us ignore it
        _interrupt.reset()
        _interrupt.install()
    try:
        from vitscope.cli import run

        code = run(argv)
    except KeyboardInterrupt:  # while vitscope.cli loaded
        code = _interrupted()
    if _interrupt.installed():  # from here on a late Ctrl-C only records (the work is done or said)
        _interrupt.defer_rest()
    if code:
        sys.exit(code)
