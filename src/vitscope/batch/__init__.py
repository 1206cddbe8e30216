"""Batch mode: one method's maps for many images, resumable and lossless, on one of two engines.

- ``engine="local"`` (`vitscope.batch.local`): this process plus DataLoader workers; one ``.npz``/PNG per image,
  an fsynced ``manifest.jsonl``, resume after a crash or Ctrl-C.
- ``engine="ray"`` (`vitscope.batch.ray_engine`): a Ray Data pipeline (preprocessing tasks, an actor pool that
  loads the model once per actor, atomic Parquet parts, dataset-level summaries), on a local or running cluster.

`run_batch` is the entry point for both (``vitscope batch ... --engine``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from vitscope.adapters.base import SizePolicy
from vitscope.batch.local import (
    CONFIG,
    FORMATS,
    MANIFEST,
    METHODS,
    BatchItem,
    BatchSummary,
    Manifest,
    MapMethod,
    _ImageDataset,
    collect_inputs,
    error_line,
    heatmap_png,
    image_meta,
    output_bases,
    preprocess_image,
    register_method,
    run_local,
)
from vitscope.errors import VitscopeError

__all__ = [
    "CONFIG", "FORMATS", "MANIFEST", "METHODS", "BatchItem", "BatchSummary", "Manifest", "MapMethod",
    "_ImageDataset", "collect_inputs", "error_line", "heatmap_png", "image_meta", "output_bases",
    "preprocess_image", "register_method", "run_batch", "run_local",
]


def run_batch(
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
    """
    if engine == "ray":
        from vitscope.batch.ray_engine import run_batch_ray

        return run_batch_ray(inputs, output_dir, method=method, model=model, batch_size=batch_size, policy=policy,
                             size=size, layer=layer, device=None if device is None else str(device),
                             overwrite=overwrite, progress=progress, masks=masks, stats=stats,
                             norm_threshold=norm_threshold, summary=summary, **engine_options)
    if engine != "local" or engine_options:
        raise VitscopeError("engine", f"unknown engine {engine!r}" if engine != "local" else
                            f"options {', '.join(engine_options)} need engine='ray'", "use engine='local' or 'ray'")
    return run_local(inputs, output_dir, method=method, model=model, batch_size=batch_size, workers=workers,
                     formats=formats, policy=policy, size=size, layer=layer, device=device, verify=verify,
                     overwrite=overwrite, progress=progress, masks=masks, stats=stats,
                     norm_threshold=norm_threshold, summary=summary)
