"""``vitscope report MODEL``: what a trained vitscope ViT learned, as markdown + PNGs.

Sections:

1. Accuracy on freshly generated ``shapes`` images (a seed the model never trained on), per class.
2. Mean attention distance of every head across layers (Dosovitskiy et al. 2021, Fig. 7): the average pixel
   distance between a query patch and the patches it attends to, weighted by attention.
3. Attention rollout (Abnar & Zuidema 2020) over sample images.
4. Where ground-truth masks exist (shapes), the attention methods compared on localisation: pointing game
   (Zhang et al. 2016), mask IoU (DINO's Jaccard of the 60%-mass mask, Caron et al. 2021), and deletion /
   insertion AUC (Petsiuk et al. 2018: lower deletion and higher insertion are better).

Models that are not shapes classifiers get sections 2-3 on the packaged sample photos only.
Everything is computed first, then each file is written atomically into ``output``. A folder holding files
vitscope did not write is refused unless ``overwrite`` (then the report is written beside them; none of them is
ever replaced: `vitscope._io.claim_output`).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscope.errors import VitscopeError

#: The files a report writes into its folder.
REPORT_FILES = ("attention_distance.png", "rollout.png", "metrics.json", "report.md")
#: Width (patches) of the Gaussian of the smoothed pointing game (see `vitscope.methods.smooth`).
SMOOTH_SIGMA = 1.0


@dataclass
class ShapesBatch:
    """Freshly generated shapes images: uint8 ``images (B, H, W, 3)``, ``labels (B,)``, bool ``masks (B, H, W)``."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def pixels(self, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """Normalised pixel values ``(B, 3, H, W)``."""
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255.0
        m = torch.tensor(list(mean)[:3], dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(list(std)[:3], dtype=torch.float32).view(1, -1, 1, 1)
        return (x - m) / s


def shapes_batch(n: int, image_size: tuple[int, int], seed: int = 2024, split: str = "test") -> ShapesBatch:
    """``n`` shapes images of ``seed`` (default the ``test`` split: never used in training)."""
    from vitscope.train.shapes import render_shape

    samples = [render_shape(seed, i, image_size, split) for i in range(n)]
    return ShapesBatch(
        images=np.stack([s.image for s in samples]), labels=np.array([s.label for s in samples], dtype=np.int64),
        masks=np.stack([s.mask for s in samples]),
    )


@torch.no_grad()
def predict(vit: Any, pixels: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Predicted classes ``(B,)`` of a `VitModel` on normalised pixels."""
    from vitscope.capture.hooks import eval_mode

    out = []
    with eval_mode(vit.module):
        for i in range(0, pixels.shape[0], batch_size):
            logits = vit.logits(vit(pixels[i : i + batch_size].to(vit.device, vit.dtype)))
            if logits is None:
                raise VitscopeError("model", "it has no classification head", "report needs a classifier")
            out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


def method_maps(name: str, ctx: Any, target: torch.Tensor | None) -> torch.Tensor:
    """Maps ``(B, rows, cols)`` of registered method ``name`` on a prepared `MapContext` (its captures are shared
    by every method of the report); gradient methods explain ``target`` (default the prediction)."""
    from vitscope.methods.api import compute, get_method

    params = {"target": target.tolist()} if target is not None and "target" in get_method(name).params else {}
    return compute(ctx, name, **params).map


@dataclass
class Report:
    """Numbers of a report (also written as ``metrics.json``)."""

    model: str
    accuracy: float | None = None
    per_class: dict[str, float] = field(default_factory=dict)
    images: int = 0
    distance: list[list[float]] = field(default_factory=list)  # (layers, heads) pixels
    localisation: dict[str, dict[str, float]] = field(default_factory=dict)
    localisation_images: int = 0
    seconds: float = 0.0


