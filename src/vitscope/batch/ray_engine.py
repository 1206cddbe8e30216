"""Batch mode on Ray Data: the same maps as `vitscope.batch.run_batch`, for datasets that outgrow one machine.

The pipeline (``run_batch(..., engine="ray")``, ``vitscope batch ... --engine ray``)::

    source rows (paths / URIs / manifest rows with a path or bytes column)
      -> map_batches(_preprocess_rows)            tasks: load, preprocess, read masks; bad images become rows
      -> map_batches(MapActor, concurrency=...)   actors: the model loaded once per actor; maps, prediction,
                                                  per-image statistics; each call writes one Parquet part
      -> small (id, status, error) rows streamed back to the driver for progress

Every actor call writes ``OUT/parts/part-<hash of its ids>.parquet`` atomically (a dot-prefixed temporary file,
fsynced, then renamed), one row per image; a call that Ray retries after its actor died writes the same name
again, so nothing is ever half-written and a retried batch replaces, not duplicates, its part. Reading back
(`read_results`) keeps one row per ``id`` all the same (an ``ok`` row over an ``error`` one). A re-run reads the
``id`` and ``status`` columns of the parts and computes only what is not ``ok`` yet.

Dataset-level measures (`summarize`) are combined on the engine from per-part partial sums
(`vitscope.batch.stats.SummaryAccumulator`: count, mean, M2 of the mean attention distance per (layer, head);
high-norm token counts per layer; pointing game hits and mask IoU), never by collecting maps on the driver:
``OUT/summary.json`` and ``OUT/distance.png``, the same summary local batch mode writes.

Ray is quiet by default: everything Ray writes to this process's standard error while a run starts, uses and
stops it (its Python loggers, Ray Data's progress log, the C++ core worker's lines, the token-authentication
notice) goes to a log file in the temporary folder, named in the run's summary line (`ray_output`);
``verbose=True`` (``vitscope batch --verbose``) leaves it on the terminal.

``ray`` is an optional dependency: ``pip install 'vitscope[ray]'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitscope.batch.local import BatchSummary
from vitscope.batch.stats import (
    STAT_FIELDS,
    SUMMARY,
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
from vitscope.methods.registry import Method

PARTS = "parts"
#: The exact name of a part vitscope writes (`_part_name`): only files of this name are read, or removed by
#: ``overwrite``; anything else in ``OUT/parts`` is left alone.
PART_NAME = re.compile(r"part-[0-9a-f]{24}\.parquet")
MANIFEST_SUFFIXES = (".parquet", ".csv")
INSTALL_HINT = "pip install 'vitscope[ray]'"
#: Folder of the log files that receive Ray's messages (`ray_output`); ``None``: the system's temporary folder.
LOG_DIR: str | None = None

#: Columns of every output row (see docs/performance.md#ray-engine).
COLUMNS = (
    "id", "rel", "input", "status", "error", "method", "model", "grid", "image_size", "original_size",
    "map", "heads", "prediction", "label", "score", "distance", "norm_mean", "norm_high", "patch_tokens",
    "pointing", "iou", "meta_json",
)


def import_ray() -> Any:
    """``import ray`` (and ``ray.data``), or a one-line `VitscopeError` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise VitscopeError("engine", "the ray engine needs Ray Data, which is not installed",
                            INSTALL_HINT) from None
    return ray


# ------------------------------------------------------------------------------------------------ schema
def _schema() -> Any:
    import pyarrow as pa

    f32, f64, i32 = pa.list_(pa.float32()), pa.list_(pa.float64()), pa.list_(pa.int32())
    return pa.schema([
        ("id", pa.string()), ("rel", pa.string()), ("input", pa.string()), ("status", pa.string()),
        ("error", pa.string()), ("method", pa.string()), ("model", pa.string()), ("grid", i32),
        ("image_size", i32), ("original_size", i32), ("map", f32), ("heads", f32), ("prediction", pa.int64()),
        ("label", pa.string()), ("score", pa.float32()), ("distance", f64), ("norm_mean", f64),
        ("norm_high", pa.list_(pa.int64())), ("patch_tokens", pa.int64()), ("pointing", pa.bool_()),
        ("iou", pa.float64()), ("meta_json", pa.string()),
    ])


def _prep_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("rel", pa.string()), ("input", pa.string()), ("error", pa.string()),
        ("pixels", pa.binary()), ("shape", pa.list_(pa.int32())), ("original_size", pa.list_(pa.int32())),
        ("mask", pa.binary()), ("mask_shape", pa.list_(pa.int32())),
    ])


# ------------------------------------------------------------------------------------------------ inputs
def _is_uri(text: str) -> bool:
    return "://" in text


def _read_bytes(location: str) -> bytes:
    """A local path or a URI (``s3://``, ``gs://``, ``file://``, ... through pyarrow's filesystems)."""
    if _is_uri(location):
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(location)
        with filesystem.open_input_stream(path) as fh:
            return bytes(fh.read())
    return Path(location).read_bytes()


