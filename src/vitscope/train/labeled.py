"""`LabeledDataset`: the base of vitscope's training datasets (shared by `datasets` and `shapes`)."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


class LabeledDataset(Dataset):  # type: ignore[type-arg]
    """Base of vitscope's datasets: ``(image (C, H, W) float in [0, 1], label)`` items plus class names."""

    classes: tuple[str, ...] = ()
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    labels: np.ndarray | None = None  # (N,) int64 when known without decoding images

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError
