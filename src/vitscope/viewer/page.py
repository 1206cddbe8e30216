"""`Viewer`: one self-contained HTML page (inline JS, CSS, data and images; no network) for notebooks and files.

One renderer (``viewer.js``, shipped as package data) serves both: `Viewer.save` writes the page, and
`Viewer._repr_html_` shows the same page in Jupyter inside a sandboxed ``<iframe srcdoc>``. A page may hold
several images (`view_many`, ``vitscope demo``): one data block per image and an image picker on the page.
One style sheet (``viewer.css``, `STYLE`) styles every vitscope page: the viewer and the pages of
``vitscope serve`` (`render_plain_page`).
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.viewer.pack import BUDGET_BYTES, Dtype, pack

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@cache
def asset(name: str) -> str:
    """Text of a packaged viewer file (``viewer.js``, ``viewer.css``, ``viewer.html``)."""
    return (resources.files("vitscope.viewer") / name).read_text(encoding="utf-8")


def json_for_script(payload: dict[str, Any]) -> str:
    """JSON safe inside ``<script type="application/json">``: ``<``, ``>``, ``&`` escaped as ``\\u00XX``."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def style() -> str:
    """The style sheet of every vitscope page (``viewer.css``): the viewer's and the server's pages share it."""
    return asset("viewer.css")


def render_page(payload: dict[str, Any] | Sequence[dict[str, Any]], header_html: str = "") -> str:
    """The whole page for ``payload`` (from `vitscope.viewer.pack.pack`), or for several payloads (one per
    image: the page shows an image picker). ``header_html`` is trusted markup placed above the viewer (the
    server's upload form)."""
    from vitscope._version import __version__

    payloads = [payload] if isinstance(payload, Mapping) else list(payload)
    if not payloads:
        raise VitscopeError("payload", "no image to show", "pass at least one packed image")
    title = str(payloads[0].get("title", "vitscope"))
    if len(payloads) > 1:
        title = f"{title} and {len(payloads) - 1} more"
    parts = {
        "version": __version__,
        "title": html.escape(title),
        "css": style(),
        "js": asset("viewer.js"),
        "header": header_html,
        "data": "\n".join(
            f'<script type="application/json" class="vitscope-data">{json_for_script(p)}</script>' for p in payloads
        ),
    }
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], asset("viewer.html"))