def _open_image(data: bytes, location: str) -> Any:
    """Encoded image bytes as an upright RGB PIL image, exactly as local batch mode opens a file: refused
    from its header above `vitscope.limits.max_pixels`, turned by its EXIF orientation."""
    from PIL import Image, UnidentifiedImageError

    from vitscope import limits
    from vitscope.errors import ImageError
    from vitscope.images import _header_only, check_pixels, open_image

    if not data:
        raise ImageError("image", f"{location} is empty (0 bytes)", "pass a valid image file")
    cap = limits.max_pixels()
    try:
        with _header_only(cap), Image.open(io.BytesIO(data)) as im:
            check_pixels(im.width, im.height, cap, "image", what=location)
            return open_image(im)
    except UnidentifiedImageError:
        raise ImageError("image", f"{location} is not an image PIL can read", "pass a PNG, JPEG, ... file") from None


def current_limits() -> dict[str, int]:
    """The `vitscope.limits` in force here, to hand to Ray tasks and actors (context variables stay in the
    driver's thread): ``with limits(**current_limits())`` there."""
    from vitscope import limits

    return {"max_pixels": limits.max_pixels(), "max_tokens": limits.max_tokens(), "max_bytes": limits.max_bytes(),
            "max_figure_pixels": limits.max_figure_pixels()}


def _load_mask(location: str, hw: tuple[int, int]) -> np.ndarray:
    """A mask image at a path or URI, in the model input's frame ``(H, W)`` (`vitscope.batch.stats.mask_image`)."""
    return mask_image(_read_bytes(location), hw, name=location)


def _row_id(rid: Any, path: Any, data: bytes | None) -> str | None:
    """A source row's id as a string: its ``id`` (``0`` and other integer ids included), else its ``path``,
    else the sha256 of its ``bytes``; ``None`` when it has none of them."""
    for value in (rid, path):
        if value is not None and str(value) != "":
            return str(value)
    return "sha256:" + hashlib.sha256(data).hexdigest() if data is not None else None


def _preprocess_rows(table: Any, *, prep: Any, patch: tuple[int, int], policy: Any, size: Any,
                     done: frozenset[str], limits: dict[str, int] | None = None) -> Any:
    """Ray task: source rows -> preprocessed rows (float32 pixels as bytes + shape), skipping ``done`` ids,
    under the driver's `vitscope.limits` (``limits``, `current_limits`).

    A row that cannot be read or preprocessed keeps its one-line error and no pixels (it is written as an
    ``error`` row by the actors, never fatal).
    """
    from vitscope.limits import limits as limits_in_force

    with limits_in_force(**(limits or {})):
        return _preprocess_table(table, prep=prep, patch=patch, policy=policy, size=size, done=done)


