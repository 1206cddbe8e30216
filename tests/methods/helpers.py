"""Random `Attentions` built directly (softmax of random logits), independent of any adapter."""

from __future__ import annotations

import torch

from vitscope.attentions import Attentions

PREFIX_REG = ("cls", "register", "register", "register", "register")  # [CLS] + 4 registers


def random_attentions(
    prefix: tuple[str, ...] = PREFIX_REG,
    grid: tuple[int, int] = (3, 5),
    layers: int = 3,
    batch: int = 2,
    heads: int = 4,
    patch_size: tuple[int, int] = (8, 8),
    seed: int = 0,
    sharp: float = 2.0,
) -> Attentions:
    g = torch.Generator().manual_seed(seed)
    N = len(prefix) + grid[0] * grid[1]
    w = (torch.randn(layers, batch, heads, N, N, generator=g, dtype=torch.float64) * sharp).softmax(-1)
    return Attentions(
        weights=w.float(), prefix=prefix, grid=grid, patch_size=patch_size,
        image_size=(grid[0] * patch_size[0], grid[1] * patch_size[1]), layers=tuple(range(layers)),
        heads=tuple(range(heads)), queries=None, num_layers=layers, num_heads=heads,
    )


def attentions_from(weights: torch.Tensor, prefix: tuple[str, ...], grid: tuple[int, int],
                    patch_size: tuple[int, int] = (1, 1)) -> Attentions:
    """Wrap hand-written weights ``(layers, batch, heads, N, N)``."""
    L, _, H = weights.shape[:3]
    return Attentions(
        weights=weights, prefix=prefix, grid=grid, patch_size=patch_size,
        image_size=(grid[0] * patch_size[0], grid[1] * patch_size[1]), layers=tuple(range(L)),
        heads=tuple(range(H)), queries=None, num_layers=L, num_heads=H,
    )
