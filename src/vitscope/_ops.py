"""Small tensor operations shared by every layer (capture, `Attentions`, methods, figures, viewer): one head
fusion, one min-max scaling and one pairwise update of moments. Imports nothing of vitscope but its errors."""

from __future__ import annotations

from typing import Any

import torch

from vitscope.errors import VitscopeError

HEAD_FUSIONS = ("mean", "max", "min")


def check_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise VitscopeError("head_fusion", f"unknown value {head_fusion!r}", "use 'mean', 'max' or 'min'")


def fuse_heads(w: torch.Tensor, head_fusion: str, heads: object = "all", dim: int = 1,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Fuse the head dim ``dim`` of ``w`` by mean / max / min (dim removed; into ``out`` when given).

    ``heads == "mean"`` says the heads were averaged at capture time: only ``"mean"`` is possible then.
    """
    check_fusion(head_fusion)
    if head_fusion == "mean":
        return torch.mean(w, dim=dim, out=out) if out is not None else w.mean(dim=dim)
    if heads == "mean":
        raise VitscopeError(
            "head_fusion", f"{head_fusion!r} needs every head, but heads were already averaged at capture time",
            "capture with heads='all', or use head_fusion='mean'",
        )
    op = torch.amax if head_fusion == "max" else torch.amin
    return op(w, dim=dim, out=out) if out is not None else op(w, dim=dim)


def minmax(x: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """Min-max scaling to [0, 1] over all but the first ``dims`` dims (per image); constant maps become 0."""
    flat = x.reshape(*x.shape[:dims], -1)
    lo, hi = flat.amin(dim=-1, keepdim=True), flat.amax(dim=-1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(x.shape)


def combine_moments(n_a: int, mean_a: Any, m2_a: Any, n_b: int, mean_b: Any, m2_b: Any) -> tuple[int, Any, Any]:
    """Chan et al.'s pairwise update of (count, mean, M2) ("Updating formulae and a pairwise algorithm for
    computing sample variances", 1979): the moments of two disjoint sets combined, for numpy arrays or tensors.

    ``n_a == 0`` returns set b as it is; one new value ``x`` is ``(1, x, 0)`` (Welford's update).
    """
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n)