def _preprocess_table(table: Any, *, prep: Any, patch: tuple[int, int], policy: Any, size: Any,
                      done: frozenset[str]) -> Any:
    import pyarrow as pa
    import torch

    from vitscope.batch.local import error_line, preprocess_image

    torch.set_num_threads(1)
    cols = set(table.column_names)
    n = table.num_rows

    def col(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in cols else [None] * n

    ids, rels, inputs, paths, datas, masks = col("id"), col("rel"), col("input"), col("path"), col("bytes"), col("mask")
    out: dict[str, list[Any]] = {k: [] for k in _prep_schema().names}
    for i in range(n):
        data = datas[i]
        rid = _row_id(ids[i], paths[i], data)
        if rid is None or rid in done:
            continue
        pixels, mask, error = b"", b"", None
        shape: list[int] | None = None
        original: list[int] | None = None
        mask_shape: list[int] | None = None
        try:
            if data is None and not _is_uri(str(paths[i])):  # a local file: exactly local batch mode's path
                image: Any = Path(str(paths[i]))
            else:
                where = str(paths[i]) if paths[i] is not None else f"bytes of row {rid}"
                image = _open_image(data if data is not None else _read_bytes(str(paths[i])), where)
            px, hw = preprocess_image(image, prep, patch, policy, size)  # (C, H, W)
            arr = px.numpy().astype(np.float32, copy=False)
            pixels, shape, original = arr.tobytes(), list(arr.shape), list(hw)
            if masks[i]:
                m = _load_mask(str(masks[i]), (arr.shape[1], arr.shape[2]))
                mask, mask_shape = m.astype(np.uint8).tobytes(), list(m.shape)
        except Exception as exc:  # one bad image never stops the run
            error = error_line(exc)
            pixels, shape, original, mask, mask_shape = b"", None, None, b"", None
        out["id"].append(rid)
        out["rel"].append(str(rels[i]) if rels[i] is not None else rid)
        out["input"].append(str(inputs[i]) if inputs[i] is not None else (str(paths[i]) if paths[i] is not None
                                                                          else ""))
        out["error"].append(error)
        out["pixels"].append(pixels)
        out["shape"].append(shape)
        out["original_size"].append(original)
        out["mask"].append(mask)
        out["mask_shape"].append(mask_shape)
    return pa.Table.from_pydict(out, schema=_prep_schema())


# ------------------------------------------------------------------------------------------------ actors
def _part_name(ids: Sequence[str]) -> str:
    digest = hashlib.sha256("\0".join(sorted(ids)).encode("utf-8")).hexdigest()[:24]
    return f"part-{digest}.parquet"


def empty_row(**values: Any) -> dict[str, Any]:
    """An output row: every column of `COLUMNS` ``None`` but ``values``."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(values)
    return row


def write_part(parts_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as the part named by their ids, atomically (fsynced temporary file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitscope._io import atomic_path

    if rows:
        out = pa.Table.from_pylist(list(rows), schema=_schema())
        with atomic_path(parts_dir / _part_name([r["id"] for r in rows])) as tmp:
            pq.write_table(out, tmp)


class MapActor:
    """Ray Data callable class: loads the model once per actor, then for each block of preprocessed rows
    computes the method's maps (equal-sized images share a forward pass, ``batch_size`` at a time), the
    prediction and per-image statistics, writes one Parquet part atomically and returns ``(id, status, error)``.
    """

    def __init__(self, *, model: Any, method: str, spec: Method, layer: int,
                 model_id: str, parts_dir: str, batch_size: int, stats: bool, norm_threshold: float | None,
                 threads: int, device: str | None, limits: dict[str, int] | None = None) -> None:
        import torch

        from vitscope.adapters import as_vit
        from vitscope.capture.prepare import resolve_device

        torch.set_num_threads(max(1, threads))
        self.vit = as_vit(model)
        dev = resolve_device(device, self.vit.device)
        if dev != self.vit.device:
            self.vit.module.to(dev)
        self.dev = dev
        self.method, self.spec, self.layer, self.model_id = method, spec, layer, model_id
        self.parts_dir, self.batch_size = Path(parts_dir), batch_size
        self.stats, self.norm_threshold = stats, norm_threshold
        self.limits = dict(limits or {})  # the driver's vitscope.limits (current_limits), for every call
        labels = self.vit.info.labels
        self.labels = list(labels) if labels else None

    def _compute(self, idx: list[int], table_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        import torch

        shape = tuple(table_rows[idx[0]]["shape"])
        pixels = torch.stack([torch.from_numpy(np.frombuffer(table_rows[i]["pixels"], dtype=np.float32)
                                               .reshape(shape).copy()) for i in idx])  # (B, C, H, W)
        pixels = pixels.to(self.dev, self.vit.dtype)
        try:
            from vitscope.batch.local import compute_batch

            # one forward pass per batch (the measures observe the method's own), in chunks of vit.max_batch;
            # the actor's torch threads are its whole CPU reservation: no spare core for the measures' thread
            result, extra = compute_batch(self.vit, pixels, self.spec, layer=self.layer, stats=self.stats,
                                          norm_threshold=self.norm_threshold, background=False)
        except Exception as exc:  # e.g. a size the model refuses: every image of the group is an error
            from vitscope.batch.local import error_line

            for i in idx:
                rows[i].update(status="error", error=error_line(exc))
            return
        info = self.vit.info
        hw = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        for b, i in enumerate(idx):
            src, row = table_rows[i], rows[i]
            heat = np.asarray(result["map"][b], dtype=np.float32)
            grid = list(heat.shape[-2:])
            from vitscope.batch.local import image_meta

            meta = image_meta(input=src["input"], rel=src["rel"], method=self.method, model=self.model_id,
                              grid=grid, image_size=hw, original_size=src["original_size"], info=info,
                              layer=self.layer if self.method == "cls" else None)
            row.update(status="ok", grid=grid, image_size=list(hw), original_size=list(src["original_size"]),
                       map=heat.ravel().tolist(), meta_json=json.dumps(meta))
            if "heads" in result:
                row["heads"] = np.asarray(result["heads"][b], dtype=np.float32).ravel().tolist()
            if extra:
                row.update(image_record(extra, b, self.labels))
            if src["mask"]:
                mask = np.frombuffer(src["mask"], dtype=np.uint8).reshape(src["mask_shape"]).astype(bool)
                row.update(localisation(heat, mask))

    def __call__(self, table: Any) -> Any:
        from vitscope.limits import limits

        with limits(**self.limits):
            return self._call(table)

    def _call(self, table: Any) -> Any:
        import pyarrow as pa

        table_rows = table.to_pylist()
        rows = [empty_row(id=src["id"], rel=src["rel"], input=src["input"], method=self.method, model=self.model_id,
                          status="error" if src["error"] else "pending", error=src["error"]) for src in table_rows]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, src in enumerate(table_rows):
            if not src["error"]:
                groups.setdefault(tuple(src["shape"]), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                self._compute(idx[start:start + self.batch_size], table_rows, rows)
        write_part(self.parts_dir, rows)
        return pa.Table.from_pydict({"id": [r["id"] for r in rows], "rel": [r["rel"] for r in rows],
                                     "status": [r["status"] for r in rows], "error": [r["error"] for r in rows]},
                                    schema=pa.schema([("id", pa.string()), ("rel", pa.string()),
                                                      ("status", pa.string()), ("error", pa.string())]))


# ------------------------------------------------------------------------------------------------ read back
def part_files(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The finished parts (never the dot-prefixed temporary files), sorted by name."""
    parts = Path(output_dir) / PARTS
    return sorted(p for p in parts.glob("part-*.parquet") if PART_NAME.fullmatch(p.name) and p.is_file()
                  and not p.is_symlink()) if parts.is_dir() and not parts.is_symlink() else []


def _part_ids(p: Path) -> tuple[list[str], list[str]]:
    """The ``id`` and ``status`` columns of part ``p``, checked: a part that is not Parquet, lacks them, or
    holds other values is a one-line `VitscopeError` naming the file, never a traceback or trusted."""
    import pyarrow.parquet as pq

    fix = "delete that file, or pass --overwrite"
    try:
        t = pq.read_table(p, columns=["id", "status"])
        ids, statuses = t.column("id").to_pylist(), t.column("status").to_pylist()
    except Exception as exc:  # ArrowInvalid, OSError, KeyError: anything unreadable
        from vitscope.batch.local import error_line

        raise VitscopeError("output", f"{p} is not a readable vitscope part ({error_line(exc)[:200]})",
                            fix) from None
    if not all(isinstance(rid, str) and rid for rid in ids):
        raise VitscopeError("output", f"{p}: every \"id\" must be a non-empty string", fix)
    if not all(status in ("ok", "error") for status in statuses):
        raise VitscopeError("output", f'{p}: "status" must be "ok" or "error"', fix)
    return ids, statuses


def _index(parts: Sequence[Path]) -> dict[str, tuple[str, str]]:
    """``id -> (part name, status)`` of the row kept per id: the first ``ok`` row (parts in name order), else
    the last ``error`` row."""
    keep: dict[str, tuple[str, str]] = {}
    for p in parts:
        for rid, status in zip(*_part_ids(p), strict=True):
            old = keep.get(rid)
            if old is None or (old[1] != "ok" and (status == "ok" or old[1] == status)):
                keep[rid] = (p.name, status)
    return keep


def read_results(output_dir: str | os.PathLike[str], columns: Sequence[str] | None = None) -> Any:
    """All output rows as one ``pyarrow.Table``, one row per ``id`` (duplicates of a retried part dropped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = part_files(output_dir)
    keep = _index(parts)
    cols = None if columns is None else list(dict.fromkeys(["id", *columns]))
    tables = []
    for p in parts:
        t = pq.read_table(p, columns=cols)
        mask = [keep.get(rid, ("", ""))[0] == p.name for rid in t.column("id").to_pylist()]
        tables.append(t.filter(pa.array(mask, type=pa.bool_())))
    if not tables:
        return _schema().empty_table() if cols is None else _schema().empty_table().select(cols)
    out = pa.concat_tables(tables)
    seen: set[str] = set()
    first = []
    for rid in out.column("id").to_pylist():  # one part may hold an id twice only if a manifest repeats it
        first.append(rid not in seen)
        seen.add(rid)
    return out.filter(pa.array(first, type=pa.bool_())) if not all(first) else out


def row_arrays(row: dict[str, Any], num_heads: int | None = None) -> dict[str, np.ndarray]:
    """``map`` ``(rows, cols)`` (and ``heads`` ``(heads, rows, cols)``, ``distance`` ``(layers, heads)`` when
    ``num_heads`` is given) of one output row (a dict, e.g. from ``read_results(out).to_pylist()``)."""
    rows, cols = row["grid"]
    out: dict[str, np.ndarray] = {"map": np.asarray(row["map"], dtype=np.float32).reshape(rows, cols)}
    if row.get("heads") is not None:
        out["heads"] = np.asarray(row["heads"], dtype=np.float32).reshape(-1, rows, cols)
    if row.get("distance") is not None and num_heads:
        out["distance"] = np.asarray(row["distance"], dtype=np.float64).reshape(-1, num_heads)
    return out


def saved_statuses(output_dir: str | os.PathLike[str]) -> list[str]:
    """The status kept per image in ``output_dir``'s parts (``[]`` when they cannot be read): what a run saved."""
    try:
        return [status for _name, status in _index(part_files(output_dir)).values()]
    except VitscopeError:
        return []


# ------------------------------------------------------------------------------------------------ summary
_STAT_COLUMNS = ["id", "status", *STAT_FIELDS]


def _partial_sums(batch: Any, *, keep: dict[str, str]) -> Any:
    """Ray task: a `SummaryAccumulator` over the rows of some part files (the rows each id keeps), one row out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    acc = SummaryAccumulator()
    for path in batch.column("path").to_pylist():
        name = Path(path).name
        for r in pq.read_table(path, columns=_STAT_COLUMNS).to_pylist():
            if keep.get(r["id"]) == name:
                acc.add(r["status"], r)
    return pa.Table.from_pydict({"partial": [acc.to_json()]})


def summarize(output_dir: str | os.PathLike[str], *, num_heads: int, config: dict[str, Any] | None = None,
              figure: bool = True) -> dict[str, Any]:
    """Aggregate the per-image rows of ``output_dir`` on Ray (one task per group of part files, merged on the
    driver) and write ``summary.json`` (+ ``distance.png``): `vitscope.batch.stats.SummaryAccumulator.summary`,
    the same as local batch mode's. Needs a connected Ray (`run_batch` calls it)."""
    ray = import_ray()
    out = Path(output_dir)
    parts = part_files(out)
    keep = {rid: name for rid, (name, _status) in _index(parts).items()}
    total = SummaryAccumulator()
    if parts:
        groups = max(1, min(len(parts), 4 * int(ray.cluster_resources().get("CPU", 1))))
        ds = ray.data.from_items([{"path": str(p)} for p in parts], override_num_blocks=groups)
        rows = ds.map_batches(_partial_sums, batch_format="pyarrow", batch_size=None,
                              fn_kwargs={"keep": keep}).take_all()
        for r in rows:
            total.merge(SummaryAccumulator.from_json(r["partial"]))
    summary = total.summary(num_heads=num_heads, config=config)
    write_summary(out, summary, figure=figure)
    return summary


# ------------------------------------------------------------------------------------------------ run
@dataclass
class RayBatchSummary(BatchSummary):
    """What a Ray-engine run did; ``summary`` is the dataset-level summary written to ``summary.json``;
    ``ray_log`` the file that received Ray's own messages (`ray_output`; ``None`` with ``verbose``)."""

    ray_log: Path | None = None

    @property
    def manifest(self) -> Path:
        return self.output_dir / PARTS

    def __str__(self) -> str:
        return (f"{self.done} done, {self.skipped} skipped (already done), {self.failed} failed of {self.total} "
                f"in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s); parts in {self.manifest}, "
                f"summary {self.output_dir / SUMMARY}" + (f"; Ray's log {self.ray_log}" if self.ray_log else ""))


@contextlib.contextmanager
def ray_output(verbose: bool) -> Iterator[Path | None]:
    """While Ray runs in this process: unless ``verbose``, whatever is written to file descriptor 2 (Ray's log
    handlers, which hold the original ``sys.stderr``, and the C++ core worker, which writes to the descriptor)
    goes to a new log file ``<tmp>/vitscope-ray-*.log`` (in `LOG_DIR` when set), yielded; vitscope's own lines (``sys.stderr``, which
    is pointed at the terminal meanwhile: warnings, the progress bar) still reach the terminal. Everything is
    restored on exit, however the block ends. Yields ``None`` when ``verbose`` or when standard error is not a
    file descriptor (then nothing is redirected)."""
    import sys
    import tempfile

    if verbose:
        yield None
        return
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a closed stderr): nothing to quieten
        yield None
        return
    fd, name = tempfile.mkstemp(prefix="vitscope-ray-", suffix=".log", dir=LOG_DIR)
    old = sys.stderr
    ours: Any = None
    try:
        for stream in (old, sys.__stderr__):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os.dup2(fd, 2)
        try:
            to_fd2 = old is not None and old.fileno() == 2
        except (AttributeError, OSError, ValueError):  # pytest's capture, notebooks: not the descriptor
            to_fd2 = False
        if to_fd2:
            ours = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                             errors="backslashreplace")
            sys.stderr = ours
        yield Path(name)
    finally:
        with contextlib.suppress(Exception):
            if sys.__stderr__ is not None:
                sys.__stderr__.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
        if ours is not None:
            sys.stderr = old
            with contextlib.suppress(Exception):
                ours.close()


