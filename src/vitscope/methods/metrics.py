"""Scores for maps: DINO's mask Jaccard, the pointing game, and deletion/insertion perturbation curves.

- `mask_jaccard` (Caron et al. 2021, DINO, Sec. 4.2.1 / Table 7): each head's map is thresholded to keep
  ``tau = 0.6`` of its mass (`dino_mask`), and compared to a ground-truth mask by Jaccard
  ``|M ∩ G| / |M ∪ G|``; an object's score is that of its best head.
- `pointing_game` (Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop", ECCV): a hit when
  the map's maximum lies inside the ground-truth mask, or within ``tolerance`` pixels of it (they use 15).
- `perturbation_auc` (deletion/insertion, Petsiuk et al. 2018 "RISE"; the positive/negative perturbation
  protocol of Chefer et al. 2021): patches are removed from (deletion) or inserted into (insertion) the
  image in decreasing order of the map, the target's probability is tracked, and the area under the curve
  over the fraction of patches perturbed is taken by the trapezoid rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vitscope.adapters.base import SizePolicy
from vitscope.errors import VitscopeError
from vitscope.methods.masks import mass_mask


def _gt_masks(masks: torch.Tensor, batch: int) -> torch.Tensor:
    """Ground truth as bool ``(B, K, H, W)`` from ``(B, H, W)`` or ``(B, K, H, W)``."""
    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.dim() != 4 or masks.shape[0] != batch:
        raise VitscopeError(
            "masks", f"shape {tuple(masks.shape)} does not fit {batch} maps", "pass (batch, H, W) or (batch, objects, H, W)"
        )
    return masks.bool()


@dataclass
class JaccardResult:
    """DINO mask Jaccard.

    Attributes:
        per_head: ``(batch, objects, heads)`` Jaccard of each head's mask with each object.
        best: ``(batch, objects)`` the best head's Jaccard.
        best_head: ``(batch, objects)`` which head.
    """

    per_head: torch.Tensor
    best: torch.Tensor
    best_head: torch.Tensor


def mask_jaccard(
    maps: torch.Tensor,
    masks: torch.Tensor,
    *,
    tau: float = 0.6,
    at: Literal["image", "grid"] = "image",
) -> JaccardResult:
    """DINO's protocol: Jaccard between each head's ``tau``-mass mask and each ground-truth object.

    Args:
        maps: ``(batch, heads, rows, cols)`` non-negative maps (e.g. ``cls_map(attn, head="all")``), or
            ``(batch, rows, cols)`` for one head.
        masks: ground truth, bool ``(batch, H, W)`` or ``(batch, objects, H, W)`` covering the whole image.
        tau: mass kept by each head's mask (DINO: 0.6).
        at: ``"image"`` upsamples the head masks to the ground truth (nearest, as DINO); ``"grid"`` pools the
            ground truth onto the grid (a patch is in the object when at least half its area is).
    """
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4:
        raise VitscopeError("maps", f"shape {tuple(maps.shape)}", "pass (batch, heads, rows, cols)")
    B, Hh, rows, cols = maps.shape
    gt = _gt_masks(masks, B)  # (B, K, H, W)
    pred = mass_mask(maps, tau)  # (B, heads, rows, cols)
    if at == "image":
        pred = F.interpolate(pred.float(), size=gt.shape[-2:], mode="nearest") > 0.5  # (B, heads, H, W)
    elif at == "grid":
        gt = F.interpolate(gt.float(), size=(rows, cols), mode="area") >= 0.5  # (B, K, rows, cols)
    else:
        raise VitscopeError("at", f"unknown value {at!r}", "use 'image' or 'grid'")
    p = pred[:, None].reshape(B, 1, Hh, -1)  # (B, 1, heads, pix)
    g = gt[:, :, None].reshape(B, gt.shape[1], 1, -1)  # (B, K, 1, pix)
    inter = (p & g).sum(dim=-1).double()
    union = (p | g).sum(dim=-1).double()
    per_head = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    best, best_head = per_head.max(dim=-1)
    return JaccardResult(per_head=per_head, best=best, best_head=best_head)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: float = 0.0) -> torch.Tensor:
    """Pointing game hits ``(batch,)`` bool (any object, for ``(batch, objects, H, W)`` masks).

    The point is the centre of the map's maximal patch (first one on ties), in ground-truth pixels:
    ``((r + 0.5) H / rows, (c + 0.5) W / cols)``. It is a hit when a ground-truth pixel centre lies within
    ``tolerance`` pixels of it; with ``tolerance=0`` the pixel containing the point must be in the mask.
    """
    if maps.dim() != 3:
        raise VitscopeError("maps", f"shape {tuple(maps.shape)}", "pass (batch, rows, cols)")
    B, rows, cols = maps.shape
    gt = _gt_masks(masks, B).any(dim=1)  # (B, H, W)
    H, W = gt.shape[-2:]
    flat = maps.reshape(B, -1).argmax(dim=-1)
    r, c = flat // cols, flat % cols
    y = (r.double() + 0.5) * H / rows  # (B,) point in pixel coordinates
    x = (c.double() + 0.5) * W / cols
    hits = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        if tolerance <= 0:
            iy, ix = min(int(y[b]), H - 1), min(int(x[b]), W - 1)
            hits[b] = bool(gt[b, iy, ix])
            continue
        ys, xs = torch.nonzero(gt[b], as_tuple=True)
        if ys.numel():
            d2 = (ys.double() + 0.5 - y[b]) ** 2 + (xs.double() + 0.5 - x[b]) ** 2
            hits[b] = bool(d2.min() <= tolerance**2)
    return hits


@dataclass
class PerturbationResult:
    """Deletion/insertion curves.

    Attributes:
        fractions: ``(steps + 1,)`` share of patches perturbed at each step (0 .. 1).
        scores: ``(batch, steps + 1)`` target probability (or the callable's score) at each step.
        auc: ``(batch,)`` trapezoid area under ``scores`` over ``fractions``.
        target: ``(batch,)`` classes used (``None`` for a callable target).
    """

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor
    target: torch.Tensor | None


def perturbation_auc(
    model: Any,
    images: Any,
    maps: torch.Tensor,
    target: Any = None,
    *,
    mode: Literal["deletion", "insertion"] = "deletion",
    steps: int = 10,
    baseline: float | torch.Tensor = 0.0,
    descending: bool = True,
    batch_size: int = 64,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> PerturbationResult:
    """Deletion or insertion curve of each image and its area (see the module docstring).

    At step ``s`` the top ``k_s = round(s / steps * P)`` patches by the map (ties: lower index first) are
    replaced by ``baseline`` (deletion) or are the only ones kept from the image over a ``baseline`` canvas
    (insertion). ``baseline`` is in the model's normalised pixel space: ``0.0`` is the dataset mean colour,
    as in Chefer et al.'s perturbation test (which zeroes normalised pixels). ``descending=False`` orders
    patches from least to most relevant (Chefer's "negative" perturbation).

    Args:
        model: a `VitModel`, spec or classifier module.
        images: anything `vitscope.capture` takes.
        maps: ``(batch, rows, cols)`` on the model's patch grid for these images.
        target: class index (default: the class predicted on the unperturbed image), one per image, or a
            callable on the model output returning one score per image (tracked as is, no softmax).
        mode: ``"deletion"`` or ``"insertion"``.
        steps: number of steps (the curve has ``steps + 1`` points).
        baseline: replacement value (scalar or a tensor broadcastable to ``(C, H, W)``).
        batch_size: perturbed images per forward pass.
    """
    from vitscope.adapters import as_vit
    from vitscope.capture.hooks import eval_mode
    from vitscope.methods._gradients import resolve_classes

    if mode not in ("deletion", "insertion"):
        raise VitscopeError("mode", f"unknown value {mode!r}", "use 'deletion' or 'insertion'")
    if steps < 1:
        raise VitscopeError("steps", f"{steps} < 1", "use at least 1 step")
    vit = as_vit(model)
    pixels = vit.preprocess(images, policy=policy, size=size).to(vit.device, vit.dtype)
    B, _, Hpx, Wpx = pixels.shape
    rows, cols = vit.grid_for((Hpx, Wpx))
    if tuple(maps.shape) != (B, rows, cols):
        raise VitscopeError(
            "maps", f"shape {tuple(maps.shape)} but the images give ({B}, {rows}, {cols})",
            "compute the maps on the same images and preprocessing",
        )
    ph, pw = vit.info.patch_size
    P = rows * cols
    order = torch.sort(maps.reshape(B, P).float(), dim=-1, descending=descending, stable=True).indices  # (B, P)
    ks = [round(s / steps * P) for s in range(steps + 1)]
    canvas = torch.broadcast_to(torch.as_tensor(baseline, dtype=pixels.dtype, device=pixels.device), pixels.shape[1:])
    # patch mask to pixels: (B, P) -> (B, 1, H, W) over the patch-covered area
    covered = torch.zeros(B, 1, Hpx, Wpx, dtype=torch.bool, device=pixels.device)
    covered[:, :, : rows * ph, : cols * pw] = True

    with torch.no_grad(), eval_mode(vit.module):
        out0 = vit(pixels)
        classes = resolve_classes(vit, out0, target)

        def score(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            out = vit(x)
            if classes is None:
                s = target(out)
                return s.reshape(s.shape[0], -1).sum(dim=1).double() if s.dim() > 1 else s.double().reshape(-1)
            logits = vit.logits(out)
            assert logits is not None
            return logits.double().softmax(dim=-1).gather(1, classes[idx, None])[:, 0]

        jobs = []  # (image index, step) for every perturbed image
        for b in range(B):
            for s in range(steps + 1):
                jobs.append((b, s))
        curve = torch.empty(B, steps + 1, dtype=torch.float64)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            idx = torch.tensor([b for b, _ in chunk], device=pixels.device)
            sel = torch.zeros(len(chunk), P, dtype=torch.bool, device=pixels.device)
            for n, (b, s) in enumerate(chunk):
                sel[n, order[b, : ks[s]]] = True
            grid_mask = sel.reshape(-1, 1, rows, cols).float()
            pix_mask = F.interpolate(grid_mask, scale_factor=(ph, pw), mode="nearest") > 0.5  # (n, 1, rows*ph, cols*pw)
            full = torch.zeros(len(chunk), 1, Hpx, Wpx, dtype=torch.bool, device=pixels.device)
            full[:, :, : rows * ph, : cols * pw] = pix_mask
            imgs = pixels[idx]
            if mode == "deletion":
                x = torch.where(full, canvas, imgs)
            else:  # insertion: pixels outside the patch grid (a crop remainder) stay as in the image
                x = torch.where(full | ~covered[idx], imgs, canvas)
            vals = score(x, idx).cpu()
            for n, (b, s) in enumerate(chunk):
                curve[b, s] = vals[n]
    fractions = torch.tensor([k / P for k in ks], dtype=torch.float64)
    auc = torch.trapezoid(curve, fractions, dim=-1)
    return PerturbationResult(fractions=fractions, scores=curve, auc=auc, target=classes)
