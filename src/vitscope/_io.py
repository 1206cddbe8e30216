"""Atomic file writes (a reader never sees a partial file, an interrupted write leaves the old one) and the
rules of an output folder: vitscope deletes or overwrites only files it wrote itself.

- Temporary files are ``.<name>.<8 random>.vitscope-tmp[<suffix>]`` (`TEMP_MARK`): a name no user file has,
  and `remove_temp_files` removes only names of exactly that pattern (`is_temp_name`).
- A folder vitscope writes carries a marker, ``.vitscope.json`` (`MARKER`): the command and the sha256 of every
  file it wrote there. `claim_output` refuses a folder holding files vitscope did not write (unless
  ``overwrite``: then vitscope writes beside them), and `OutputFolder.check_writes` refuses, even then, to
  replace any of them. A file of the marker whose content changed since is the user's again.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
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


#: What every temporary file vitscope writes carries: ``.<name>.<8 random>.vitscope-tmp[<suffix>]``.
TEMP_MARK = ".vitscope-tmp"
#: mkstemp's random part is 8 of ``[a-z0-9_]``; the optional suffix keeps writers that look at it working.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_MARK) + r"(\.[A-Za-z0-9_-]+)?")


def is_temp_name(name: str) -> bool:
    """``name`` is one of vitscope's temporary files (exactly the pattern `atomic_path` makes)."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_temp_files(folder: str | os.PathLike[str]) -> int:
    """Delete the temporary files an interrupted run left under ``folder`` (symlinked folders are not entered;
    only names of `is_temp_name`'s pattern are touched). Returns how many."""
    n = 0
    for dirpath, _dirnames, filenames in os.walk(folder, followlinks=False):
        for name in filenames:
            p = Path(dirpath) / name
            if is_temp_name(name) and not p.is_symlink():
                with suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
    return n


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    The temporary name is ``.<name>.<random>.vitscope-tmp<suffix>`` (``suffix``: default ``path``'s own)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=TEMP_MARK + (suffix if suffix is not None else target.suffix),
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


#: Suffixes that name a file type (so ``-o x.png`` is a file); any other suffix (``maps_v1.2``, ``run.d``) is
#: part of a folder's name.
FILE_TYPES = frozenset({
    ".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".svg", ".pdf", ".eps", ".ps", ".html",
    ".htm", ".npz", ".npy", ".json", ".jsonl", ".md", ".txt", ".csv", ".tsv", ".pt", ".pth", ".bin",
    ".safetensors", ".ckpt", ".onnx", ".parquet", ".pkl", ".pickle", ".yaml", ".yml", ".xml", ".zip", ".tar",
    ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".py", ".log", ".h5", ".hdf5"
})


def names_file(p: Path, suffixes: Collection[str] | None) -> bool:
    """``p`` names a file: its suffix is one the command writes (``suffixes``) or a known file type."""
    suffix = p.suffix.lower()
    return bool(suffix) and (suffix in (suffixes or ()) or suffix in FILE_TYPES)


def output_target(out: str | os.PathLike[str], *, suffixes: tuple[str, ...] | None, name: str | None = None,
                  argument: str = "--output") -> Path:
    """The one rule for ``-o``: a path whose suffix is a file type names a file, any other path a folder
    (``maps_v1.2`` is a folder: ``.2`` is no file type).

    ``suffixes``: the file types a command writes (``None``: the command writes a folder). ``name``: the file
    written inside a folder. Returns the file to write (or the folder). The wrong kind (an existing folder
    named as a file, a file named as a folder, an unknown file type, a parent that is a file or not writable) is
    refused with a one-line `VitscopeError`, so nothing is computed for an output that cannot be written.
    """
    from vitscope.errors import VitscopeError

    p = Path(out).expanduser()
    kinds = ", ".join(suffixes) if suffixes else ""
    if suffixes is None or not names_file(p, suffixes):
        if p.exists() and not p.is_dir():
            raise VitscopeError(argument, f"{p} is an existing file, not a folder",
                                f"name a folder (no suffix){f', or a {kinds} file' if kinds else ''}")
        if suffixes is None and names_file(p, suffixes) and not p.is_dir():
            raise VitscopeError(argument, f"{p} names a file ({p.suffix!r} suffix), but this command writes a folder",
                                "drop the suffix, e.g. -o " + str(p.with_suffix("")))
        _check_parents(p.absolute() / "x", argument)
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
    _check_parents(p.absolute(), argument)
    if p.exists() and not os.access(p, os.W_OK):
        raise VitscopeError(argument, f"cannot overwrite {p} (permission denied)", "pick another -o")
    return p


# ------------------------------------------------------------------------------------------ output folders
#: The marker of a folder vitscope wrote: ``{"vitscope": 1, "command": ..., "files": {relative path: sha256}}``.
MARKER = ".vitscope.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_marker(folder: Path) -> dict[str, str] | None:
    """The files (relative path -> sha256) of ``folder``'s marker; ``None`` when there is none or it is not one
    vitscope wrote (then the file is the user's)."""
    path = folder / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("vitscope") == 1 else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return None
    return files


def _folder_entries(folder: Path) -> Iterator[str]:
    """Relative posix paths of every file, symlink and empty folder under ``folder`` (links never followed); a
    folder that cannot be read is one entry (``"private/"``): what it holds is unknown, so it is not vitscope's."""
    unreadable: list[OSError] = []

    def failed() -> Iterator[str]:
        while unreadable:
            where = Path(unreadable.pop().filename or folder)
            yield (where.relative_to(folder).as_posix() + "/") if where != folder else "./"

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=unreadable.append):
        yield from failed()
        base = Path(dirpath)
        links = [d for d in dirnames if (base / d).is_symlink()]
        for name in filenames + links:
            yield (base / name).relative_to(folder).as_posix()
        if not dirnames and not filenames and base != folder:
            yield base.relative_to(folder).as_posix() + "/"
    yield from failed()


