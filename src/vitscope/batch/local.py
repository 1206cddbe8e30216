"""Batch mode: attention maps for many images, with workers, progress, atomic outputs and a resumable manifest.

`run_batch` reads images with a ``torch.utils.data.DataLoader`` (workers load and preprocess), groups equal-sized
inputs into batches, runs one method per batch and writes, per image, atomically:

- ``<out>/<folder>/<stem>.<method>.npz``: ``map`` (float32 ``(rows, cols)``, lossless), method extras
  (``heads`` for ``cls``, ``rgb`` for ``pca``) and ``meta_json`` (input, method, model, grid, sizes);
- ``<out>/<folder>/<stem>.<method>.png``: the map as an ``inferno`` heatmap at the image's own size (``pca``: its
  colours; in a batch each image's PCA is fitted alone, so its colours do not depend on the images beside it).

``<folder>`` mirrors the input's folder below the input root (``a/cat.jpg`` -> ``a/cat.cls.npz``), so
same-named images in different subfolders never collide. The relative path is the input's path as found below the
root (`relative_name`), never its symlink's target: ``IN/link.jpg -> ../outside/x.jpg`` is read through the link
and written as ``OUT/link.cls.npz``, so no output lands outside ``OUT``; two inputs of one folder with the same stem
(``cat.jpg``, ``cat.png``) keep their suffix (``cat.jpg.cls.npz``, ``cat.png.cls.npz``). After an image's files are in place, one JSON line is
appended to ``<out>/manifest.jsonl`` (flushed and fsynced): input, outputs (bytes, sha256), status, error. A
re-run skips images whose manifest entry is ``ok`` and whose outputs are still complete; an unreadable image is
recorded with ``status: "error"`` and the run goes on. Each ``ok`` line also keeps the image's measures
(``"stats"``: prediction, token norms, mean attention distance, pointing game / IoU with ``masks``), from which
the run ends by writing ``<out>/summary.json`` and ``<out>/distance.png`` over all inputs (`vitscope.batch.stats`,
the same summary as the Ray engine's). Temporary files are ``.<name>.<random>.vitscope-tmp.<ext>``
(`vitscope._io.atomic_path`): an interrupted run (Ctrl-C, SIGKILL) leaves no partial output under a final name, and
its leftovers (only names of exactly that pattern) are removed on restart.

The output folder is vitscope's rule (`vitscope._io.claim_output`): files the manifest does not know (and that are
not the run's own ``manifest.jsonl``, ``batch.json``, ``summary.json``, ``distance.png``) are the user's; a folder
without a batch run (no ``batch.json``) holding any is refused unless ``overwrite``, and no output ever replaces
one (a batch run's folder is resumed beside them). ``overwrite`` starts over:
the previous run's outputs (those the manifest lists, with their recorded sha256) are removed, the user's kept.
``-o`` equal to the input folder is refused; inside it, it is skipped when scanning.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import io
import json
import math
import numbers
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import torch

from vitscope import _interrupt
from vitscope._io import atomic_write_bytes, claim_output, file_sha256, remove_temp_files
from vitscope.adapters.base import Preprocess, SizePolicy, VitModel
from vitscope.batch.stats import (
    DISTANCE_FIGURE,
    SUMMARY,
    ImageMeasures,
    SummaryAccumulator,
    check_masks,
    image_record,
    localisation,
    mask_for,
    mask_image,
    write_summary,
)
from vitscope.errors import VitscopeError
from vitscope.methods.api import get_method
from vitscope.methods.registry import MapContext, Method, check_params
from vitscope.viz.export import colours_png

MANIFEST = "manifest.jsonl"
CONFIG = "batch.json"
FORMATS = ("npz", "png")
LIST_SUFFIXES = (".txt", ".lst", ".list")
_GLOB_CHARS = "*?["

# ------------------------------------------------------------------------------------------------ methods
def method_params(method: Method, layer: int) -> dict[str, Any]:
    """The parameters batch mode gives ``method``: ``layer`` to the methods that take one (checked against
    ``method``'s signature); everything else at its default (gradient methods: each image's predicted class;
    ``pca`` fits each image alone)."""
    params: dict[str, Any] = {"layer": layer} if "layer" in method.params else {}
    if "joint" in method.params:  # pca: each image fitted alone, so its colours do not depend on the batch it fell in
        params["joint"] = False
    return check_params(method, params)


def check_method_layer(method: Method, layer: int, vit: VitModel) -> None:
    """``layer`` refused up front (not once per image) when ``method`` takes one and the model has no such layer."""
    from vitscope.capture.core import resolve_layers

    if "layer" in method.params:
        resolve_layers(layer, vit.info.num_layers, argument="layer")


def compute_batch(vit: VitModel, pixels: torch.Tensor, method: Method, *, layer: int = -1, stats: bool = True,
                  norm_threshold: float | None = None, background: bool | None = None,
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(maps, measures)`` of one batch of pixels ``(B, C, H, W)`` (on the model's device), numpy, batch first:
    ``maps`` holds ``map`` ``(B, rows, cols)`` float32 and the method's extras (``heads`` for ``cls``, ``mask``
    as uint8 for ``dino_mask``); ``measures`` (``stats=True``) the per-image measures of
    `vitscope.batch.stats.ImageMeasures`, else ``{}``.

    One forward pass per batch: the measures observe the forward pass the method runs for its map (its
    `MapContext` capture; a gradient method's prediction pass, which then also gives its target). A model that
    takes at most ``vit.max_batch`` images per forward (Pixtral: 1) gets the batch in chunks of that size.
    ``background``: the measures' distance reductions beside the forward pass, on a thread of their own
    (`ImageMeasures`; default: when a core is spare, `vitscope.batch.stats.spare_core`)."""
    params = method_params(method, layer)
    if method.check is not None:  # a family the method cannot explain: one line, before any forward pass
        method.check(vit)
    B = int(pixels.shape[0])
    step = min(B, vit.max_batch or B)
    maps: list[dict[str, np.ndarray]] = []
    measures: list[dict[str, np.ndarray]] = []
    for s in range(0, B, step):
        chunk = pixels[s : s + step]  # (b, C, H, W)
        observers = [ImageMeasures(vit, chunk, norm_threshold=norm_threshold, background=background)] if stats else []
        ctx = MapContext(vit, chunk, observers=observers)
        if method.needs == "gradients":
            ctx.observe()  # the prediction the default target reads comes from the observed pass
        result = method.compute(ctx, **params)
        ctx.observe()  # a no-op when the method's capture carried the observers
        out = {"map": result.map.detach().float().cpu().numpy()}
        for key, value in result.extras.items():  # cls: "heads" (B, H, rows, cols); dino_mask: "mask"
            out[key] = value.detach().cpu().numpy().astype(np.uint8 if value.dtype == torch.bool else np.float32)
        maps.append(out)
        if observers:
            measures.append(observers[0].result())
    return _concat(maps), _concat(measures)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]} if parts else {}


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class BatchItem:
    """One input image and the relative path its outputs mirror (posix, no ``..``)."""

    path: Path
    rel: str


