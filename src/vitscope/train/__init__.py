"""Training vitscope's own tiny ViT from scratch: model, datasets, the loop, and the model report.

>>> from vitscope.train import preset, train
>>> result = train(preset("shapes"), "runs/shapes")          # doctest: +SKIP
>>> result.best_val_accuracy                                  # doctest: +SKIP

The same from the shell: ``vitscope train --preset shapes -o runs/shapes`` (see docs/training.md).
Names are imported on first use, so ``import vitscope`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ViT": "vitscope.models.vit",
    "ViTConfig": "vitscope.models.vit",
    "save_vit": "vitscope.models.vit",
    "load_vit": "vitscope.models.vit",
    "DATASETS": "vitscope.train.datasets",
    "LabeledDataset": "vitscope.train.datasets",
    "get_dataset": "vitscope.train.datasets",
    "SHAPE_CLASSES": "vitscope.train.shapes",
    "ShapesDataset": "vitscope.train.shapes",
    "render_shape": "vitscope.train.shapes",
    "PRESETS": "vitscope.train.loop",
    "TrainConfig": "vitscope.train.loop",
    "TrainResult": "vitscope.train.loop",
    "evaluate": "vitscope.train.loop",
    "preset": "vitscope.train.loop",
    "train": "vitscope.train.loop",
    "model_report": "vitscope.train.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vitscope.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
