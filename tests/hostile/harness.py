"""The hostile-input catalogue's one harness: run a CLI line in-process (or through the installed console
script), and check what every case must hold:

- the exit code (2 for bad input, 130 for Ctrl-C), one line on stderr starting with ``error: `` that names a CLI
  option (``--x``) or the argument, never a traceback;
- for a command that writes: no file outside ``-o`` changed, and no file that existed inside it before was lost
  or changed (the whole tree is hashed before and after).

Each surface's cases live in their own ``tests/hostile/test_*.py`` as one table; this module holds no cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "vitscope"  # the venv's console script
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

#: a CLI option or argument name in an error line: ``--max-pixels``, ``-o``, or ``IMAGES``-style argument names
OPTION = re.compile(r"(--[a-z][a-z0-9-]*|-[a-zA-Z]\b)")


def tree_state(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (files), ``"<dir>"``, or ``"-> target"`` (symlinks, never followed)."""
    state: dict[str, str] = {}
    if not root.exists():
        return state
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = f"-> {os.readlink(p)}"
            elif p.is_dir():
                state[rel] = "<dir>"
            else:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                state[rel] = h.hexdigest()
    return state


def check_contained(before: dict[str, str], after: dict[str, str], root: Path, outputs: Iterable[Path]) -> None:
    """Outside every path in ``outputs`` nothing changed; inside, every file that existed before is unchanged
    (vitscope may only add files, or replace files it wrote itself: the caller passes those in ``outputs``
    only when the case is a re-run over vitscope's own output)."""
    outs = [Path(o).resolve() for o in outputs]

    def inside(rel: str) -> bool:
        p = (root / rel).resolve() if not (root / rel).is_symlink() else (root / rel).parent.resolve() / Path(rel).name
        return any(p == o or o in p.parents for o in outs)

    for rel, digest in before.items():
        assert rel in after, f"{rel} was deleted"
        assert after[rel] == digest, f"{rel} was changed"
    for rel in after.keys() - before.keys():
        assert inside(rel), f"{rel} was created outside -o"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def run_inprocess(argv: Sequence[str], cwd: Path | None = None) -> Result:
    """``vitscope.cli.run(argv)`` with stdout/stderr captured (and the working folder set, if given)."""
    from vitscope.cli import run

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run(list(argv))
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


def run_script(argv: Sequence[str], cwd: Path | None = None, timeout: float = 120) -> Result:
    """The installed console script in a subprocess."""
    res = subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)
    return Result(res.returncode, res.stdout, res.stderr)


def assert_one_line(res: Result, code: int = 2, needle: str | None = None, option: bool = True) -> str:
    """Exit ``code``, exactly one stderr line, no traceback; for code 2 the line starts with ``error: `` and
    (``option``) names a CLI option; ``needle`` must appear in it."""
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = res.lines()
    assert res.code == code, (res.code, res.stdout, res.stderr)
    if code == 130:
        assert lines and "interrupted" in lines[-1], res.stderr
        return lines[-1]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    if code == 2:
        assert line.startswith("error: "), line
        if option:
            assert OPTION.search(line), f"names no CLI option: {line}"
    if needle is not None:
        assert needle in line, (needle, line)
    return line
