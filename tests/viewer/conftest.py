"""Viewer fixtures: a small page (registers, non-square grid) and a ViT-S/16 page at full size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from tests.conftest import make_tiny_vit
from vitscope.attentions import Attentions
from vitscope.viewer import Viewer


@dataclass
class Page:
    path: Path
    attn: Attentions
    viewer: Viewer


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def small_page(tmp_path_factory: pytest.TempPathFactory) -> Page:
    """2 layers x 4 heads, [CLS] + 2 registers, a 4 x 6 grid (input 32 x 48), every query row.

    The q/k projections are scaled up so attention is peaked (a freshly initialised ViT attends almost
    uniformly, which would make every map flat and every comparison weak).
    """
    model = make_tiny_vit(num_registers=2, image_size=(32, 48), seed=5)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * 32].mul_(12.0)  # rows of q and k (dim 32)
    vit = vitscope.wrap(model)
    img = _image(60, 90, 0)
    attn = vitscope.capture(vit, img, queries=None, size=(32, 48))
    viewer = Viewer.from_attentions(attn, img, title="small </script> test")
    path = viewer.save(tmp_path_factory.mktemp("viewer") / "small.html")
    return Page(path, attn, viewer)


@pytest.fixture(scope="session")
def vits_page(tmp_path_factory: pytest.TempPathFactory) -> Page:
    """A random-weight ViT-S/16 (12 layers, 6 heads, dim 384) at 224 px: 12 x 6 x 197 x 197 weights."""
    from vitscope.models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=(224, 224), patch_size=16, dim=384, depth=12, heads=6, num_classes=10)).eval()
    img = _image(240, 320, 1)
    attn = vitscope.capture(model, img, queries=None)
    viewer = Viewer.from_attentions(attn, img, title="ViT-S/16")
    path = viewer.save(tmp_path_factory.mktemp("viewer") / "vits.html")
    return Page(path, attn, viewer)


@pytest.fixture
def no_cls_attn() -> Attentions:
    """A SigLIP-like layout: no prefix token, a 2 x 3 grid, 2 layers x 3 heads, peaked random rows."""
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 1, 3, 6, 6, generator=g) ** 4
    w = w / w.sum(dim=-1, keepdim=True)  # (layer, batch, head, query, key), rows sum to 1
    return Attentions(weights=w, prefix=(), grid=(2, 3), patch_size=(4, 4), image_size=(8, 12), layers=(0, 1),
                      heads=(0, 1, 2), queries=None, num_layers=2, num_heads=3)