def _connect(ray: Any, address: str | None, cpus_needed: float) -> bool:
    """Use a running Ray (``address``, ``RAY_ADDRESS`` or an existing ``ray.init``), else start a local one.
    Returns whether this call started it."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=address or None, log_to_driver=False)
        except ConnectionError as exc:
            raise VitscopeError("address", f"cannot connect to Ray at {address or os.environ['RAY_ADDRESS']}: "
                                f"{' '.join(str(exc).split())}",
                                "check the address; a cluster with token authentication (Ray's default) also "
                                "needs RAY_AUTH_MODE=token here") from None
        return False
    # logical CPUs: every actor's share plus one for the preprocessing tasks, whatever the core count
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed) + 1), include_dashboard=False,
             log_to_driver=False)
    return True


def _manifest_dataset(ray: Any, path: Path, masks: Path | None) -> Any:
    """A Parquet/CSV manifest: a ``path`` (local path or URI) or ``bytes`` column, optional ``id`` and ``mask``."""
    ds = ray.data.read_parquet(str(path)) if path.suffix.lower() == ".parquet" else ray.data.read_csv(str(path))
    names = set(ds.schema().names)
    if not names & {"path", "bytes"}:
        raise VitscopeError("inputs", f"{path} has no 'path' or 'bytes' column (columns: {', '.join(sorted(names))})",
                            "add a column 'path' (file paths or URIs) or 'bytes' (encoded images)")
    if masks is not None:
        raise VitscopeError("masks", "a manifest gives its masks in a 'mask' column", "drop --masks")
    return ds


def refuse_ray_video(vit: Any) -> None:
    """The Ray engine reads images only: a video model (``info.frames``) is a one-line error naming ``engine``
    (the local engine reads folders of video files and frame folders, `vitscope.batch.local.run_local_videos`)."""
    if vit.info.frames:
        raise VitscopeError("engine", f"{vit.info.name} is a video model ({vit.info.frames} frames): the ray engine "
                            "reads images only", "use the local engine (`engine='local'`), which reads folders of "
                            "videos and frame folders")


def run_batch_ray(
    inputs: Any,
    output_dir: str | os.PathLike[str],
    *,
    method: str = "cls",
    model: Any = "vitscope:shapes",
    batch_size: int = 8,
    policy: Any = None,
    size: int | tuple[int, int] | None = None,
    layer: int = -1,
    device: str | None = "auto",
    overwrite: bool = False,
    progress: bool = True,
    address: str | None = None,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    part_size: int = 64,
    preprocess_tasks: int | None = None,
    masks: str | os.PathLike[str] | None = None,
    stats: bool = True,
    norm_threshold: float | None = None,
    summary: bool = True,
    max_retries: int = 3,
    verbose: bool = False,
) -> RayBatchSummary:
    """`vitscope.batch.run_batch` on Ray Data: call it as ``run_batch(..., engine="ray", ...)``.

    Args (beyond `run_batch`'s):
        inputs: also a ``.parquet`` / ``.csv`` manifest with a ``path`` (paths or URIs) or ``bytes`` column
            (optional ``id`` and ``mask`` columns), or a sequence of paths / URIs.
        address: a running cluster (``ray://host:10001`` or ``host:6379``); default ``RAY_ADDRESS``, else an
            already initialised Ray, else a local Ray is started for this run.
        concurrency: actors, each with the model loaded once; ``num_cpus`` / ``num_gpus`` per actor (torch
            threads = ``num_cpus``).
        batch_size: images per forward pass inside an actor; ``part_size``: rows per actor call and per Parquet
            part (a retried call recomputes at most that many).
        preprocess_tasks: loading/preprocessing tasks running at once (default ``2 * concurrency``; for a
            manifest, as many as the free CPUs allow).
        masks: a folder of object masks mirroring the inputs' relative paths (``a/cat.jpg`` -> ``a/cat.jpg`` or
            ``a/cat.png``; non-zero = object): pointing game and mask IoU per image and in the summary.
        stats: also the prediction, token norms and mean attention distance per image (read from the map's
            own forward pass, `vitscope.batch.local.compute_batch`); they feed the summary.
        norm_threshold: fixed cut for high-norm tokens (default: per image and layer, ``q75 + 3 IQR``).
        summary: aggregate ``summary.json`` and ``distance.png`` at the end.
        max_retries: times an actor call is retried after its actor died (Ray restarts the actor). With a
            folder or a list, a part that still fails is run again one image per part and what fails then is an
            ``error`` row ("WorkerDied: ..."), so an image that crashes its worker every time fails alone; with a
            manifest the run stops with a one-line error (the parts written so far are kept).
        A video model is refused (`refuse_ray_video`): video folders run on the local engine.
        verbose: leave Ray's own messages on the terminal (default: they go to a log file, `ray_output`,
            named in the summary's line).
    """
    from vitscope.adapters import as_vit
    from vitscope.batch.local import (
        _exclusive,
        _model_id,
        _remove_partials,
        check_method_layer,
        check_options,
        collect_inputs,
        run_config,
    )

    # every check that needs no cluster comes first: a bad value never starts (or waits for) Ray
    check_options(batch_size=batch_size, concurrency=concurrency, part_size=part_size, max_retries=max_retries,
                  preprocess_tasks=preprocess_tasks, num_cpus=num_cpus, num_gpus=num_gpus,
                  norm_threshold=norm_threshold)
    spec = get_method(method)  # the registry's Method travels to the actors (a test's own one included)
    out_dir = Path(output_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise VitscopeError("output", f"{out_dir} is a file, not a folder", "name a folder for the outputs")
    ray = import_ray()
    if num_gpus and not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        _check_local_gpus(num_gpus)
    vit = as_vit(model)
    refuse_ray_video(vit)
    check_method_layer(spec, layer, vit)
    mask_dir = check_masks(masks, policy, vit)
    manifest: Path | None = None
    items: list[dict[str, Any]] | None = None
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_file() and \
            Path(inputs).suffix.lower() in MANIFEST_SUFFIXES:
        manifest = Path(inputs)
    elif not isinstance(inputs, (str, os.PathLike)) and any(_is_uri(str(x)) for x in inputs):
        items = [{"id": str(x), "rel": str(x), "input": str(x), "path": str(x), "mask": None}
                 for x in dict.fromkeys(map(str, inputs))]
    else:  # ids: local mode's names (`vitscope.batch.local.relative_name`: below the input root as given)
        items = [{"id": it.rel, "rel": it.rel, "input": str(it.path), "path": str(it.path),
                  "mask": mask_for(mask_dir, it.rel) if mask_dir is not None else None}
                 for it in collect_inputs(inputs, exclude=out_dir)]
        if not items:
            raise VitscopeError("inputs", "no files found", "check the path")
    model_id = _model_id(model, vit)
    config = run_config("ray", method=method, model=model_id, policy=policy, size=size, layer=layer, stats=stats,
                        norm_threshold=norm_threshold, masks=mask_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / PARTS).is_symlink():  # parts are written where the link points: never outside -o
        raise VitscopeError("output", f"{out_dir / PARTS} is a symlink", "remove it, or use another output folder")
    (out_dir / PARTS).mkdir(exist_ok=True)
    result = RayBatchSummary(output_dir=out_dir, total=0)
    started = False
    with _exclusive(out_dir), ray_output(verbose) as ray_log:
        result.ray_log = ray_log
        _remove_partials(out_dir)
        _check_config(out_dir, config, overwrite)
        index = _index(part_files(out_dir))
        done = frozenset(rid for rid, (_name, status) in index.items() if status == "ok")
        start = time.perf_counter()
        started = _connect(ray, address, concurrency * num_cpus)
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.enable_progress_bars, ctx.max_errored_blocks)
        try:
            gpus = float(ray.cluster_resources().get("GPU", 0)) if num_gpus else 0.0
            if gpus < num_gpus:  # a pool that waits for GPUs the cluster does not have would hang
                raise VitscopeError("num_gpus", f"the Ray cluster has {gpus:g} GPU(s), each actor asks for "
                                    f"{num_gpus:g}", "drop it, or use a cluster with GPUs")
            ctx.enable_progress_bars = progress
            opts: dict[str, Any] = dict(
                method=method, spec=spec, layer=layer, model=model, model_id=model_id, out_dir=out_dir,
                batch_size=int(batch_size), policy=policy, size=size, done=done, concurrency=int(concurrency),
                num_cpus=float(num_cpus), num_gpus=float(num_gpus), device=device, stats=stats,
                norm_threshold=norm_threshold, progress=progress, max_retries=int(max_retries),
                preprocess_tasks=int(preprocess_tasks or 2 * concurrency), limits=current_limits())
            if items is not None:
                result.total = len(items)
                todo = [it for it in items if it["id"] not in done]
                result.skipped = len(items) - len(todo)
                if todo:
                    _run_items(ray, ctx, todo, vit, result, part_size=int(part_size), **opts)
            else:
                assert manifest is not None
                src = _manifest_dataset(ray, manifest, mask_dir)
                try:  # ids are only known on the cluster: a part that fails after its retries stops the run
                    _stream(ray, src, vit, result, part_size=int(part_size), blocks=None, total=None, **opts)
                except ray.exceptions.RayError as exc:
                    raise VitscopeError("inputs", f"a part failed after {max_retries} retries "
                                        f"({' '.join(str(exc).split())[:300]})",
                                        "the parts written so far are kept: fix or drop the image that crashes "
                                        "the worker and run again to resume") from None
            if manifest is not None:
                result.total = result.done + result.failed + len(done)
                result.skipped = len(done)
            if summary:
                result.summary = summarize(out_dir, num_heads=vit.info.num_heads, config=config)
        finally:
            ctx.enable_progress_bars, ctx.max_errored_blocks = saved
            _remove_partials(out_dir)  # temporary files of actors killed mid-write
            result.seconds = time.perf_counter() - start
            if started:
                ray.shutdown()
    return result


def _run_items(ray: Any, ctx: Any, todo: list[dict[str, Any]], vit: Any, result: RayBatchSummary, *,
               part_size: int, **opts: Any) -> None:
    """Stream known ``todo`` items; a part whose worker died ``max_retries + 1`` times is dropped by Ray Data
    (``max_errored_blocks=-1``) instead of failing the run. Its images are run again one per part, so one image
    that crashes its worker fails alone; what is still lost then becomes ``error`` rows with the reason."""
    ctx.max_errored_blocks = -1
    blocks = max(1, math.ceil(len(todo) / part_size))
    seen = _stream(ray, ray.data.from_items(todo, override_num_blocks=blocks), vit, result, part_size=part_size,
                   blocks=blocks, total=len(todo), **opts)
    lost = [it for it in todo if it["id"] not in seen]
    if lost and part_size > 1:
        seen = _stream(ray, ray.data.from_items(lost, override_num_blocks=len(lost)), vit, result, part_size=1,
                       blocks=len(lost), total=len(lost), **opts)
        lost = [it for it in lost if it["id"] not in seen]
    if not lost:
        return
    error = (f"WorkerDied: the worker computing this image died {opts['max_retries'] + 1} times (a native crash "
             "or out of memory; Ray's logs name the cause)")
    write_part(opts["out_dir"] / PARTS, [empty_row(id=it["id"], rel=it["rel"], input=it["input"], status="error",
                                                   error=error, method=opts["method"], model=opts["model_id"])
                                         for it in lost])
    result.failed += len(lost)
    result.errors.extend((it["rel"], error) for it in lost)


def _check_local_gpus(num_gpus: float) -> None:
    """A Ray started here sees this machine's GPUs only: refuse ``num_gpus`` it cannot have (an actor pool
    waiting for a GPU that never comes hangs forever)."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < num_gpus:
        raise VitscopeError("num_gpus", f"no GPU visible to Ray here ({have} found, each actor asks for "
                            f"{num_gpus:g})", "drop it, or connect to a cluster with GPUs (address)")


