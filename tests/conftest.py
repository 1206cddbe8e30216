"""Shared fixtures: tiny seeded models and images, so the suite runs in minutes on 2 cores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

torch.set_num_threads(1)  # pytest-xdist runs one worker per core

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class KernelQueries(TorchFunctionMode):
    """Records the query shape of every ``scaled_dot_product_attention`` call made while it is active, also the
    ones vitscope makes itself (its own mode is popped while it handles a call, so they reach this one)."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[tuple[int, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.queries.append(tuple((args[0] if args else kwargs["query"]).shape))
        return func(*args, **kwargs)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED} missing in CI")
        pytest.skip("../shared/data not present")
    return SHARED


def make_tiny_vit(num_registers: int = 0, image_size: tuple[int, int] = (32, 32), seed: int = 0,
                  num_classes: int = 5, depth: int = 2, heads: int = 4, dim: int = 32, patch: int = 8):
    from vitscope.models.vit import ViT, ViTConfig

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=patch, dim=dim, depth=depth, heads=heads,
                    num_classes=num_classes, num_registers=num_registers)
    return ViT(cfg).eval()


@pytest.fixture
def tiny_vit():
    """vitscope ViT: 2 layers, 4 heads, dim 32, patch 8, 32x32 input, [CLS] only."""
    return make_tiny_vit()


@pytest.fixture
def tiny_vit_reg():
    """vitscope ViT with [CLS] + 4 registers."""
    return make_tiny_vit(num_registers=4, seed=1)


@pytest.fixture
def rgb_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8))


@pytest.fixture
def image_path(tmp_path: Path, rgb_image: Image.Image) -> Path:
    p = tmp_path / "img.png"
    rgb_image.save(p)
    return p


def assert_same_summary(a: object, b: object, path: str = "summary") -> None:
    """Equal keys, equal counts and strings; floats equal up to float32 rounding (the engines batch images
    differently, and sum them in a different order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_summary(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_summary(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), f"{path}: {a} != {b}"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"
