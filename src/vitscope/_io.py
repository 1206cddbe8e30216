"""Atomic file writes: a reader never sees a partial file, and an interrupted write leaves the old one."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, so never toggle it while threads write
#: Mode of files and folders vitscope writes: what ``open()`` / ``mkdir()`` would give under the user's umask.
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def make_temp_dir(prefix: str, dir: str | os.PathLike[str] | None = None) -> Path:
    """``tempfile.mkdtemp`` (mode 0700), then given the mode ``mkdir`` would (the folder is swapped in later)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(path, DIR_MODE)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=(suffix if suffix is not None else target.suffix) + ".part",
        dir=target.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 (and a writer may replace the file): give it the permissions open() would
        os.chmod(tmp_path, FILE_MODE)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``writer(fh)`` on a temporary binary file, then move it onto ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_savez(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], compress: bool = True) -> Path:
    """``np.savez_compressed`` (or ``np.savez``) of ``arrays`` to ``path`` atomically (lossless)."""
    buf = io.BytesIO()
    if compress:
        np.savez_compressed(buf, allow_pickle=False, **arrays)
    else:
        np.savez(buf, allow_pickle=False, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def _check_parents(p: Path, argument: str) -> None:
    """The nearest existing ancestor of ``p`` must be a writable folder."""
    from vitscope.errors import VitscopeError

    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise VitscopeError(argument, f"{parent} is a file, so {p} cannot be created",
                                    "pass a path inside a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise VitscopeError(argument, f"cannot write in {parent} (permission denied)",
                                    "pick a folder you can write to")
            return


def output_target(out: str | os.PathLike[str], *, suffixes: tuple[str, ...] | None, name: str | None = None,
                  argument: str = "--output") -> Path:
    """The one rule for ``-o``: a path with a suffix names a file, a path without one a folder.

    ``suffixes``: the file types a command writes (``None``: the command writes a folder). ``name``: the file
    written inside a folder. Returns the file to write (or the folder). The wrong kind (an existing folder
    named as a file, a file named as a folder, an unknown suffix, a parent that is a file or not writable) is
    refused with a one-line `VitscopeError`, so nothing is computed for an output that cannot be written.
    """
    from vitscope.errors import VitscopeError

    p = Path(out).expanduser()
    kinds = ", ".join(suffixes) if suffixes else ""
    if suffixes is None or not p.suffix:
        if p.exists() and not p.is_dir():
            raise VitscopeError(argument, f"{p} is an existing file, not a folder",
                                f"name a folder (no suffix){f', or a {kinds} file' if kinds else ''}")
        if suffixes is None and p.suffix and not p.is_dir():
            raise VitscopeError(argument, f"{p} names a file ({p.suffix!r} suffix), but this command writes a folder",
                                "drop the suffix, e.g. -o " + str(p.with_suffix("")))
        _check_parents(p / "x", argument)
        if suffixes is None:
            return p
        if p.exists() and not os.access(p, os.W_OK | os.X_OK):
            raise VitscopeError(argument, f"cannot write in {p} (permission denied)", "pick a folder you can write to")
        assert name is not None
        target = p / name
        if target.is_dir():
            raise VitscopeError(argument, f"{target} is an existing folder", "remove it or pick another -o")
        return target
    if p.suffix.lower() not in suffixes:
        raise VitscopeError(argument, f"unsupported file type {p.suffix!r} for {p}",
                            f"use {kinds}, or a folder (no suffix)")
    if p.is_dir():
        raise VitscopeError(argument, f"{p} is an existing folder, not a {p.suffix} file",
                            "name a file, or pass a folder without a suffix")
    _check_parents(p, argument)
    if p.exists() and not os.access(p, os.W_OK):
        raise VitscopeError(argument, f"cannot overwrite {p} (permission denied)", "pick another -o")
    return p


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Swap the finished folder ``src`` in as ``dst`` by renames; the previous ``dst`` is removed afterwards.

    While the swap runs the previous folder sits at ``.<dst name>.old`` beside ``dst``, so a crash between the two
    renames leaves a complete folder there.
    """
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