def render_plain_page(title: str, body_html: str) -> str:
    """A page without the viewer (the server's upload form and error pages) in the viewer's style.
    ``title`` is escaped here; ``body_html`` is trusted markup."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "form-action 'self'\">"
        f"<style>\n{style()}\n</style></head>"
        f'<body class="vitscope-page">{body_html}</body></html>'
    )


class Viewer:
    """An interactive attention viewer for one image, or several (`Viewer.combine`, `view_many`: the page has
    an image picker).

    Build it with `Viewer.from_attentions` or `vitscope.viewer.view`; display it in Jupyter (it has a
    ``_repr_html_``) or write it with `save`. The page works offline from a ``file://`` URL.

    Example:
        >>> from vitscope.viewer import view
        >>> v = view("cat.png", model="vitscope:shapes")      # doctest: +SKIP
        >>> v.save("cat.html")                                 # doctest: +SKIP
    """

    def __init__(self, payload: dict[str, Any], *more: dict[str, Any]) -> None:
        #: one packed payload per image; `payload` is the first
        self.payloads: list[dict[str, Any]] = [payload, *more]

    @property
    def payload(self) -> dict[str, Any]:
        """The (first) image's packed data."""
        return self.payloads[0]

    @classmethod
    def combine(cls, viewers: Sequence[Viewer]) -> Viewer:
        """One page holding every image of ``viewers``, in order, with an image picker."""
        payloads = [p for v in viewers for p in v.payloads]
        if not payloads:
            raise VitscopeError("viewers", "no viewer to combine", "pass at least one Viewer")
        return cls(*payloads)

    @classmethod
    def from_attentions(
        cls,
        attn: Attentions,
        image: Any,
        *,
        batch: int = 0,
        dtype: Dtype = "uint8",
        budget_bytes: int = BUDGET_BYTES,
        residual: float = 0.5,
        cmap: str = "inferno",
        policy: str | None = None,
        title: str | None = None,
        labels: list[str] | None = None,
        maps: Mapping[str, Any] | None = None,
        features: dict[str, Any] | None = None,
    ) -> Viewer:
        """Pack ``attn`` (image ``batch``) and ``image``; see `vitscope.viewer.pack.pack` for the options
        (``features``: `vitscope.viewer.pack.pack_features`, for the PCA and similarity tabs)."""
        return cls(
            pack(
                attn, image, batch=batch, dtype=dtype, budget_bytes=budget_bytes, residual=residual, cmap=cmap,
                policy=policy, title=title, labels=labels, maps=maps, features=features,
            )
        )

    @property
    def notes(self) -> list[str]:
        """What the page says about what was left out."""
        return [n for p in self.payloads for n in p.get("notes", [])]

    def to_html(self, header_html: str = "") -> str:
        """The page's HTML; ``header_html`` is trusted markup placed above the viewer."""
        return render_page(self.payloads, header_html)

    def _repr_html_(self) -> str:
        page = html.escape(self.to_html(), quote=True)
        return (
            f'<iframe srcdoc="{page}" sandbox="allow-scripts" title="vitscope viewer" '
            'style="width:100%;height:760px;border:0"></iframe>'
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the page to ``path`` atomically; returns the path."""
        from vitscope._io import atomic_write_text

        return atomic_write_text(path, self.to_html())

    def __repr__(self) -> str:
        p = self.payload
        rows, cols = p["grid"]
        more = f", images={len(self.payloads)}" if len(self.payloads) > 1 else ""
        if p.get("video"):  # a video: one frame's grid and the time axis
            vid = p["video"]
            rows, cols = vid["frame_grid"]
            more = f", frames={vid['input_frames']} ({vid['frames']} token frames of {vid['tubelet']}){more}"
        return (
            f"Viewer({p['title']!r}, grid={rows}x{cols}, layers={len(p['layers'])}/{p['num_layers']}, "
            f"heads={p['heads']}, rollout={p['rollout'] is not None}{more})"
        )


def top_labels(vit: Any, output: Any, k: int = 3) -> list[str]:
    """``["prediction: cat 0.91, dog 0.05, ..."]`` when the model has a classifier, else ``[]``."""
    import torch

    logits = vit.logits(output)
    if logits is None or logits.dim() != 2:
        return []
    probs = torch.softmax(logits[0].float(), dim=-1)
    k = min(k, probs.shape[0])
    vals, idx = probs.topk(k)
    names = vit.info.labels
    items = [
        f"{names[i] if names is not None and i < len(names) else f'class {i}'} {v:.2f}"
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
    ]
    return ["prediction: " + ", ".join(items)]


#: what `view` draws for a target
GRADIENT_METHODS = ("chefer", "legrad", "grad_rollout", "attn_gradcam")


def view(
    image: Any,
    model: Any = "vitscope:shapes",
    *,
    policy: str | None = None,
    size: int | tuple[int, int] | None = None,
    dtype: Dtype = "uint8",
    budget_bytes: int = BUDGET_BYTES,
    residual: float = 0.5,
    cmap: str = "inferno",
    title: str | None = None,
    target: Any = None,
    methods: Sequence[str] = GRADIENT_METHODS,
    feature_layer: int | None = -1,
) -> Viewer:
    """Capture every layer, head and query row of ``model`` on ``image`` and build its `Viewer`.

    With a video model (VideoMAE, ViViT, V-JEPA 2), ``image`` is one video and the page has a time slider
    (`view_video`; no gradient maps or feature tabs).

    Args:
        image: path, PIL image or array (one image); for a video model a frames folder, a list of frames or
            pixel values ``(1, T, C, H, W)``.
        model: a `VitModel` or a spec (``"vitscope:shapes"``, ``"hf:..."``, ``"timm:..."``, a folder).
        policy, size: how the image is sized for the model (see `vitscope.capture`).
        target: a gradient methods' target (`vitscope.methods.targets`: a class index or name,
            ``"text:a cat"`` or a list of prompts, ``"image:ref.png"``, ``"patch:R,C"``); the page then shows
            each of ``methods``' map for it (one per prompt) as a method of its own. ``None``: no gradient maps.
        methods: the gradient methods drawn for ``target``.
        feature_layer: the block whose output features the PCA and similarity tabs show (after the model's
            final norm, `vitscope.methods.features`); ``None`` leaves the feature tabs out.
    """
    from vitscope.adapters import as_vit
    from vitscope.capture.core import capture_full
    from vitscope.images import load_image

    vit = as_vit(model)
    if vit.info.frames:  # a video model: the page gets a time slider
        if target is not None:
            raise VitscopeError("target", f"{vit.info.name} is a video model: its viewer shows attention and "
                                "rollout, not gradient maps", "drop target, or use vitscope.video_maps(..., target=...)")
        return view_video(image, vit, policy=policy, size=size, dtype=dtype, budget_bytes=budget_bytes,
                          residual=residual, cmap=cmap, title=title)
    img = load_image(image)
    res = capture_full(vit, img, queries=None, heads="all", policy=policy, size=size)  # type: ignore[arg-type]
    used_policy = policy or vit.info.preprocess.policy
    if title is None:
        title = Path(os.fspath(image)).name if isinstance(image, (str, os.PathLike)) else vit.info.name
    maps = gradient_maps(vit, img, target, methods, policy=policy, size=size) if target is not None else None
    features = None if feature_layer is None else feature_views(vit, res.pixel_values, feature_layer)
    return Viewer.from_attentions(
        res.attentions, img, dtype=dtype, budget_bytes=budget_bytes, residual=residual, cmap=cmap,
        policy=used_policy if size is None else None, title=title, labels=top_labels(vit, res.output), maps=maps,
        features=features,
    )


def view_video(
    video: Any,
    model: Any,
    *,
    policy: str | None = None,
    size: int | tuple[int, int] | None = None,
    dtype: Dtype = "uint8",
    budget_bytes: int = BUDGET_BYTES,
    residual: float = 0.5,
    cmap: str = "inferno",
    title: str | None = None,
) -> Viewer:
    """The viewer of one video: every layer, head and space-time query row of a video model, with a frame
    slider (and play button) over the input frames, each showing the token frame that covers it (``t //
    tubelet``); hovering a patch of the shown frame makes that space-time token the query, its row drawn on the
    frame, on a strip of every token frame and as its attention mass per frame.

    Args:
        video: a frames folder, a list of frames or pixel values ``(1, T, C, H, W)`` (`vitscope.video`).
        model: a video `VitModel` or a spec (``"hf:<VideoMAE / ViViT / V-JEPA 2 folder>"``).
        Others: as `view` (the size budget as `vitscope.viewer.pack.pack`: past it fewer layers, then the head
        mean are stored).
    """
    from vitscope.adapters import as_vit
    from vitscope.capture.core import capture_full
    from vitscope.viz.video import frames_rgb

    vit = as_vit(model)
    if not vit.info.frames:
        raise VitscopeError("model", f"{vit.info.name} is an image model: it has no frames",
                            "use vitscope.viewer.view(image, model) for images")
    res = capture_full(vit, video, queries=None, heads="all", policy=policy, size=size)  # type: ignore[arg-type]
    B = int(res.pixel_values.shape[0])
    if B != 1:
        raise VitscopeError("image", f"{B} videos given", "view one video at a time")
    prep = vit.info.preprocess
    rgb = frames_rgb(res.pixel_values.detach().float().cpu(), prep.mean, prep.std)  # (T, H, W, 3) as the model saw
    if title is None:
        title = Path(os.fspath(video)).name if isinstance(video, (str, os.PathLike)) else vit.info.name
    return Viewer.from_attentions(
        res.attentions, rgb, dtype=dtype, budget_bytes=budget_bytes, residual=residual, cmap=cmap, title=title,
        labels=top_labels(vit, res.output),
    )


def gradient_maps(vit: Any, image: Any, target: Any, methods: Sequence[str], *, policy: str | None = None,
                  size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """``{"<method> <target>": map (rows, cols)}`` for one image: each method's map per target (several
    prompts: one map each, `vitscope.methods.targets`)."""
    from vitscope.methods.api import maps as run

    out: dict[str, Any] = {}
    for name in methods:
        result = run(vit, image, name, target=target, policy=policy, size=size)  # type: ignore[arg-type]
        labels = result.meta.get("target")
        labels = labels if isinstance(labels, list) and len(labels) == len(result.map) else [target]
        for m, label in zip(result.map, labels, strict=True):
            out[f"{name} {label}"] = m
    return out


def feature_views(vit: Any, pixels: Any, layer: int = -1) -> dict[str, Any] | None:
    """The packed feature views (`vitscope.viewer.pack.pack_features`) of the first image of ``pixels``:
    block ``layer``'s patch features after the final norm, their PCA colours (fitted on this image); ``None``
    for a one-patch image (nothing to fit or compare)."""
    from vitscope.methods.features import patch_features
    from vitscope.methods.pca import pca_rgb
    from vitscope.viewer.pack import pack_features

    feats = patch_features(vit, pixels[:1], layer=layer)
    if feats.layout.num_patches < 2:
        return None
    rgb, _, _ = pca_rgb(feats.patches)
    return pack_features(feats.patches[0], rgb[0], layer=feats.layer, norm=feats.norm)


def view_many(
    images: Mapping[str, Any],
    model: Any = "vitscope:shapes",
    *,
    policy: str | None = None,
    size: int | tuple[int, int] | None = None,
    dtype: Dtype = "uint8",
    budget_bytes: int = BUDGET_BYTES,
    residual: float = 0.5,
    cmap: str = "inferno",
    target: Any = None,
) -> Viewer:
    """One page for several images (title -> image), with an image picker: `view` for each, the size budget
    shared between them (each image gets ``budget_bytes // len(images)``, so the page's attention arrays stay
    within ``budget_bytes`` in all)."""
    from vitscope.adapters import as_vit

    if not images:
        raise VitscopeError("images", "no image given", "pass at least one image")
    vit = as_vit(model)
    share = int(budget_bytes) // len(images)
    return Viewer.combine([
        view(img, vit, policy=policy, size=size, dtype=dtype, budget_bytes=share, residual=residual, cmap=cmap,
             title=str(name), target=target)
        for name, img in images.items()
    ])
