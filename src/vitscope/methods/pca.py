"""`pca`: the first three principal components of the patch features, shown as RGB (the DINOv2 paper's figure).

Oquab et al. 2024 ("DINOv2: Learning Robust Visual Features without Supervision", TMLR, Fig. 1 and Sec. 7.4):
patch features of one or several images are fitted *jointly* (so a colour means the same part in every image),

1. PCA of every patch feature ``X`` ``(n, D)`` (``n`` = patches of all images): ``Xc = X - mean(X)``,
   ``Xc = U S V^T`` (``V`` from the eigenvectors of ``Xc^T Xc``), scores ``Xc V[:, :3]``;
2. optionally ``foreground``: the first component, min-max scaled to [0, 1] over all patches, is thresholded
   (patches with ``pc1 >= foreground`` are kept; ``foreground_side="low"`` keeps ``pc1 <= foreground``), and the
   PCA is fitted again on the kept patches only (the background gets black);
3. each of the three components is min-max scaled to [0, 1] over the fitted patches and shown as R, G, B.

A component's sign is arbitrary; it is fixed here so that the patch with the largest absolute score has a
positive one (scikit-learn's ``svd_flip`` convention), so the same features always give the same colours.

``map`` is the first component (scaled to [0, 1], of the first fit): a scalar map every surface can show;
``extras["rgb"]`` ``(B, rows, cols, 3)`` in [0, 1] is the figure; ``extras["foreground"]`` the kept patches.
Features: `vitscope.methods.features.patch_features` (block ``layer``'s output, after the final norm).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from vitscope.errors import VitscopeError
from vitscope.methods.features import patch_features
from vitscope.methods.registry import MapContext, MapResult, Method, register

__all__ = ["pca_components", "pca_rgb"]

#: a direction whose variance is below this share of the first one's is rounding noise (the features' rank)
RANK_TOLERANCE = 1e-10


def pca_components(x: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores (n, k), components (k, D), mean (D,))`` of ``x`` ``(n, D)``: the top right singular vectors of
    the centred ``x``, found in float64 as eigenvectors of its ``D x D`` scatter matrix (of the ``n x n`` Gram
    matrix when ``n < D``), a matrix product and a small symmetric eigenproblem rather than a full SVD; signs
    fixed so each component's largest-magnitude score is positive. Fewer than ``k`` directions (``n`` or ``D``
    small, or features of a lower rank: variance below `RANK_TOLERANCE` of the first's): the missing components
    are zero."""
    x64 = x.double()
    mean = x64.mean(dim=0)
    xc = x64 - mean  # (n, D)
    n, D = xc.shape
    if n >= D:  # eigenvectors of the scatter matrix Xc^T Xc = V S^2 V^T: the right singular vectors
        var, vecs = torch.linalg.eigh(xc.T @ xc)  # ascending
        var, directions = var.flip(0), vecs.flip(-1).T  # (D,), (D, D) rows by decreasing variance
    else:  # fewer patches than dimensions: the Gram matrix Xc Xc^T = U S^2 U^T, then V^T = S^-1 U^T Xc
        var, vecs = torch.linalg.eigh(xc @ xc.T)
        var, u = var.flip(0), vecs.flip(-1)
        directions = (u.T @ xc) / var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()[:, None]
    rank = int((var > var[0] * RANK_TOLERANCE).sum()) if var.numel() and float(var[0]) > 0 else 0
    comps = directions[:min(k, rank)]  # directions past the rank are rounding noise (min-max would blow them up)
    scores = xc @ comps.T  # (n, k')
    idx = scores.abs().argmax(dim=0)  # (k',)
    signs = torch.sign(scores[idx, torch.arange(scores.shape[1])])
    signs[signs == 0] = 1.0
    scores, comps = scores * signs, comps * signs[:, None]
    if scores.shape[1] < k:  # fewer patches or dimensions than components
        pad = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_zeros(scores.shape[0], pad)], dim=1)
        comps = torch.cat([comps, comps.new_zeros(pad, comps.shape[1])], dim=0)
    return scores, comps, mean


