"""From images and a model to a figure in one call (what ``vitscope figure`` and ``vitscope demo`` run).

Each kind captures only what it needs, computes its maps with `vitscope.methods`, and hands arrays to the
figure functions in `vitscope.viz.figures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vitscope.errors import VitscopeError
from vitscope.viz._render import Upsample, display_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Figure kinds, with what each shows.
KINDS: dict[str, str] = {
    "heads": "one query's attention per head of one layer (optional DINO mask contours)",
    "panel": "image | head-mean attention | attention rollout",
    "grid": "layers x heads grid of one query's attention",
    "batch": "several images with their maps (image x normalised map)",
    "distance": "mean attention distance per head across layers, spread over images",
    "norms": "histogram of token norms with the high-norm outliers marked",
}


def _one(images: Sequence[Any], kind: str) -> Any:
    if len(images) != 1:
        raise VitscopeError("images", f"figure {kind!r} shows one image, got {len(images)}", "pass one image")
    return images[0]


def make_figure(
    kind: str,
    images: Sequence[Any],
    model: Any = "vitscope:shapes",
    *,
    layer: int = -1,
    layers: Sequence[int] | None = None,
    query: str | int | tuple[int, int] | None = None,
    cmap: str = "inferno",
    alpha: float = 0.6,
    shared_scale: bool = True,
    mask_tau: float | None = None,
    mode: Upsample = "bilinear",
    policy: str | None = None,
    method: str = "rollout",
    titles: Sequence[str] | None = None,
    size: int | tuple[int, int] | None = None,
) -> Figure:
    """Capture ``images`` with ``model`` and draw figure ``kind`` (one of `KINDS`).

    ``layer``/``query`` pick the map for ``heads``, ``panel`` (head mean), ``grid`` and ``norms``
    (``layer`` only); ``layers`` restricts ``grid``; ``method`` (``"rollout"`` or ``"cls"``) is the map of
    ``batch``. Images are captured one at a time, so they may differ in size. ``policy``/``size`` size the
    images for the model as in `vitscope.capture`.
    """
    from vitscope.adapters import as_vit
    from vitscope.capture import capture
    from vitscope.images import load_image
    from vitscope.methods import cls_map, mean_attention_distance, rollout, token_norms
    from vitscope.methods.artifacts import outlier_threshold
    from vitscope.viz import figures

    if kind not in KINDS:
        raise VitscopeError("kind", f"unknown figure {kind!r}", f"use one of {', '.join(KINDS)}")
    if not images:
        raise VitscopeError("images", "no images given", "pass at least one image")
    vit = as_vit(model)
    used_policy = (policy or vit.info.preprocess.policy) if size is None else None  # a size spans the image
    pils = [load_image(im, f"images[{i}]") for i, im in enumerate(images)]

    if kind == "heads":
        img = _one(pils, kind)
        attn = capture(vit, img, layers=[layer], queries=None if query == "mean" else (query or _default_q(vit)),
                       policy=policy, size=size)  # type: ignore[arg-type]
        return figures.head_grid(
            img, attn, layer=layer, query=query, cmap=cmap, alpha=alpha, shared_scale=shared_scale,
            mask_tau=mask_tau, mode=mode, policy=used_policy,
        )
    if kind == "grid":
        img = _one(pils, kind)
        attn = capture(vit, img, layers=layers, queries=None if query == "mean" else (query or _default_q(vit)),
                       policy=policy, size=size)  # type: ignore[arg-type]
        return figures.layer_head_grid(
            img, attn, query=query, cmap=cmap, alpha=alpha, mode=mode, shared_scale=shared_scale,
            policy=used_policy,
        )
    if kind == "panel":
        img = _one(pils, kind)
        attn = capture(vit, img, queries=None, policy=policy, size=size)  # type: ignore[arg-type]
        shown = display_image(img, attn, used_policy)
        absolute = attn.layers[attn.layer_position(layer)]
        mean_name = f"head mean, layer {absolute}"
        maps = {mean_name: cls_map(attn, layer=layer, head="mean", query=query)[0], "rollout": rollout(attn, query=query)[0]}
        labels = {mean_name: "attention weight (mean over heads)", "rollout": "rollout weight (attention flow)"}
        return figures.map_panel(shown, maps, cmap=cmap, alpha=alpha, mode=mode, labels=labels)
    if kind == "batch":
        if method not in ("rollout", "cls"):
            raise VitscopeError("method", f"unknown map {method!r} for the batch figure", "use 'rollout' or 'cls'")
        shown_all, maps_all = [], []
        for img in pils:
            attn = capture(vit, img, queries=None if method == "rollout" else (query or _default_q(vit)),
                           layers=None if method == "rollout" else [layer], policy=policy, size=size)  # type: ignore[arg-type]
            m = rollout(attn, query=query)[0] if method == "rollout" else cls_map(attn, layer=layer, query=query)[0]
            maps_all.append(m.detach().float().cpu().numpy())
            shown_all.append(display_image(img, attn, used_policy))
        absolute = layer + vit.info.num_layers if layer < 0 else layer
        name = "rollout" if method == "rollout" else f"layer-{absolute} attention (head mean)"
        same = len({m.shape for m in maps_all}) == 1  # else each map on its own grid (native aspect ratios)
        return figures.batch_maps(shown_all, np.stack(maps_all) if same else maps_all, titles=titles, mode=mode, cmap=cmap, alpha=alpha,
                                  map_name=name)
    if kind == "distance":
        per_image, inputs = [], set()
        for img in pils:
            attn = capture(vit, img, queries=None, policy=policy, size=size)  # type: ignore[arg-type]
            per_image.append(mean_attention_distance(attn, per_image=True)[:, 0].numpy())  # (layers, heads)
            inputs.add(tuple(attn.image_size))
        d = np.stack(per_image)  # (images, layers, heads)
        title = f"mean attention distance ({len(pils)} image{'s' if len(pils) > 1 else ''})"
        (h, w), = inputs if len(inputs) == 1 else ((None, None),)
        unit = f"pixels of the {h}x{w} model input" if h is not None else "pixels of the model input"
        return figures.distance_plot(d, layers=list(range(vit.info.num_layers)), title=title, unit=unit)
    # norms: one batch, so the outlier fit (a 2-Gaussian mixture per layer) sees every image's patches
    attn = capture(vit, pils, layers=[layer], queries="cls" if "cls" in vit.info.prefix else None, heads="mean",
                   token_norms=True, policy=policy, size=size)  # type: ignore[arg-type]
    report = token_norms(attn)
    absolute = layer + vit.info.num_layers if layer < 0 else layer
    title = f"patch token norms after block {absolute} ({len(pils)} image{'s' if len(pils) > 1 else ''})"
    norms = report.patch_norms[absolute].numpy()
    real = ~np.isnan(norms)  # a padded batch (images at their own aspect ratios): each image's own patches
    norms = norms[real]
    cut = float(report.threshold[absolute])
    if math.isfinite(cut):  # token_norms split the layer into two populations: its cut and its outliers
        return figures.norm_histogram(
            norms, outliers=report.outliers[absolute].numpy()[real], threshold=cut, title=title,
            threshold_label=f"token_norms threshold {cut:.3g} (2-Gaussian fit)",
        )
    # no separate high-norm population: mark the tail past Tukey's far fence (methods.artifacts.outlier_threshold)
    fence = outlier_threshold(norms)
    return figures.norm_histogram(
        norms, threshold=fence, title=title, threshold_label=f"Tukey's far fence q75 + 3 IQR = {fence:.3g}",
        note="token_norms: no separate high-norm mode here; red: the tail past the fence",
    )


def _default_q(vit: Any) -> str | None:
    """What ``query=None`` means for capture: the [CLS] row, or every row for models without one."""
    return "cls" if "cls" in vit.info.prefix else None
