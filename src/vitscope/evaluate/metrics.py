"""The published scores of a relevance map, each as its paper's evaluation code computes it.

- **Perturbation test** (Chefer et al., CVPR'21, ``baselines/ViT/pertubation_eval_from_hdf5.py``): the map is
  brought to the model input's pixels (bilinear, ``align_corners=False``, as their ``interpolate(scale_factor=16,
  mode='bilinear')``); at each step ``s`` in 10%, 20%, ..., 90% the ``int(s * H * W)`` pixels of highest relevance
  (``positive``) or lowest relevance (``negative``: the map negated, their ``--neg``) are set to **0 in [0, 1]
  pixel space, before the model's normalisation** (their ``scatter_(..., 0)`` on unnormalised data, then
  ``normalize``), i.e. ``(0 - mean) / std`` in the model's input. The curve is top-1 accuracy at 0% (the
  unperturbed image) and the nine steps; its area is the trapezoid rule over ``x = 0, 0.1, ..., 0.9`` times 100
  (`CURVE_X`, `perturbation_auc`), the rule of the public reproductions of their tables. *Predicted*: the class
  is the model's prediction on the unperturbed image (the curve starts at 1); *target*: the dataset's label
  (starts at the model's accuracy). The target class's softmax probability is kept beside accuracy.
- **Segmentation test** (Chefer et al., ``baselines/ViT/imagenet_seg_eval.py`` with ``utils/metrices.py``): the
  map at pixels (bilinear), min-max normalised, is foreground where it is strictly above its mean; pixel accuracy
  and the two-class (background, foreground) IoU are summed over the dataset before dividing (`SegmentationCounts`,
  `segmentation_scores`); AP is per image (`average_precision` of the normalised map against the mask, and of
  ``1 - map`` against the background, pooled as their one-hot ``get_ap_scores``), averaged over images.
- **Pointing game** (Zhang et al., ECCV'16): `vitscope.methods.metrics.pointing_game`.
- **Deletion / insertion** (Petsiuk et al., BMVC'18 "RISE"): `vitscope.methods.metrics.perturbation_auc`.
- **Sanity check** (Adebayo et al., NeurIPS'18): `spearman` rank correlation of a map with the map after
  randomising the model's layers from the top down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vitscope.errors import VitscopeError

#: Chefer's perturbation steps: 10% .. 90% of the input's pixels.
PERTURBATION_STEPS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: x of the perturbation curve: the unperturbed image, then each step.
CURVE_X: tuple[float, ...] = (0.0, *PERTURBATION_STEPS)


def pixel_relevance(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps ``(B, rows, cols)`` at the input's pixels ``(B, H, W)`` (bilinear, ``align_corners=False``)."""
    if maps.dim() != 3:
        raise VitscopeError("maps", f"shape {tuple(maps.shape)}", "pass (batch, rows, cols)")
    x = maps.detach().double()[:, None]  # (B, 1, rows, cols)
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)[:, 0]


def removal_order(relevance: torch.Tensor, negative: bool) -> torch.Tensor:
    """Pixel indices ``(B, H*W)`` in the order the perturbation test removes them: most relevant first
    (``negative=False``) or least relevant first; ties keep the lower index first."""
    B = relevance.shape[0]
    flat = relevance.reshape(B, -1)
    return torch.sort(-flat if negative else flat, dim=-1, descending=True, stable=True).indices


def perturbed_inputs(pixels: torch.Tensor, order: torch.Tensor, fraction: float, fill: torch.Tensor) -> torch.Tensor:
    """``pixels`` ``(B, C, H, W)`` (the model's normalised input) with the first ``int(fraction * H * W)``
    pixels of ``order`` ``(B, H*W)`` set to ``fill`` ``(C,)`` (black in the model's normalisation)."""
    B, C, H, W = pixels.shape
    k = int(H * W * fraction)
    hide = torch.zeros(B, H * W, dtype=torch.bool, device=pixels.device)
    hide.scatter_(1, order[:, :k].to(pixels.device), True)
    hide = hide.reshape(B, 1, H, W)
    return torch.where(hide, fill.reshape(1, C, 1, 1).to(pixels), pixels)


def black_fill(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The value of a 0 (black) pixel of [0, 1] space in the model's normalised input: ``-mean / std``."""
    return torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float64)


def perturbation_auc(curve: np.ndarray | Sequence[float]) -> float:
    """Area under a perturbation curve (values at `CURVE_X`), trapezoid rule, in percent."""
    y = np.asarray(curve, dtype=np.float64)
    if y.shape != (len(CURVE_X),):
        raise VitscopeError("curve", f"{y.shape[0] if y.ndim == 1 else y.shape} points", f"pass {len(CURVE_X)}")
    x = np.asarray(CURVE_X)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 * 100)