@dataclass
class OutputFolder:
    """An output folder vitscope may write, and what in it is vitscope's own: files of its marker whose content
    is unchanged (``marker``), files a command knows by other means (``known``), and its temporary files."""

    path: Path
    command: str
    argument: str = "output"
    marker: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (the marker's)
    known: Collection[str] = ()
    valid_marker: bool = False  # the folder's .vitscope.json is vitscope's (else, if present, it is the user's)

    def is_ours(self, rel: str) -> bool:
        """The entry ``rel`` (relative posix path) is a file vitscope wrote and nobody changed since."""
        if rel == MARKER:
            return self.valid_marker
        if rel in self.known or is_temp_name(rel.rsplit("/", 1)[-1]):
            return True
        p = self.path / rel
        digest = self.marker.get(rel)
        return digest is not None and p.is_file() and not p.is_symlink() and file_sha256(p) == digest

    def foreign(self, under: str = "") -> Iterator[str]:
        """Entries under ``under`` (all of the folder by default) that are not vitscope's, lazily."""
        root = self.path / under if under else self.path
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            if not self.is_ours(under):
                yield under
            return
        prefix = f"{under.rstrip('/')}/" if under else ""
        for rel in _folder_entries(root):
            if not self.is_ours(prefix + rel):
                yield prefix + rel

    def check_writes(self, names: Iterable[str], marker: bool = True) -> None:
        """Refuse (one line) when writing ``names`` (relative paths; a folder covers what is under it) would
        replace or delete a file vitscope did not write (``marker``: the command also writes `MARKER`)."""
        from vitscope.errors import VitscopeError

        for name in [*names, *([MARKER] if marker else [])]:
            name = name.rstrip("/")
            if not os.path.lexists(self.path / name):
                continue
            hit = next(self.foreign(name), None)
            if hit is not None:
                raise VitscopeError(self.argument, f"{self.path / hit} exists and vitscope did not write it, so it "
                                    "will not replace it", "pick a new or empty folder, or move that file away")

    def record(self, names: Iterable[str]) -> None:
        """Add ``names`` (relative paths of files just written) to the marker, with their sha256."""
        files = {rel: digest for rel, digest in self.marker.items() if self.is_ours(rel)}
        for name in names:
            p = self.path / name
            if p.is_file() and not p.is_symlink():
                files[name] = file_sha256(p)
        self.marker, self.valid_marker = files, True
        atomic_write_text(self.path / MARKER, json.dumps({"vitscope": 1, "command": self.command,
                                                           "files": dict(sorted(files.items()))}, indent=1))


def claim_output(folder: str | os.PathLike[str], command: str, *, overwrite: bool = False,
                 known: Collection[str] = (), argument: str = "output") -> OutputFolder:
    """Check the output folder ``folder`` before anything is written into it.

    vitscope's own files are those of the marker whose content is unchanged, its temporary files, and
    ``known`` (files a command knows as its own by other means, e.g. batch's manifest). Anything else is the
    user's: a folder holding such files is refused with one line unless ``overwrite`` (then vitscope writes
    beside them; `OutputFolder.check_writes` still refuses to replace one). The folder is walked only until
    a few of the user's files are found (``-o ~`` is refused at once).
    """
    from vitscope.errors import VitscopeError

    path = Path(folder)
    out = OutputFolder(path, command, argument, known=known)
    if not path.is_dir():
        return out
    marker = _read_marker(path)
    out.marker, out.valid_marker = marker or {}, marker is not None
    if not overwrite:
        found = list(itertools.islice(out.foreign(), 4))
        if found:
            shown = ", ".join(sorted(found)[:3]) + (", ..." if len(found) > 3 else "")
            raise VitscopeError(argument, f"{path} holds files vitscope did not write ({shown})",
                                "pick a new or empty folder, or pass --overwrite to write beside them")
    return out


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