def model_report(
    model: Any = "vitscope:shapes",
    output: str | os.PathLike[str] = "report",
    *,
    images: int = 1000,
    localisation_images: int = 100,
    samples: int = 8,
    seed: int = 2024,
    methods: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> Report:
    """Write the report of ``model`` into the folder ``output`` and return its numbers.

    Args:
        model: a spec (``"vitscope:shapes"``, a run folder) or a `VitModel`.
        images: fresh shapes images for the accuracy.
        localisation_images: images for the method comparison (each method runs on all of them).
        samples: images shown in the rollout figure.
        seed: seed of the fresh images (the ``test`` split of the shapes generator).
        methods: registered methods to compare (default: every registered attribution map; feature views such as
            ``pca`` are left out unless named).
        overwrite: write into a folder that holds files vitscope did not write (they are kept; the report's own
            files, ``REPORT_FILES``, must not be among them). Without it such a folder is refused.
    """
    from vitscope import methods as M
    from vitscope._io import atomic_write_bytes, claim_output
    from vitscope.adapters import VitModel, load
    from vitscope.capture.core import capture
    from vitscope.images import pixels_to_rgb
    from vitscope.methods.api import get_method, method_names
    from vitscope.methods.registry import MapContext
    from vitscope.train.shapes import SHAPE_CLASSES

    say = log or (lambda s: None)
    t0 = time.monotonic()
    # the default compares the attribution maps; feature views (pca, similarity) are pictures of the features,
    # not a claim about where the class is, so a pointing game on them would mean nothing
    chosen = list(methods) if methods is not None else [
        m for m in method_names() if get_method(m).needs != "features"]
    unknown = [m for m in chosen if m not in method_names()]
    if unknown:
        raise VitscopeError("methods", f"unknown {unknown}", f"choose from {', '.join(method_names())}")
    for arg, value, least in (("images", images, 0), ("localisation_images", localisation_images, 0),
                              ("samples", samples, 1)):
        if value < least:
            raise VitscopeError(arg, f"must be >= {least}, got {value}", f"pass a number >= {least}")
    out = Path(output)
    dest = claim_output(out, "report", overwrite=overwrite)  # refused before the model is even loaded
    dest.check_writes(REPORT_FILES)
    vit = load(model) if not isinstance(model, VitModel) else model
    name = model if isinstance(model, str) else vit.info.name
    info = vit.info
    prep = info.preprocess
    is_shapes = tuple(info.labels or ()) == SHAPE_CLASSES and prep.channels == 3
    rep = Report(model=str(name))
    files: dict[str, bytes] = {}  # written at the end, once everything is computed
    if is_shapes:
        n_all = max(images, localisation_images, samples)
        say(f"generating {n_all} shapes images (seed {seed})")
        data = shapes_batch(n_all, tuple(prep.image_size), seed)  # type: ignore[arg-type]
        pixels = data.pixels(prep.mean, prep.std)
        if images > 0:
            pred = predict(vit, pixels[:images])
            labels = torch.from_numpy(data.labels[:images])
            rep.images = images
            rep.accuracy = float((pred == labels).float().mean())
            for k, cls in enumerate(SHAPE_CLASSES):
                sel = labels == k
                if sel.any():
                    rep.per_class[cls] = float((pred[sel] == k).float().mean())
        show = data.images[:samples]
        show_masks: np.ndarray | None = data.masks[:samples]
    else:
        from importlib import resources

        sample_dir = resources.files("vitscope") / "data" / "samples"
        photos = sorted(str(p) for p in sample_dir.iterdir() if str(p).endswith((".jpg", ".png")))[:samples]
        pixels = vit.preprocess(photos, policy="resize")
        show = pixels_to_rgb(pixels, prep.mean, prep.std)
        show_masks = None
        data = None

    say("mean attention distance")
    n_dist = min(64, pixels.shape[0])
    attn_d = capture(vit, pixels[:n_dist])
    dist = M.mean_attention_distance(attn_d)  # (layers, heads)
    rep.distance = dist.tolist()
    files["attention_distance.png"] = _distance_figure(dist.numpy())

    say("rollout figure")
    attn_s = capture(vit, pixels[: len(show)])
    roll = M.rollout(attn_s)
    titles = [_title(info.labels, p) for p in predict(vit, pixels[: len(show)]).tolist()]
    files["rollout.png"] = _rollout_figure(show, roll.numpy(), show_masks, titles=titles)

    if data is not None and localisation_images > 0:
        n = localisation_images
        px, masks = pixels[:n], torch.from_numpy(data.masks[:n])
        target = torch.from_numpy(data.labels[:n])
        ctx = MapContext(vit, px.to(vit.device, vit.dtype))
        rep.localisation_images = n
        for mname in chosen:
            say(f"localisation: {mname}")
            t = time.monotonic()
            maps = method_maps(mname, ctx, target).float()
            maps = torch.nan_to_num(maps, nan=0.0)
            row = {
                "pointing_game": float(M.pointing_game(maps, masks).float().mean()),
                "pointing_game_smoothed": float(
                    M.pointing_game(M.smooth(maps, SMOOTH_SIGMA), masks).float().mean()),
                "mask_iou": float(M.mask_jaccard(maps.clamp_min(0), masks).best.mean()),
                "deletion_auc": float(M.perturbation_auc(vit, px, maps, target.tolist(), mode="deletion").auc.mean()),
                "insertion_auc": float(
                    M.perturbation_auc(vit, px, maps, target.tolist(), mode="insertion").auc.mean()),
                "seconds": round(time.monotonic() - t, 2),
            }
            rep.localisation[mname] = row
    rep.seconds = round(time.monotonic() - t0, 2)
    files["metrics.json"] = json.dumps(rep.__dict__, indent=2).encode("utf-8")
    files["report.md"] = _markdown(rep, info, seed).encode("utf-8")
    for fname, blob in files.items():
        atomic_write_bytes(out / fname, blob)
    dest.record(files)
    say(f"report written to {out}")
    return rep


def _title(labels: Sequence[str] | None, k: int) -> str:
    return labels[k] if labels and 0 <= k < len(labels) else str(k)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _distance_figure(dist: np.ndarray) -> bytes:
    """Mean attention distance per head across layers: `vitscope.viz.distance_plot` (ViT paper Fig. 7)."""
    from vitscope.viz.figures import distance_plot

    return _save(distance_plot(dist))


def _rollout_figure(images: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
                    titles: Sequence[str]) -> bytes:
    """Two rows: the images (mask outline when known) and their rollout maps overlaid."""
    import torch.nn.functional as F

    B, Himg, Wimg = images.shape[:3]
    up = F.interpolate(torch.from_numpy(maps)[:, None].float(), size=(Himg, Wimg), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    fig = _figure(1.6 * B, 3.4)
    for i in range(B):
        ax = fig.add_subplot(2, B, i + 1)
        ax.imshow(images[i], interpolation="nearest")
        if masks is not None:
            ax.contour(masks[i].astype(float), levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(titles[i], fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(2, B, B + i + 1)
        ax.imshow(images[i], interpolation="nearest")
        m = up[i]
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        ax.imshow(m, cmap="inferno", alpha=0.6, interpolation="nearest")
        ax.axis("off")
    fig.tight_layout()
    return _save(fig)


def _markdown(rep: Report, info: Any, seed: int) -> str:
    lines = [f"# vitscope report: {rep.model}", "",
             f"{info.describe()}", ""]
    if rep.accuracy is not None:
        lines += ["## Accuracy", "",
                  f"**{100 * rep.accuracy:.2f}%** on {rep.images} freshly generated shapes images "
                  f"(test split, seed {seed}).", "",
                  "| class | accuracy |", "|---|---|"]
        lines += [f"| {c} | {100 * a:.1f}% |" for c, a in rep.per_class.items()]
        lines.append("")
    lines += ["## Mean attention distance", "",
              "Attention-weighted distance (pixels) between each query patch and the patches it attends to, "
              "per layer and head (Dosovitskiy et al. 2021, Fig. 7).", "",
              "![mean attention distance](attention_distance.png)", "",
              "| layer | " + " | ".join(f"head {h}" for h in range(len(rep.distance[0]) if rep.distance else 0)) + " |",
              "|---|" + "---|" * (len(rep.distance[0]) if rep.distance else 0)]
    lines += [f"| {i} | " + " | ".join(f"{d:.1f}" for d in row) + " |" for i, row in enumerate(rep.distance)]
    lines += ["", "## Attention rollout", "",
              "Top: images (white outline: ground-truth mask) with the predicted class; bottom: rollout "
              "(Abnar & Zuidema 2020; mean over heads, 0.5 A + 0.5 I).", "", "![rollout](rollout.png)", ""]
    if rep.localisation:
        lines += ["## Localisation", "",
                  f"On {rep.localisation_images} fresh images, explaining the true class. Pointing game: the "
                  "map's maximal patch lies in the object mask. Mask IoU: Jaccard of the 60%-mass mask with the "
                  "object (DINO). Smoothed: the same on the map smoothed by a Gaussian of "
                  f"{SMOOTH_SIGMA:g} patch (`vitscope.methods.smooth`; its maximum is where the mass concentrates). "
                  "Deletion (lower is better) / insertion (higher is better): area under the "
                  "true-class probability as patches are removed / inserted in the map's order (10 steps).", "",
                  "| method | pointing game | pointing game (smoothed) | mask IoU | deletion AUC ↓ | "
                  "insertion AUC ↑ | time (s) |",
                  "|---|---|---|---|---|---|---|"]
        best = max(rep.localisation.items(),
                   key=lambda kv: max(kv[1]["pointing_game"], kv[1]["pointing_game_smoothed"]))[0]
        for mname, row in rep.localisation.items():
            mark = " **(best)**" if mname == best else ""
            lines.append(f"| {mname}{mark} | {100 * row['pointing_game']:.1f}% | "
                         f"{100 * row['pointing_game_smoothed']:.1f}% | {row['mask_iou']:.3f} | "
                         f"{row['deletion_auc']:.3f} | {row['insertion_auc']:.3f} | {row['seconds']:.1f} |")
        lines.append("")
    lines.append(f"_Generated by `vitscope report` in {rep.seconds:.0f} s._")
    return "\n".join(lines) + "\n"