def _check_options(foreground: Any, foreground_side: Any, joint: Any) -> None:
    if foreground is not None and (isinstance(foreground, bool) or not isinstance(foreground, numbers.Real)
                                   or not 0.0 <= float(foreground) <= 1.0):
        raise VitscopeError("foreground", f"{foreground!r} is not a threshold in [0, 1]",
                            "pass a value in [0, 1] on the min-max scaled first component, e.g. 0.5, or None")
    if not isinstance(foreground_side, str) or foreground_side not in ("high", "low"):
        raise VitscopeError("foreground_side", f"unknown value {foreground_side!r}", "use 'high' or 'low'")
    if not isinstance(joint, bool):
        raise VitscopeError("joint", f"expected True or False, got {joint!r}", "pass joint=True or joint=False")


def _minmax(scores: torch.Tensor) -> torch.Tensor:
    """Each column of ``scores`` ``(n, k)`` scaled to [0, 1] (a constant column becomes 0)."""
    lo, hi = scores.min(dim=0).values, scores.max(dim=0).values
    span = hi - lo
    return torch.where(span > 0, (scores - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(scores))


def pca_rgb(
    patches: torch.Tensor, *, foreground: float | None = None, foreground_side: str = "high", joint: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PCA figure of patch features ``patches`` ``(B, rows, cols, D)`` (see the module docstring).

    Returns:
        ``(rgb (B, rows, cols, 3), pc1 (B, rows, cols), foreground (B, rows, cols) bool)``, float32 in [0, 1];
        ``pc1`` is the first component of the first fit; with ``joint=False`` each image is fitted alone.
    """
    _check_options(foreground, foreground_side, joint)
    if not joint:
        parts = [pca_rgb(patches[b:b + 1], foreground=foreground, foreground_side=foreground_side)
                 for b in range(patches.shape[0])]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]
    B, rows, cols, D = patches.shape
    x = patches.reshape(B * rows * cols, D)
    if x.shape[0] < 2:
        raise VitscopeError("images", f"{x.shape[0]} patch cannot be fitted", "pass a larger image (2 patches or more)")
    scores, _, _ = pca_components(x)
    pc1 = _minmax(scores[:, :1])[:, 0]  # (n,)
    keep = torch.ones_like(pc1, dtype=torch.bool)
    if foreground is not None:
        keep = pc1 >= foreground if foreground_side == "high" else pc1 <= foreground
        if int(keep.sum()) < 2:
            raise VitscopeError("foreground", f"only {int(keep.sum())} patch passes threshold {foreground}",
                                "lower the threshold (or use foreground_side='low'), or pass foreground=None")
        scores, _, _ = pca_components(x[keep])
    rgb = torch.zeros(x.shape[0], 3, dtype=torch.float64, device=x.device)
    rgb[keep] = _minmax(scores)
    return (rgb.float().reshape(B, rows, cols, 3), pc1.float().reshape(B, rows, cols),
            keep.reshape(B, rows, cols))


def _compute(ctx: MapContext, *, layer: int = -1, norm: bool = True, foreground: Any = None,
             foreground_side: str = "high", joint: bool = True) -> MapResult:
    _check_options(foreground, foreground_side, joint)
    feats = patch_features(ctx.vit, ctx.pixels, layer=layer, norm=norm)
    rgb, pc1, keep = pca_rgb(feats.patches, foreground=foreground, foreground_side=foreground_side, joint=joint)
    return MapResult(map=pc1, extras={"rgb": rgb, "foreground": keep},
                     meta={"layer": feats.layer, "norm": feats.norm})


register(Method(
    name="pca", compute=_compute, needs="features",
    summary="first three principal components of the patch features as RGB (fitted jointly over the images)",
    paper="Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, TMLR 2024",
))