def _is_hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def relative_name(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """The one naming rule of batch outputs (both engines): ``path``'s posix path below ``root``, taken from the
    paths as given (made absolute and normalised, symlinks never resolved), so a link's target never decides
    where an output is written. Raises `VitscopeError` when ``path`` is not below ``root`` (the result never
    holds ``..``)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")
    parts = PurePosixPath(rel).parts
    if not parts or rel == "." or ".." in parts or PurePosixPath(rel).is_absolute():
        raise VitscopeError("inputs", f"{os.fspath(path)} is not below the input root {os.fspath(root)}",
                            "pass inputs inside one folder")
    return "/".join(parts)


def relative_items(paths: Iterable[Path], root: Path) -> list[BatchItem]:
    """`BatchItem` s of ``paths`` named by `relative_name` below ``root``, sorted, duplicates dropped."""
    items: dict[str, BatchItem] = {}
    for p in paths:
        rel = relative_name(p, root)
        items.setdefault(rel, BatchItem(p, rel))
    return [items[k] for k in sorted(items)]


def output_bases(items: Sequence[BatchItem]) -> dict[str, str]:
    """Relative path -> output base name (``a/cat.jpg`` -> ``a/cat``); stems shared in one folder keep their
    suffix (``a/cat.jpg``), so no two inputs ever share an output."""
    by_stem: dict[str, list[str]] = {}
    for it in items:
        by_stem.setdefault(str(PurePosixPath(it.rel).with_suffix("")), []).append(it.rel)
    out: dict[str, str] = {}
    for base, rels in by_stem.items():
        for r in rels:
            out[r] = base if len(rels) == 1 else r
    taken: set[str] = set()
    for rel in sorted(out):  # a stem equal to another input's full name (cat.jpg vs cat.jpg.png): number it
        name, n = out[rel], 1
        while name in taken:
            n += 1
            name = f"{out[rel]}~{n}"
        out[rel] = name
        taken.add(name)
    return out


def _common_root(paths: Sequence[Path]) -> Path:
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]  # as given: symlinks are not resolved
    return Path(os.path.commonpath(parents)) if parents else Path.cwd()


def collect_inputs(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                   exclude: Path | None = None) -> list[BatchItem]:
    """Resolve a folder (recursive, hidden files skipped), a glob, a list file (one path per line, ``#``
    comments, relative to the list's folder), one image, or a sequence of paths into `BatchItem` s.

    Every regular file found is an input: files that are not images are reported as errors in the manifest,
    not silently dropped. ``exclude`` (the output folder) is never scanned when it lies inside the inputs.
    """
    excl = exclude.resolve() if exclude is not None else None
    if excl is not None and isinstance(inputs, (str, os.PathLike)):
        scanned = Path(os.fspath(inputs)).expanduser().resolve()
        if excl == scanned or excl in scanned.parents:  # -o above the inputs: it holds them, skip nothing
            excl = None

    def keep(p: Path) -> bool:
        return p.is_file() and (excl is None or excl not in p.resolve().parents)

    if not isinstance(inputs, (str, os.PathLike)):
        paths = [Path(p) for p in inputs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise VitscopeError("inputs", f"not a file: {missing[0]}", "check the paths")
        return relative_items(paths, _common_root(paths))
    text = os.fspath(inputs)
    path = Path(text).expanduser()
    if path.is_dir():
        found = [p for p in path.rglob("*") if not _is_hidden(PurePosixPath(p.relative_to(path).as_posix()))]
        return relative_items([p for p in found if keep(p)], path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise VitscopeError("inputs", f"{path} is not UTF-8 text", "save the list as UTF-8, one path a line"
                                ) from None
        listed = [Path(ln).expanduser() for ln in lines if ln and not ln.startswith("#")]
        listed = [p if p.is_absolute() else path.parent / p for p in listed]
        missing = [str(p) for p in listed if not p.is_file()]
        if missing:
            raise VitscopeError("inputs", f"{path} lists {len(missing)} missing file(s), e.g. {missing[0]}",
                                "fix the list")
        return relative_items(listed, _common_root(listed))
    if path.is_file():
        return relative_items([path], path.parent)
    if any(c in text for c in _GLOB_CHARS):
        matches = [Path(m) for m in globlib.glob(os.path.expanduser(text), recursive=True)]
        matches = [m for m in matches if keep(m)]
        if not matches:
            raise VitscopeError("inputs", f"the pattern {text!r} matches no file", "check the pattern (quote it)")
        parts = Path(os.path.expanduser(text)).parts
        static = [p for p in parts[: next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))]]
        return relative_items(matches, Path(*static) if static else Path.cwd())
    raise VitscopeError("inputs", f"{text!r} is not a folder, file, list file or matching pattern",
                        "pass a folder, a glob like 'imgs/**/*.jpg', a .txt list of paths, or image files")


# ------------------------------------------------------------------------------------------------ loading
class _ImageDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Loads and preprocesses one image per index; errors are returned, not raised (one bad file never stops
    the run)."""

    def __init__(self, items: Sequence[BatchItem], prep: Preprocess, patch: tuple[int, int],
                 policy: SizePolicy | None, size: int | tuple[int, int] | None, masks: Path | None = None) -> None:
        self.items, self.prep, self.patch, self.policy, self.size = list(items), prep, patch, policy, size
        self.masks = masks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            pixels, original = preprocess_image(item.path, self.prep, self.patch, self.policy, self.size)
            where = mask_for(self.masks, item.rel) if self.masks is not None else None
            hw = (int(pixels.shape[-2]), int(pixels.shape[-1]))
            mask = mask_image(Path(where).read_bytes(), hw, name=where) if where else None  # (H, W) bool
            return {"index": i, "pixels": pixels, "original_size": original, "mask": mask, "error": None}
        except Exception as exc:  # any unreadable file becomes a manifest entry, never a Ctrl-C's side effect
            _interrupt.check()
            return {"index": i, "pixels": None, "original_size": None, "mask": None, "error": error_line(exc)}


# Shared with the Ray engine (vitscope.batch.ray_engine): one image's preprocessing, the one-line error of a bad
# image, and the metadata written beside each map.
def preprocess_image(image: Any, prep: Preprocess, patch: tuple[int, int], policy: SizePolicy | None,
                     size: int | tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load one image (path, PIL image or array) the way batch mode does: pixels ``(C, H, W)`` and the
    original ``(height, width)``. Raises on an unreadable image."""
    from vitscope.images import image_to_pixels, load_image

    img = load_image(image, "image")
    return image_to_pixels(img, prep, patch, policy, size), (img.height, img.width)


def error_line(exc: BaseException) -> str:
    """``"ErrorType: message"`` on one line: how batch mode records a bad image."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {msg}"


def image_meta(*, input: str, rel: str, method: str, model: str, grid: Sequence[int], image_size: Sequence[int],
               original_size: Sequence[int], info: Any, layer: int | None) -> dict[str, Any]:
    """The ``meta_json`` batch mode stores with each map (``info``: the model's `VitInfo`)."""
    return {"input": input, "rel": rel, "method": method, "model": model, "grid": list(grid),
            "image_size": list(image_size), "original_size": list(original_size), "prefix": list(info.prefix),
            "patch_size": list(info.patch_size), "layer": layer}


def _identity(x: Any) -> Any:
    return x


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ outputs
def _npz_bytes(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    payload: dict[str, Any] = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    np.savez_compressed(buf, **payload, meta_json=np.array(json.dumps(meta)))
    return buf.getvalue()


def heatmap_png(heat: np.ndarray, size: tuple[int, int]) -> bytes:
    """A ``(rows, cols)`` map as an ``inferno`` PNG of ``size`` ``(height, width)`` (bilinear, min-max scaled).

    Stored as a palette image (one byte per pixel, the colormap as palette): lossless for the 8-bit heatmap,
    a third of the RGB size and several times faster to encode.
    """
    from PIL import Image

    h, w = size
    up = np.asarray(Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR))  # (H, W)
    lo, hi = float(up.min()), float(up.max())
    scaled = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    index = np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)  # (H, W) palette indices
    img = Image.frombytes("P", (w, h), index.tobytes())
    from vitscope.viz._render import colormap_table

    img.putpalette(colormap_table("inferno").tobytes())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _png_size(original: Sequence[int]) -> tuple[int, int]:
    """The image's own ``(height, width)``, scaled down to fit `vitscope.limits.max_figure_pixels`."""
    from vitscope import limits

    h, w = int(original[0]), int(original[1])
    cap = limits.max_figure_pixels()
    if h * w > cap:
        scale = (cap / (h * w)) ** 0.5
        h, w = max(1, int(h * scale)), max(1, int(w * scale))
    return h, w


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ manifest
STATUSES = ("ok", "error")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_stats(stats: Any, shape: tuple[int, int] | None) -> str | None:
    """What is wrong with a manifest line's ``"stats"`` (`vitscope.batch.stats.image_record`), or ``None``;
    ``shape``: the model's ``(layers, heads)``, which the list lengths must match."""
    if not isinstance(stats, dict):
        return '"stats" must be an object'
    lengths = {"distance": shape[0] * shape[1], "norm_mean": shape[0], "norm_high": shape[0]} if shape else {}
    for key, types in (("distance", {int, float}), ("norm_mean", {int, float}), ("norm_high", {int})):
        value = stats.get(key)
        if value is None:
            continue
        # set/map of builtins: a 100,000-line manifest is checked in about a second
        if not isinstance(value, list) or not set(map(type, value)) <= types or \
                (float in types and not all(map(math.isfinite, value))):
            return f'"stats"."{key}" must be a list of {"whole " if float not in types else "finite "}numbers'
        if key in lengths and len(value) != lengths[key]:
            return f'"stats"."{key}" has {len(value)} values, the model needs {lengths[key]}'
    if stats.get("norm_high") is not None and (stats.get("norm_mean") is None or
                                               len(stats["norm_mean"]) != len(stats["norm_high"])):
        return '"stats"."norm_mean" must have as many values as "norm_high"'
    checks: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
        ("patch_tokens", lambda v: _is_int(v) and v > 0, "a whole number > 0"),
        ("prediction", lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
        ("label", lambda v: isinstance(v, str), "a string"),
        ("score", _is_number, "a number"),
        ("pointing", lambda v: isinstance(v, bool), "true or false"),
        ("iou", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    )
    for key, ok, what in checks:
        if stats.get(key) is not None and not ok(stats[key]):
            return f'"stats"."{key}" must be {what} or null'
    if stats.get("norm_high") is not None and stats.get("patch_tokens") is None:
        return '"stats"."patch_tokens" is missing'
    if stats.get("pointing") is not None and stats.get("iou") is None:
        return '"stats"."iou" is missing'
    return None


def check_entry(entry: dict[str, Any], shape: tuple[int, int] | None = None) -> str | None:
    """What is wrong with one ``manifest.jsonl`` entry (types, status, output records, stats), or ``None``."""
    rel = entry.get("rel")
    if not isinstance(rel, str) or not rel:
        return '"rel" must be a non-empty string'
    if entry.get("status") not in STATUSES:
        return f'"status" must be "ok" or "error", not {json.dumps(entry.get("status"))[:40]}'
    if entry.get("error") is not None and not isinstance(entry["error"], str):
        return '"error" must be a string or null'
    outputs = entry.get("outputs")
    if not isinstance(outputs, dict):
        return '"outputs" must be an object'
    for fmt, rec in outputs.items():
        if not isinstance(rec, dict):
            return f'"outputs"."{fmt}" must be an object'
        path = rec.get("path")
        if not isinstance(path, str) or not path or PurePosixPath(path).is_absolute() or \
                ".." in PurePosixPath(path).parts or "\\" in path:
            return f'"outputs"."{fmt}"."path" must be a relative path inside the output folder'
        if not _is_int(rec.get("bytes")) or rec["bytes"] < 0:
            return f'"outputs"."{fmt}"."bytes" must be a whole number >= 0'
        if not isinstance(rec.get("sha256"), str):
            return f'"outputs"."{fmt}"."sha256" must be a string'
    if "stats" in entry and entry["stats"] is not None:
        return _check_stats(entry["stats"], shape)
    return None


class Manifest:
    """Append-only JSON-lines record of finished images; each line is fsynced once its outputs are in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: last entry per relative path, without its ``"stats"`` (read back from the file by `iter_final`, so
        #: a run over millions of images keeps only the small part of each line in memory)
        self.entries: dict[str, dict[str, Any]] = {}
        self._final: dict[str, int] = {}  # relative path -> line number of its last entry
        self._lines = 0
        self._fh: IO[str] | None = None

    def _keep(self, lineno: int, entry: dict[str, Any]) -> None:
        self.entries[entry["rel"]] = {k: v for k, v in entry.items() if k != "stats"}
        self._final[entry["rel"]] = lineno

    def load(self, shape: tuple[int, int] | None = None) -> None:
        """Read the entries back, each line checked (`check_entry`; ``shape``: the model's ``(layers, heads)``,
        the lengths of each line's ``"stats"``): a hand-edited or corrupt line is a one-line `VitscopeError`
        naming the file, the line and the fix, never silently trusted. A last line cut short by a kill is
        dropped."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":  # a line cut short by a kill: drop it so the next append is clean
                    fh.seek(0)
                    end = 0
                    for raw in fh:
                        if raw.endswith(b"\n"):
                            end += len(raw)
                    with open(self.path, "r+b") as out:
                        out.truncate(end)
                        os.fsync(out.fileno())
        self._lines = 0
        for lineno, entry in self._read(check=True, shape=shape):
            self._lines = lineno + 1
            if entry is not None:
                self._keep(lineno, entry)

    def _read(self, check: bool = False, shape: tuple[int, int] | None = None,
              ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """``(line number, entry or None)`` of every line, streamed from the file (``None``: a blank line);
        ``check``: each line must be a valid entry (`check_entry`), else a `VitscopeError`."""
        with open(self.path, encoding="utf-8", errors="replace", newline="\n") as fh:
            for lineno, line in enumerate(fh):
                if not line.strip() or (check and not line.endswith("\n")):  # blank, or cut short by a kill
                    yield lineno, None
                    continue
                entry: Any = None
                problem: str | None = "not a JSON object"
                with suppress(json.JSONDecodeError, RecursionError):
                    entry = json.loads(line)
                if isinstance(entry, dict):
                    problem = check_entry(entry, shape) if check else None
                if check and problem is not None:
                    raise VitscopeError("output", f"{self.path} line {lineno + 1}: {problem}",
                                        "fix or delete that line, or pass --overwrite")
                yield lineno, entry if isinstance(entry, dict) and isinstance(entry.get("rel"), str) else None

    def iter_final(self, rels: Iterable[str]) -> Iterator[dict[str, Any]]:
        """The last entry of each of ``rels`` (those that have one), ``"stats"`` included, in file order."""
        if self._fh is not None:
            self._fh.flush()
        want = {self._final[r]: r for r in rels if r in self._final}
        if not want or not self.path.exists():
            return
        for lineno, entry in self._read():
            if entry is not None and want.get(lineno) == entry["rel"]:
                yield entry

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held for the whole run)

    def append(self, *entries: dict[str, Any]) -> None:
        """Append entries (their outputs already in place), then flush and fsync once."""
        assert self._fh is not None
        self._fh.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for e in entries:
            self._keep(self._lines, e)
            self._lines += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def is_complete(self, rel: str, out_dir: Path, formats: Sequence[str], verify: bool) -> bool:
        """``rel`` finished ``ok`` with every format, and each output still has its recorded size (and hash)."""
        entry = self.entries.get(rel)
        if entry is None or entry.get("status") != "ok":
            return False
        outputs = entry.get("outputs", {})
        for fmt in formats:
            rec = outputs.get(fmt)
            if rec is None:
                return False
            p = out_dir / rec["path"]
            if not p.is_file() or p.stat().st_size != rec["bytes"]:
                return False
            if verify and file_sha256(p) != rec["sha256"]:
                return False
        return True


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on ``<out>/.lock`` so two runs never write the same folder (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(out_dir / ".lock", "a") as fh:
        try:
            # a POSIX record lock belongs to this process: forked loader workers do not inherit it, so a
            # SIGKILLed run frees the folder at once even while its orphaned workers wind down
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise VitscopeError("output", f"another vitscope batch run is writing to {out_dir}",
                                "wait for it to finish or use another output folder") from None
        yield


def _remove_partials(out_dir: Path) -> int:
    """Delete the temporary files an interrupted run left (`vitscope._io.remove_temp_files`)."""
    return remove_temp_files(out_dir)


def _remove_previous(out_dir: Path, previous: dict[str, str]) -> None:
    """Start over: delete the previous run's outputs that still hold what it wrote (their recorded sha256)."""
    for rel, digest in previous.items():
        p = out_dir / rel
        below = not PurePosixPath(rel).is_absolute() and ".." not in PurePosixPath(rel).parts  # a hand-edited line
        if below and p.is_file() and not p.is_symlink() and file_sha256(p) == digest:
            p.unlink()


#: Files a local batch run writes beside its outputs (``.lock``: empty, for `_exclusive`).
RUN_FILES = (MANIFEST, CONFIG, SUMMARY, DISTANCE_FIGURE, ".lock")


def _previous_outputs(out_dir: Path) -> dict[str, str] | None:
    """Output path -> recorded sha256 of every output the manifest of a batch run in ``out_dir`` lists (read
    only); ``None`` when ``out_dir`` holds no batch run (no ``batch.json`` object)."""
    try:
        cfg = json.loads((out_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict) or (out_dir / CONFIG).is_symlink():
        return None
    outputs: dict[str, str] = {}
    manifest = Manifest(out_dir / MANIFEST)
    if manifest.path.is_file() and not manifest.path.is_symlink():
        for _lineno, entry in manifest._read():
            recs = entry.get("outputs") if entry is not None else None
            for rec in recs.values() if isinstance(recs, dict) else ():
                if isinstance(rec, dict) and isinstance(rec.get("path"), str):
                    outputs[rec["path"]] = str(rec.get("sha256"))
    return outputs


def check_state(out_dir: Path) -> None:
    """A batch run's folder to resume: its ``batch.json`` and ``manifest.jsonl`` lines must be vitscope's (`check_entry`,
    `read_config`), checked before anything reads them (the ownership check, the resume): a hand-edited or corrupt
    one is a one-line `VitscopeError` naming the file (and line) and the fix. The lengths of the measures are
    checked once the model is known (`Manifest.load`). A folder without both files holds no batch run: a lone
    ``batch.json`` or ``manifest.jsonl`` is the user's (`_claim_output_dir` says so)."""
    cfg_path, manifest = out_dir / CONFIG, Manifest(out_dir / MANIFEST)
    if not all(p.is_file() and not p.is_symlink() for p in (cfg_path, manifest.path)):
        return
    read_config(cfg_path)
    for _lineno, _entry in manifest._read(check=True):
        pass


def _claim_output_dir(out_dir: Path, writes: Iterable[str], overwrite: bool) -> dict[str, str]:
    """Refuse ``out_dir`` if it holds files vitscope did not write (unless ``overwrite``) or if an output would
    replace one; returns the previous run's outputs (path -> sha256)."""
    previous = _previous_outputs(out_dir)
    known = set(previous or ())
    if previous is not None:
        known.update(RUN_FILES)
    elif (out_dir / ".lock").is_file() and (out_dir / ".lock").stat().st_size == 0:
        known.add(".lock")  # a first run stopped before it wrote batch.json
    # a batch run's folder (its manifest says what is vitscope's) is resumed beside the user's files
    folder = claim_output(out_dir, "batch", overwrite=overwrite or previous is not None, known=known)
    folder.check_writes([*writes, *RUN_FILES], marker=False)
    return previous or {}


# ------------------------------------------------------------------------------------------------ run
@dataclass
class BatchSummary:
    """What a `run_batch` call did."""

    output_dir: Path
    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)
    #: the dataset summary written to ``summary.json`` (`vitscope.batch.stats.SummaryAccumulator.summary`)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.output_dir / MANIFEST

    @property
    def images_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        text = (f"{self.done} done, {self.skipped} skipped (already done), {self.failed} failed of {self.total} "
                f"in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s); manifest {self.manifest}")
        return text + (f", summary {self.output_dir / SUMMARY}" if self.summary else "")


def _model_id(model: Any, vit: VitModel) -> str:
    """How the manifest's config names the model: a resolved path, a spec string, or the model's name."""
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        path = Path(text).expanduser()
        return str(path.resolve()) if path.exists() else text
    return vit.info.name


def run_config(engine: str, *, method: str, model: str, policy: SizePolicy | None, size: int | tuple[int, int] | None,
               layer: int, stats: bool, norm_threshold: float | None, masks: Path | None) -> dict[str, Any]:
    """The settings a run records in ``batch.json`` (and its summary); a resumed run must have the same."""
    return {"engine": engine, "method": method, "model": model, "policy": policy,
            "size": list(size) if isinstance(size, tuple) else size, "layer": layer if method == "cls" else None,
            "stats": bool(stats), "norm_threshold": norm_threshold,
            "masks": str(masks.resolve()) if masks is not None else None}


def read_config(cfg_path: Path) -> dict[str, Any]:
    """The settings in a run's ``batch.json``, or a one-line `VitscopeError` naming the file (garbage, not
    UTF-8, not a JSON object, or settings of the wrong type)."""
    fix = "delete it to resume with this run's settings, or pass --overwrite"
    try:
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise VitscopeError("output", f"{cfg_path} is not valid JSON", fix) from None
    if not isinstance(old, dict):
        raise VitscopeError("output", f"{cfg_path} must hold a JSON object, not {type(old).__name__}", fix)
    for key, types in (("engine", str), ("method", str), ("model", str)):
        if key in old and not isinstance(old[key], types):
            raise VitscopeError("output", f'{cfg_path}: "{key}" must be a string', fix)
    return old


def check_same_run(cfg_path: Path, config: dict[str, Any], out_dir: Path) -> None:
    """A resumed run must have the settings of the run that wrote ``out_dir`` (its ``batch.json``)."""
    old = read_config(cfg_path)
    if old != config:
        diff = ", ".join(f"{k}={old.get(k)!r}" for k in config if old.get(k) != config[k])
        raise VitscopeError("output", f"{out_dir} holds results of another run ({diff})",
                            "use another output folder, or --overwrite")


#: Numeric options of both engines: (kind, lower bound, example). ``int``: a whole number >= the bound;
#: ``pos``: a finite number > 0; ``nonneg``: a finite number >= 0. One table, so both engines check alike.
_RANGES: dict[str, tuple[str, int, str]] = {
    "batch_size": ("int", 1, "8"), "workers": ("int", 0, "2"), "concurrency": ("int", 1, "2"),
    "part_size": ("int", 1, "64"), "max_retries": ("int", 0, "3"), "preprocess_tasks": ("int", 1, "4"),
    "num_cpus": ("pos", 0, "1"), "num_gpus": ("nonneg", 0, "1"), "norm_threshold": ("pos", 0, "5.0"),
}


def check_options(**values: Any) -> None:
    """Refuse an out-of-range numeric option of either engine (``None``: not given) with a one-line
    `VitscopeError` naming it: whole numbers where counts are meant, finite and positive where it must be."""
    for name, value in values.items():
        if value is None:
            continue
        kind, low, example = _RANGES[name]
        whole = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))  # numpy ints too
        if kind == "int":
            if not whole or value < low:
                raise VitscopeError(name, f"must be a whole number >= {low}, got {value!r}", f"pass e.g. {example}")
        elif not (whole or (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and
                            math.isfinite(value))) or value < 0 or (kind == "pos" and value == 0):
            what = "> 0" if kind == "pos" else ">= 0"
            raise VitscopeError(name, f"must be a finite number {what}, got {value!r}", f"pass e.g. {example}")


def _parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats)]
    items = [f for f in items if f]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise VitscopeError("formats", f"unknown format {bad[0]!r}" if bad else "no format given",
                            "use npz, png or npz,png")
    return tuple(dict.fromkeys(items))


def run_local(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    method: str = "cls",
    model: Any = "vitscope:shapes",
    batch_size: int = 8,
    workers: int = 2,
    formats: str | Sequence[str] = ("npz", "png"),
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    layer: int = -1,
    device: str | torch.device | None = "auto",
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    masks: str | os.PathLike[str] | None = None,
    stats: bool = True,
    norm_threshold: float | None = None,
    summary: bool = True,
) -> BatchSummary:
    """Compute ``method``'s map for every image in ``inputs`` and write one file per image and format.

    Args:
        inputs: a folder (recursive), a glob (``"imgs/**/*.jpg"``), a ``.txt`` list of paths, an image file,
            or a sequence of paths.
        output_dir: where outputs mirror the inputs' relative paths, beside ``manifest.jsonl``.
        method: ``"cls"`` (last layer's [CLS] attention, `cls_map`; ``heads`` kept in the npz),
            ``"rollout"``, ``"chefer"``, ``"grad_rollout"``, ``"legrad"`` (gradient maps of each image's predicted
            class): any name of the method registry (`vitscope.methods.api.method_names`; add one with
            `vitscope.methods.registry.register`).
        model: a spec (``"hf:..."``, ``"timm:..."``, a folder) or a `VitModel`.
        batch_size: images per forward pass; only inputs that preprocess to the same size share a batch.
        workers: DataLoader worker processes that load and preprocess (0: in this process).
        formats: ``"npz"``, ``"png"`` or both.
        policy, size: preprocessing, as in `vitscope.capture` (``policy="native"`` keeps each image's aspect).
        layer: the layer of ``method="cls"``.
        device: ``"auto"`` (CUDA, MPS, then CPU), a device, or ``None`` for where the model already is.
        verify: on resume, also check the sha256 of existing outputs (default: their size).
        overwrite: start over: the previous run's outputs (those its manifest lists, unchanged) are removed and
            the manifest truncated; also write into a folder holding files vitscope did not write (they are
            kept; none may be at an output's path). Without it such a folder is refused.
        progress: show a tqdm bar with images/s.
        masks: a folder of object masks mirroring the inputs' relative paths (``a/cat.jpg`` -> ``a/cat.jpg`` or
            ``a/cat.png``; non-zero = object, in the image's frame): pointing game and mask IoU of each map.
        stats: also each image's prediction, patch-token norms and mean attention distance
            (`vitscope.batch.stats.ImageMeasures`, read from the map's own forward pass: `compute_batch`), kept
            in its manifest line (``"stats"``); they feed the summary.
        norm_threshold: fixed cut for high-norm tokens (default: per image and layer, ``q75 + 3 IQR``).
        summary: write ``summary.json`` and ``distance.png`` over every image of ``inputs`` at the end
            (resumed runs included), the same summary as the Ray engine's.

    With a video model (``info.frames``), ``inputs`` is a folder of video files and/or frame folders
    (`collect_videos`): each video's frames are sampled as `vitscope.video.load_clip` does (the family's rate), and
    per video the ``.npz`` holds ``map`` ``(T', rows, cols)``, ``profile`` ``(T',)`` and the method's extras per frame
    (equal to `vitscope.video_maps` of that video) and the ``.png`` is a strip of the token frames' maps
    (`video_strip_png`); no per-image measures or masks. Same manifest, resume and output-folder rules.

    Returns:
        a `BatchSummary`. Bad images never raise: they are counted in ``failed`` and logged in the manifest.
    """
    from tqdm.auto import tqdm

    from vitscope.adapters import as_vit
    from vitscope.capture.prepare import resolve_device

    fmts = _parse_formats(formats)
    spec = get_method(method)
    check_options(batch_size=batch_size, workers=workers, norm_threshold=norm_threshold)
    out_dir = Path(output_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise VitscopeError("output", f"{out_dir} is a file, not a folder", "name a folder for the outputs")
    in_dir = Path(inputs).expanduser() if isinstance(inputs, (str, os.PathLike)) else None
    if in_dir is not None and in_dir.is_dir() and out_dir.is_dir() and os.path.samefile(in_dir, out_dir):
        raise VitscopeError("output", f"{out_dir} is the input folder: the maps would be mixed with the images",
                            "pick an output folder outside the inputs, e.g. -o maps")
    folders_given = not isinstance(inputs, (str, os.PathLike)) and any(Path(p).is_dir() for p in inputs)
    # a list naming frame folders (videos): collected as such; an image model records each folder as an error
    items = collect_videos(inputs, exclude=out_dir) if folders_given else collect_inputs(inputs, exclude=out_dir)
    if not items:
        raise VitscopeError("inputs", f"no files found in {os.fspath(inputs)!r}"  # type: ignore[arg-type]
                            if isinstance(inputs, (str, os.PathLike)) else "no inputs", "check the path")
    bases = output_bases(items)
    if not overwrite:
        check_state(out_dir)
    previous = _claim_output_dir(out_dir, (f"{bases[it.rel]}.{method}.{fmt}" for it in items for fmt in fmts),
                                 overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    vit: VitModel = as_vit(model)
    video = bool(vit.info.frames)  # a video model: inputs are video files and frame folders (`collect_videos`)
    if video:
        if masks is not None:
            raise VitscopeError("masks", "object masks are per image: a batch of videos takes none", "drop them")
        items = collect_videos(inputs, exclude=out_dir)
        bases = output_bases(items)
        previous = _claim_output_dir(out_dir, (f"{bases[it.rel]}.{method}.{fmt}" for it in items for fmt in fmts),
                                     overwrite)
        stats = False  # the per-image measures read images
    mask_dir = check_masks(masks, policy, vit)
    check_method_layer(spec, layer, vit)
    dev = resolve_device(device, vit.device)
    if dev != vit.device:
        vit.module.to(dev)
    config = run_config("local", method=method, model=_model_id(model, vit), policy=policy, size=size, layer=layer,
                        stats=stats, norm_threshold=norm_threshold, masks=mask_dir)
    if video:
        from vitscope.video import family_sample_rate

        config["video"] = {"frames": vit.info.frames, "sample_rate": family_sample_rate(vit.module)}
    result = BatchSummary(output_dir=out_dir, total=len(items))
    with _exclusive(out_dir):
        _remove_partials(out_dir)
        manifest = Manifest(out_dir / MANIFEST)
        cfg_path = out_dir / CONFIG
        if overwrite:
            _remove_previous(out_dir, previous)
            if manifest.path.exists():
                atomic_write_bytes(manifest.path, b"")
        else:
            manifest.load(shape=(vit.info.num_layers, vit.info.num_heads))
            if cfg_path.exists() and manifest.entries:
                check_same_run(cfg_path, config, out_dir)
        from vitscope._io import atomic_write_text

        atomic_write_text(cfg_path, json.dumps(config, indent=2))
        todo = [it for it in items if not manifest.is_complete(it.rel, out_dir, fmts, verify)]
        result.skipped = len(items) - len(todo)
        start = time.perf_counter()
        manifest.open()
        bar = tqdm(total=len(todo), unit="img", desc=f"vitscope batch {method}", disable=not progress,
                   dynamic_ncols=True)
        process = _process_videos if video else _process
        try:
            process(vit, todo, out_dir, manifest, result, bar, method=method, fmts=fmts, config=config,
                     bases=bases,
                     batch_size=int(batch_size), workers=int(workers), policy=policy, size=size, layer=layer,
                     dev=dev, masks=mask_dir, stats=stats, norm_threshold=norm_threshold)
            if summary:
                result.summary = summarize_manifest(manifest, items, num_heads=vit.info.num_heads, config=config)
                write_summary(out_dir, result.summary)
        finally:
            bar.close()
            manifest.close()
            result.seconds = time.perf_counter() - start
    return result


def summarize_manifest(manifest: Manifest, items: Sequence[BatchItem], *, num_heads: int,
                       config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dataset summary over ``items`` from their last manifest lines (status and ``"stats"``), streamed from
    the manifest file in its order."""
    acc = SummaryAccumulator()
    for entry in manifest.iter_final(it.rel for it in items):
        acc.add(entry.get("status", "error"), entry.get("stats"))
    return acc.summary(num_heads=num_heads, config=config)


def _process(vit: VitModel, todo: list[BatchItem], out_dir: Path, manifest: Manifest, summary: BatchSummary,
             bar: Any, *, method: str, fmts: tuple[str, ...], config: dict[str, Any], bases: dict[str, str],
             batch_size: int, workers: int,
             policy: SizePolicy | None, size: int | tuple[int, int] | None, layer: int, dev: torch.device,
             masks: Path | None, stats: bool, norm_threshold: float | None) -> None:
    if not todo:
        return
    info = vit.info
    labels = list(info.labels) if info.labels else None
    dataset = _ImageDataset(todo, info.preprocess, info.patch_size, policy, size, masks)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
        worker_init_fn=_worker_init if workers else None, pin_memory=dev.type == "cuda",
        # a batch's worth of images in flight per worker, bounded: torch loops prefetch_factor x workers times
        prefetch_factor=max(2, min(batch_size, len(todo), 256)) if workers else None,
    )
    spec = get_method(method)
    pipe = _Pipeline(todo, manifest, summary, bar, method)
    figure_pending = stats  # the summary's distance figure: its imports wait for the first batch's writes

    def write_batch(samples: list[dict[str, Any]], result: dict[str, np.ndarray], hw: tuple[int, int],
                    extra: dict[str, np.ndarray]) -> None:
        nonlocal figure_pending
        entries = []
        for b, sample in enumerate(samples):
            item = todo[sample["index"]]
            arrays = {k: v[b] for k, v in result.items()}
            record: dict[str, Any] = image_record(extra, b, labels) if extra else {}
            if sample.get("mask") is not None:
                record.update(localisation(arrays["map"], sample["mask"]))
            meta = image_meta(input=str(item.path), rel=item.rel, method=method, model=config["model"],
                              grid=arrays["map"].shape[-2:], image_size=hw, original_size=sample["original_size"],
                              info=info, layer=config["layer"])
            outputs: dict[str, dict[str, Any]] = {}
            for fmt in fmts:
                if fmt == "npz":
                    data = _npz_bytes(arrays, meta)
                elif "rgb" in arrays:  # pca: its colours, not a heatmap
                    data = colours_png(arrays["rgb"], _png_size(sample["original_size"]))
                else:
                    data = heatmap_png(arrays["map"], _png_size(sample["original_size"]))
                rel_out = f"{bases[item.rel]}.{method}.{fmt}"
                atomic_write_bytes(out_dir / rel_out, data)
                outputs[fmt] = {"path": rel_out, "bytes": len(data), "sha256": _sha256(data)}
            entries.append({"rel": item.rel, "input": str(item.path), "status": "ok", "error": None,
                            "outputs": outputs, "method": method, "finished": time.time(),
                            **({"stats": record} if record else {})})
        pipe.finish(entries)
        if figure_pending:
            figure_pending = False
            _import_figures()

    def run(samples: list[dict[str, Any]]) -> None:
        pixels = torch.stack([s["pixels"] for s in samples]).to(dev, vit.dtype, non_blocking=True)  # (B, C, H, W)
        try:
            result, extra = compute_batch(vit, pixels, spec, layer=layer, stats=stats, norm_threshold=norm_threshold)
        except Exception as exc:  # e.g. a size the model refuses: every image of the batch is an error
            pipe.fail(samples, exc)
            return
        pipe.submit(write_batch, samples, result, (int(pixels.shape[-2]), int(pixels.shape[-1])), extra)

    pipe.drive(loader, batch_size, run)


class _Pipeline:
    """The loop `_process` and `_process_videos` share: samples grouped into batches of equal shapes, each batch
    computed on the calling thread, and every write (outputs, manifest, counters) on one writer thread, in
    submission order, so encoding, fsync and renames overlap with the next batch's forward pass (at most two
    jobs in flight). Ctrl-C is only recorded while the loop runs (`_interrupt.deferred`) and raised at its safe
    points (`submit`, each sample): a KeyboardInterrupt never lands inside a lock the writer thread (logging, tqdm,
    an import) then waits on forever, and an error a Ctrl-C caused is never recorded as the input's."""

    def __init__(self, todo: list[BatchItem], manifest: Manifest, summary: BatchSummary, bar: Any,
                 method: str) -> None:
        self.todo, self.manifest, self.summary, self.bar, self.method = todo, manifest, summary, bar, method
        self.pending: deque[Future[None]] = deque()
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitscope-batch-writer")

    def write_errors(self, failures: list[tuple[BatchItem, str]]) -> None:
        """(writer thread) One error line per input."""
        self.manifest.append(*({"rel": it.rel, "input": str(it.path), "status": "error", "error": err,
                                "outputs": {}, "method": self.method, "finished": time.time()}
                               for it, err in failures))
        self.summary.failed += len(failures)
        self.summary.errors.extend((it.rel, err) for it, err in failures)
        self.bar.update(len(failures))

    def finish(self, entries: list[dict[str, Any]]) -> None:
        """(writer thread) A batch's manifest lines, only after every file of the batch is in place."""
        self.manifest.append(*entries)
        self.summary.done += len(entries)
        self.bar.update(len(entries))

    def submit(self, job: Callable[..., None], *job_args: Any) -> None:
        while len(self.pending) >= 2:
            self.pending.popleft().result()  # re-raises a failed write (e.g. disk full) here
        _interrupt.check()  # a safe point: no lock held, the jobs in flight match their files
        self.pending.append(self.writer.submit(job, *job_args))

    def fail(self, samples: list[dict[str, Any]], exc: Exception) -> None:
        """Every input of a batch whose computation raised is an error line ..."""
        _interrupt.check()  # ... unless a Ctrl-C caused it (a half-done import, a dead worker)
        self.submit(self.write_errors, [(self.todo[s["index"]], error_line(exc)) for s in samples])

    def drive(self, loader: Iterable[dict[str, Any]], batch_size: int,
              run: Callable[[list[dict[str, Any]]], None]) -> None:
        """Feed ``loader``'s samples to ``run`` in batches of up to ``batch_size`` of one shape; then wait for
        the writes (also on Ctrl-C: the job in flight finishes, so its manifest lines match its files)."""
        buckets: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        _warm_imports()
        with _interrupt.deferred():
            try:
                for sample in loader:
                    _interrupt.check()
                    if sample["error"] is not None:
                        self.submit(self.write_errors, [(self.todo[sample["index"]], sample["error"])])
                        continue
                    key = tuple(sample["pixels"].shape)
                    bucket = buckets.setdefault(key, [])
                    bucket.append(sample)
                    if len(bucket) >= batch_size:
                        run(buckets.pop(key))
                for key in list(buckets):
                    run(buckets.pop(key))
                while self.pending:
                    self.pending.popleft().result()
            finally:
                self.writer.shutdown(wait=True, cancel_futures=True)


def _import_figures() -> None:
    """(writer thread, after the first batch's writes) Import what the run's summary figure draws with
    (matplotlib: most of a second of CPU), so that it overlaps with the next batches' forward passes instead of
    following the last one; the compute path's own lazy imports are done by then. A failure here is left to
    the figure itself (`write_summary`), which reports it where it happens."""
    with suppress(Exception):
        import matplotlib.pyplot  # noqa: F401

        import vitscope.viz  # noqa: F401


def _warm_imports() -> None:
    """Import what the per-image path imports lazily (image decoding, PNG writing), before the loop."""
    from PIL import Image

    import vitscope.images  # load_image, image_to_pixels
    import vitscope.viz._render  # noqa: F401  (colormap_table)

    Image.init()  # every format plugin, not one per first image of its kind


# ------------------------------------------------------------------------------------------------ videos
# Batch mode over videos (a video model: ``info.frames``): the same run (`run_local`: output folder claimed, one
# manifest, resume, Ctrl-C, atomic files), with its own inputs, loading, maps and outputs below. Per video:
# ``<base>.<method>.npz`` (``map`` ``(T', rows, cols)``, ``profile`` ``(T',)``, the method's extras split per frame,
# ``meta_json``) and ``<base>.<method>.png``, a strip of the token frames' maps side by side on one colour scale.
def collect_videos(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                   exclude: Path | None = None) -> list[BatchItem]:
    """The videos of ``inputs``: a folder is scanned recursively (hidden names and ``exclude`` skipped) and each
    video file (`vitscope.video.VIDEO_SUFFIXES`) and each folder holding frame images (`FRAME_SUFFIXES`, read in
    name order as one clip) below it is one input; any other file is an input too, recorded as an error (never
    silently dropped). A sequence of paths, a single video file, a list file or a glob: each path is one input (a
    folder among them: a frames folder)."""
    from vitscope.video import FRAME_SUFFIXES

    if not isinstance(inputs, (str, os.PathLike)):
        paths = [Path(p) for p in inputs]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise VitscopeError("inputs", f"not found: {missing[0]}", "check the paths")
        return relative_items(paths, _common_root(paths))
    root = Path(os.fspath(inputs)).expanduser()
    if not root.is_dir():
        return collect_inputs(inputs, exclude)
    excl = exclude.resolve() if exclude is not None else None
    if excl is not None and (excl == root.resolve() or excl in root.resolve().parents):
        excl = None
    found: list[Path] = []
    for p in root.rglob("*"):
        if _is_hidden(PurePosixPath(p.relative_to(root).as_posix())) or not p.is_file():
            continue
        if excl is not None and excl in p.resolve().parents:
            continue
        folder = p.parent
        if p.suffix.lower() in FRAME_SUFFIXES and folder != root:
            found.append(folder)  # a frame of a frames folder: the folder is the input
        else:
            found.append(p)
    return relative_items(found, root)


class _VideoDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Loads and preprocesses one video per index (`vitscope.video.load_clip`, the family's frame sampling); errors
    are returned, not raised. The limits in force when it is made travel with it (to the loader's workers)."""

    def __init__(self, items: Sequence[BatchItem], vit: VitModel, policy: SizePolicy | None,
                 size: int | tuple[int, int] | None) -> None:
        from vitscope import limits
        from vitscope.video import family_sample_rate

        info = vit.info
        self.items, self.prep, self.patch, self.frames = list(items), info.preprocess, info.patch_size, info.frames
        self.rate = family_sample_rate(vit.module)
        self.policy, self.size = policy, size
        self.max_pixels, self.max_video_pixels = limits.max_pixels(), limits.max_video_pixels()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from vitscope.video import VIDEO_SUFFIXES, load_clip

        item = self.items[i]
        try:
            if not item.path.is_dir() and item.path.suffix.lower() not in VIDEO_SUFFIXES:
                raise VitscopeError("inputs", f"{item.path} is neither a video file ({', '.join(VIDEO_SUFFIXES)}) "
                                    "nor a folder of frames", "keep only videos and frame folders in the input folder")
            pixels, original = load_clip(item.path, self.prep, self.patch, self.frames, self.policy, self.size,
                                         self.rate, "video", self.max_pixels, self.max_video_pixels)  # (T, C, H, W)
            return {"index": i, "pixels": pixels, "original_size": original, "mask": None, "error": None}
        except Exception as exc:  # one bad video never stops the run
            _interrupt.check()
            return {"index": i, "pixels": None, "original_size": None, "mask": None, "error": error_line(exc)}


def compute_video_batch(vit: VitModel, pixels: torch.Tensor, method: Method, *, layer: int = -1,
                        ) -> dict[str, np.ndarray]:
    """One batch of videos ``(B, T, C, H, W)`` -> numpy, batch first: ``map`` ``(B, T', rows, cols)``,
    ``profile`` ``(B, T')`` and the method's extras split per frame (``heads`` ``(B, H, T', rows, cols)``), by
    `vitscope.video_maps` itself (one forward pass per batch; chunks of ``vit.max_batch``)."""
    from vitscope.methods.video import video_maps

    params = method_params(method, layer)
    if method.check is not None:
        method.check(vit)
    B = int(pixels.shape[0])
    step = min(B, vit.max_batch or B)
    parts: list[dict[str, np.ndarray]] = []
    for s in range(0, B, step):
        result = video_maps(vit, pixels[s : s + step], method.name, **params)
        out = {"map": result.map.detach().float().cpu().numpy(), "profile": result.profile.detach().cpu().numpy()}
        for key, value in result.extras.items():
            out[key] = value.detach().cpu().numpy().astype(np.uint8 if value.dtype == torch.bool else np.float32)
        parts.append(out)
    return _concat(parts)


def video_strip_png(maps: np.ndarray, size: tuple[int, int]) -> bytes:
    """One video's maps ``(T', rows, cols)`` as a PNG strip: each token frame's map upsampled (bilinear) to
    ``size`` ``(height, width)`` and put side by side in time order, one ``inferno`` scale over the whole clip
    (min-max of every frame together), so a frame the model ignores looks dark."""
    from PIL import Image

    from vitscope.viz._render import colormap_table

    h, w = size
    ups = [np.asarray(Image.fromarray(np.asarray(m, dtype=np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR)) for m in maps]  # T' x (H, W)
    strip = np.concatenate(ups, axis=1)  # (H, T' * W)
    lo, hi = float(strip.min()), float(strip.max())
    scaled = (strip - lo) / (hi - lo) if hi > lo else np.zeros_like(strip)
    index = np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = Image.frombytes("P", (index.shape[1], h), index.tobytes())
    img.putpalette(colormap_table("inferno").tobytes())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _strip_frame_size(original: Sequence[int], frames: int) -> tuple[int, int]:
    """A frame's ``(height, width)`` in the strip: the video's own, scaled so the strip of ``frames`` fits
    `vitscope.limits.max_figure_pixels`."""
    h, w = _png_size((int(original[0]), int(original[1]) * frames))
    return h, max(1, w // frames)


def _process_videos(vit: VitModel, todo: list[BatchItem], out_dir: Path, manifest: Manifest, summary: BatchSummary,
                    bar: Any, *, method: str, fmts: tuple[str, ...], config: dict[str, Any], bases: dict[str, str],
                    batch_size: int, workers: int, policy: SizePolicy | None, size: int | tuple[int, int] | None,
                    layer: int, dev: torch.device, masks: Path | None = None, stats: bool = False,
                    norm_threshold: float | None = None) -> None:
    """`_process` for videos: the same loader, writer thread, buckets of equal shapes and Ctrl-C safe points
    (``masks``, ``stats``, ``norm_threshold``: `_process`'s signature; videos have no per-image measures)."""
    if not todo:
        return
    info = vit.info
    loader = torch.utils.data.DataLoader(
        _VideoDataset(todo, vit, policy, size), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_identity, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=max(2, min(batch_size, len(todo), 16)) if workers else None,
    )
    spec = get_method(method)
    pipe = _Pipeline(todo, manifest, summary, bar, method)

    def write_batch(samples: list[dict[str, Any]], result: dict[str, np.ndarray], hw: tuple[int, int]) -> None:
        entries = []
        for b, sample in enumerate(samples):
            item = todo[sample["index"]]
            arrays = {k: v[b] for k, v in result.items()}
            T = int(arrays["map"].shape[0])
            meta = image_meta(input=str(item.path), rel=item.rel, method=method, model=config["model"],
                              grid=arrays["map"].shape[-2:], image_size=hw, original_size=sample["original_size"],
                              info=info, layer=config["layer"])
            meta.update(frames=T, tubelet=info.tubelet, input_frames=info.frames)
            outputs: dict[str, dict[str, Any]] = {}
            for fmt in fmts:
                data = _npz_bytes(arrays, meta) if fmt == "npz" else \
                    video_strip_png(arrays["map"], _strip_frame_size(sample["original_size"], T))
                rel_out = f"{bases[item.rel]}.{method}.{fmt}"
                atomic_write_bytes(out_dir / rel_out, data)
                outputs[fmt] = {"path": rel_out, "bytes": len(data), "sha256": _sha256(data)}
            entries.append({"rel": item.rel, "input": str(item.path), "status": "ok", "error": None,
                            "outputs": outputs, "method": method, "finished": time.time()})
        pipe.finish(entries)

    def run(samples: list[dict[str, Any]]) -> None:
        pixels = torch.stack([s["pixels"] for s in samples]).to(dev, vit.dtype)  # (B, T, C, H, W)
        try:
            result = compute_video_batch(vit, pixels, spec, layer=layer)
        except Exception as exc:
            pipe.fail(samples, exc)
            return
        pipe.submit(write_batch, samples, result, (int(pixels.shape[-2]), int(pixels.shape[-1])))

    pipe.drive(loader, batch_size, run)
