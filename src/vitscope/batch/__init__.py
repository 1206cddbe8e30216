"""Batch mode: one method's maps for many images, resumable and lossless, on one of two engines.

- ``engine="local"`` (`vitscope.batch.local`): this process plus DataLoader workers; one ``.npz``/PNG per image,
  an fsynced ``manifest.jsonl``, resume after a crash or Ctrl-C.
- ``engine="ray"`` (`vitscope.batch.ray_engine`): a Ray Data pipeline (preprocessing tasks, an actor pool that
  loads the model once per actor, atomic Parquet parts, dataset-level summaries), on a local or running cluster.

`run_batch` is the entry point for both (``vitscope batch ... --engine``). Methods are the method registry's
(`vitscope.methods.registry`, the one table: ``vitscope methods`` lists it); both engines compute a batch's maps
and per-image measures with `compute_batch`, from one forward pass.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vitscope.adapters.base import SizePolicy
from vitscope.batch.local import (
    CONFIG,
    FORMATS,
    MANIFEST,
    BatchItem,
    BatchSummary,
    Manifest,
    _ImageDataset,
    collect_inputs,
    compute_batch,
    error_line,
    heatmap_png,
    image_meta,
    output_bases,
    preprocess_image,
    run_local,
)
from vitscope.errors import VitscopeError

__all__ = [
    "CONFIG", "FORMATS", "MANIFEST", "BatchItem", "BatchSummary", "Manifest", "_ImageDataset", "collect_inputs",
    "compute_batch", "error_line", "heatmap_png", "image_meta", "output_bases", "preprocess_image", "run_batch",
    "run_local", "saved_counts",
]


ENGINES = ("local", "ray")


def saved_counts(output_dir: str | os.PathLike[str], engine: str = "local") -> tuple[int, int, Path]:
    """``(images saved ok, images failed, where they are recorded)`` in ``output_dir`` by ``engine``: the
    local engine's manifest, the Ray engine's Parquet parts (read with pyarrow: no Ray needed). Unreadable
    state counts as nothing saved."""
    out = Path(output_dir)
    if engine == "ray":
        from vitscope.batch.ray_engine import PARTS, saved_statuses

        statuses = saved_statuses(out)
        where = out / PARTS
    else:
        manifest = Manifest(out / MANIFEST)
        with contextlib.suppress(Exception):
            manifest.load()
        statuses = [str(e.get("status")) for e in manifest.entries.values()]
        where = manifest.path
    return statuses.count("ok"), statuses.count("error"), where


def run_batch(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    method: str = "cls",
    model: Any = "vitscope:shapes",
    batch_size: int = 8,
    workers: int | None = None,
    formats: str | Sequence[str] | None = None,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    layer: int = -1,
    device: str | torch.device | None = "auto",
    verify: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    masks: str | os.PathLike[str] | None = None,
    stats: bool = True,
    norm_threshold: float | None = None,
    summary: bool = True,
    engine: str = "local",
    **engine_options: Any,
) -> BatchSummary | Any:
    """Compute ``method``'s map for every image in ``inputs`` (see `vitscope.batch.local.run_local` for the
    arguments and outputs of the local engine). Both engines write the same dataset summary
    (``summary.json``, ``distance.png``; `vitscope.batch.stats`) from the same per-image measures.

    Args:
        engine: ``"local"`` (this process + DataLoader workers) or ``"ray"``: Ray Data, Parquet output, options
            ``address``, ``concurrency``, ``num_cpus``, ``num_gpus``, ``masks``, ...
            (`vitscope.batch.ray_engine.run_batch_ray`).
        workers, formats, verify: local engine only (default ``2``, ``("npz", "png")``, ``False``).

    An option the chosen engine cannot honour (``workers``, ``formats``, ``verify`` on Ray; Ray's options on the
    local engine) is refused, never ignored; numeric options are range-checked alike on both engines
    (`vitscope.batch.local.check_options`), before anything is loaded or started.
    """
    if engine not in ENGINES:
        raise VitscopeError("engine", f"unknown engine {engine!r}", "use 'local' or 'ray'")
    local_only = {"workers": workers, "formats": formats, "verify": verify}
    given = [name for name, value in local_only.items() if value is not None] if engine == "ray" else \
        [name for name, value in engine_options.items() if value is not None]
    if given:
        other = "local" if engine == "ray" else "ray"
        raise VitscopeError(given[0], f"the {engine} engine does not use it", f"drop it, or use the {other} engine")
    if engine == "ray":
        from vitscope.batch.ray_engine import run_batch_ray

        return run_batch_ray(inputs, output_dir, method=method, model=model, batch_size=batch_size, policy=policy,
                             size=size, layer=layer, device=None if device is None else str(device),
                             overwrite=overwrite, progress=progress, masks=masks, stats=stats,
                             norm_threshold=norm_threshold, summary=summary, **engine_options)
    return run_local(inputs, output_dir, method=method, model=model, batch_size=batch_size,
                     workers=2 if workers is None else workers, formats=FORMATS if formats is None else formats,
                     policy=policy, size=size, layer=layer, device=device, verify=bool(verify),
                     overwrite=overwrite, progress=progress, masks=masks, stats=stats,
                     norm_threshold=norm_threshold, summary=summary)