def _check_config(out_dir: Path, config: dict[str, Any], overwrite: bool) -> None:
    from vitscope._io import atomic_write_text
    from vitscope.batch.local import CONFIG, check_same_run

    cfg_path = out_dir / CONFIG
    if overwrite:  # only vitscope's own parts (their exact names); a user's file in parts/ stays
        for part in part_files(out_dir):
            part.unlink()
    elif cfg_path.exists() and (part_files(out_dir) or (out_dir / "manifest.jsonl").exists()):
        check_same_run(cfg_path, config, out_dir)
    atomic_write_text(cfg_path, json.dumps(config, indent=2))


def _stream(ray: Any, src: Any, vit: Any, result: RayBatchSummary, *, method: str, spec: Any, layer: int,
            model: Any, model_id: str, out_dir: Path, batch_size: int, part_size: int, policy: Any, size: Any,
            done: frozenset[str], concurrency: int, num_cpus: float, num_gpus: float, device: str | None,
            stats: bool, norm_threshold: float | None, progress: bool, blocks: int | None,
            preprocess_tasks: int, max_retries: int, total: int | None, limits: dict[str, int]) -> set[str]:
    """Run the pipeline over ``src``; count what comes back into ``result``; return the ids that came back."""
    from tqdm.auto import tqdm

    info = vit.info
    model_arg = model_id if isinstance(model, (str, os.PathLike)) else vit
    # preprocessing tasks ask for another CPU share than the actors: Ray Data fuses a task map into the next
    # actor map when their resources match, and loading would then run inside the actors, serially
    prep_cpus = 0.25 if num_cpus != 0.25 else 0.2
    prepared = src.map_batches(
        _preprocess_rows, batch_format="pyarrow", batch_size=part_size, num_cpus=prep_cpus,
        compute=ray.data.TaskPoolStrategy(size=min(preprocess_tasks, blocks)) if blocks else None,
        fn_kwargs={"prep": info.preprocess, "patch": info.patch_size, "policy": policy, "size": size,
                   "done": done, "limits": limits},
    )
    # a fixed pool, never larger than the number of input blocks (a pool waiting for inputs it cannot get)
    pool = ray.data.ActorPoolStrategy(size=min(concurrency, blocks)) if blocks else \
        ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency)
    # an actor pool of fixed size; Ray restarts a dead actor (max_restarts=-1) and retries the call it was
    # running, up to max_retries times: an image that kills its worker every time cannot loop forever. Ray 2.60
    # has no named parameter for these actor options yet and warns that remote args as keywords go in 2.64
    # (ray is pinned in constraints.txt).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        mapped = prepared.map_batches(
            MapActor, batch_format="pyarrow", batch_size=part_size, compute=pool,
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
            max_restarts=-1, max_task_retries=max_retries,
            fn_constructor_kwargs={"model": model_arg, "method": method, "spec": spec, "layer": layer,
                                   "model_id": model_id, "parts_dir": str((out_dir / PARTS).resolve()),
                                   "batch_size": batch_size, "stats": stats, "norm_threshold": norm_threshold,
                                   "threads": max(1, int(num_cpus)),
                                   "device": "cuda" if num_gpus else ("cpu" if device == "auto" else device),
                                   "limits": limits},
        )
    bar = tqdm(total=total, unit="img", desc=f"vitscope batch {method} (ray)", disable=not progress,
               dynamic_ncols=True)
    seen: set[str] = set()
    try:
        for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
            seen.update(batch.column("id").to_pylist())
            for rel, status, error in zip(batch.column("rel").to_pylist(), batch.column("status").to_pylist(),
                                          batch.column("error").to_pylist(), strict=True):
                if status == "ok":
                    result.done += 1
                else:
                    result.failed += 1
                    result.errors.append((rel, error or "error"))
            bar.update(batch.num_rows)
    finally:
        bar.close()
    return seen