# ------------------------------------------------------------------------------------------------ segmentation
def binarise(relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(normalised map, foreground)``: the map min-max scaled to [0, 1] and thresholded strictly above its
    mean (Chefer's ``Res.gt(Res.mean())``); a constant map has no foreground."""
    r = np.asarray(relevance, dtype=np.float64)
    lo, hi = float(r.min()), float(r.max())
    norm = (r - lo) / (hi - lo) if hi > lo else np.zeros_like(r)
    return norm, norm > norm.mean()


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of ``scores`` for binary ``targets`` (scikit-learn's ``average_precision_score``:
    precision at each distinct score threshold, weighted by the recall gained there); 0 with no positive."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(targets).reshape(-1).astype(bool)
    positives = int(t.sum())
    if positives == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tp = np.cumsum(t)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass
class SegmentationCounts:
    """One image's (or a dataset's) segmentation sums: pixels correct and labelled, per-class (background,
    foreground) intersection and union, and the per-image APs (averaged by `segmentation_scores`)."""

    correct: int = 0
    labeled: int = 0
    inter: list[int] = field(default_factory=lambda: [0, 0])
    union: list[int] = field(default_factory=lambda: [0, 0])
    ap: list[float] = field(default_factory=list)

    def add(self, other: SegmentationCounts) -> SegmentationCounts:
        self.correct += other.correct
        self.labeled += other.labeled
        self.inter = [a + b for a, b in zip(self.inter, other.inter, strict=True)]
        self.union = [a + b for a, b in zip(self.union, other.union, strict=True)]
        self.ap = [*self.ap, *other.ap]
        return self


def segmentation_counts(relevance: np.ndarray, mask: np.ndarray) -> SegmentationCounts:
    """One image: ``relevance`` ``(H, W)`` at the mask's pixels, ``mask`` ``(H, W)`` bool (every pixel labelled)."""
    gt = np.asarray(mask, dtype=bool)
    if np.shape(relevance) != gt.shape:
        raise VitscopeError("masks", f"mask {gt.shape} vs map {np.shape(relevance)}", "bring both to the input size")
    norm, fg = binarise(relevance)
    flat = float(np.ptp(np.asarray(relevance, dtype=np.float64))) == 0.0
    inter = [int(np.sum(~fg & ~gt)), int(np.sum(fg & gt))]
    union = [int(np.sum(~fg | ~gt)), int(np.sum(fg | gt))]
    # AP of the two one-hot channels pooled: background scored 1 - map, foreground scored map (a constant map
    # is NaN after Chefer's min-max, zeroed on both channels: every score 0)
    scores = np.zeros(2 * gt.size) if flat else np.concatenate([1 - norm.ravel(), norm.ravel()])
    ap = average_precision(scores, np.concatenate([~gt.ravel(), gt.ravel()]))
    return SegmentationCounts(correct=int(np.sum(fg == gt)), labeled=int(gt.size), inter=inter, union=union, ap=[ap])


def segmentation_scores(counts: SegmentationCounts) -> dict[str, float]:
    """``pixel_accuracy``, ``miou``, ``map`` in percent (Chefer's sums; ``np.spacing(1)`` in the denominators)."""
    eps = float(np.spacing(1, dtype=np.float64))
    acc = counts.correct / (eps + counts.labeled)
    iou = np.asarray(counts.inter, dtype=np.float64) / (eps + np.asarray(counts.union, dtype=np.float64))
    return {"pixel_accuracy": 100 * acc, "miou": 100 * float(iou.mean()),
            "map": 100 * float(np.mean(counts.ap)) if counts.ap else float("nan")}


# ------------------------------------------------------------------------------------------------ sanity
def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (flattened), ties sharing their average rank."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.arange(1, v.size + 1, dtype=np.float64)
    uniq, inverse = np.unique(v, return_inverse=True)
    if uniq.size < v.size:  # average the ranks of equal values
        sums = np.bincount(inverse, weights=ranks)
        counts = np.bincount(inverse)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (Pearson correlation of their ranks); 0 when either is constant."""
    ra, rb = rank(a), rank(b)
    if ra.size != rb.size:
        raise VitscopeError("maps", f"{ra.size} vs {rb.size} values", "compare maps of one grid")
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt(np.sum(da * da) * np.sum(db * db)))
    return float(np.sum(da * db) / denom) if denom > 0 else 0.0


def random_maps(seed: int, keys: Sequence[int], grid: tuple[int, int]) -> np.ndarray:
    """The random baseline: one uniform map ``(rows, cols)`` per key, a pure function of ``(seed, key)``."""
    return np.stack([np.random.default_rng([int(seed), int(k)]).random(grid) for k in keys]).astype(np.float32)
