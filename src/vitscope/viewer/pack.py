"""Serialising attention for the viewer: compact, lossless enough to read, and bounded in size.

Attention rows are packed as ``uint8`` with a per-row scale (``value = byte / 255 * scale[row]``, the scale is
the row maximum as float32, so the error is at most ``scale / 510``), or as ``float16``; both base64. Attention
rollout (Abnar & Zuidema 2020) for every query row is precomputed here, cumulatively per layer, because the
page cannot afford ``L`` matrix products per hover.

Feature views (``features``, optional): the PCA colours of one layer's patch features (`vitscope.methods.pca`,
``(rows, cols, 3)`` float16) and, for the click-a-patch similarity, each patch's feature scaled to unit length and
reduced to at most `FEATURE_DIMS` dimensions (the top right-singular directions of the unit features, so dot
products, the cosines, are kept as well as any projection of that size keeps them; exact when the model is no
wider), float16: ``rows * cols * 64 * 2`` bytes (32 KB for a 16 x 16 grid).

Size budget: a ViT-S/16 at 224 px with every layer and head is ``12 * 6 * 197 * 197`` bytes (~2.8 MB, ~3.7 MB
in base64). Past ``budget_bytes`` the packer stores fewer layers (evenly spaced, always the last), then only
the head mean, then only the prefix-token query rows, and says so in ``notes`` (shown on the page).

Video (``attn.frames > 1`` or ``attn.tubelet > 1``): the same arrays over the space-time tokens (``N = prefix +
T' * rows * cols + suffix``, patches in ``(T', rows, cols)`` order: the stacked grid of `vitscope.layout`), under
the same budget, plus ``video``: ``frames`` (``T'``), ``tubelet``, ``input_frames`` (``T = T' * tubelet``),
``frame_grid`` (``[rows, cols]``) and ``images`` (one JPEG data URL per input frame, longest side at most
`VIDEO_FRAME_MAX_SIDE`). The whole page is then at most ``4/3 * (budget_bytes + T * JPEG(<= 320 px))`` plus the
page's code (~60 KB): a 16-frame 224 px clip adds ~16 x 15 KB of frames.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vitscope.errors import VitscopeError, VitscopeWarning
from vitscope.methods.rollout import rollout_all_rows

if TYPE_CHECKING:
    from vitscope.attentions import Attentions

FORMAT = "vitscope-viewer/1"
#: Default cap on the packed attention arrays (raw + rollout, before base64).
BUDGET_BYTES = 6_000_000
#: Longest side of the embedded image, in pixels.
IMAGE_MAX_SIDE = 640
#: Longest side of each embedded video frame, in pixels.
VIDEO_FRAME_MAX_SIDE = 320

Dtype = Literal["uint8", "float16"]
#: Most dimensions per patch packed for the similarity view.
FEATURE_DIMS = 64


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` ``(..., K)`` >= 0 -> ``(bytes (..., K) uint8, scale (...) float32)`` with
    ``x ~ bytes / 255 * scale`` (scale = row max; an all-zero row gets scale 0)."""
    x = np.asarray(x, dtype=np.float32)
    scale = x.max(axis=-1).astype(np.float32)  # (...)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = np.clip(np.rint(x / safe * 255.0), 0, 255).astype(np.uint8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / 255.0 * scale[..., None]


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def encode_array(x: np.ndarray, dtype: Dtype) -> dict[str, Any]:
    """One array ``(..., K)`` as a JSON-ready dict: ``dtype``, ``shape``, ``data`` (base64, little-endian),
    plus ``scale`` (float32 per row) for ``uint8``."""
    if dtype == "uint8":
        q, scale = quantize_rows(x)
        return {"dtype": "uint8", "shape": list(x.shape), "data": _b64(q), "scale": _b64(scale.astype("<f4"))}
    if dtype == "float16":
        return {"dtype": "float16", "shape": list(x.shape), "data": _b64(np.asarray(x, dtype="<f2"))}
    raise VitscopeError("dtype", f"unknown dtype {dtype!r}", "use 'uint8' or 'float16'")


def decode_array(d: dict[str, Any]) -> np.ndarray:
    """Inverse of `encode_array` (what the page does in JavaScript), for tests and tools."""
    shape = tuple(d["shape"])
    raw = base64.b64decode(d["data"])
    if d["dtype"] == "uint8":
        q = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
        scale = np.frombuffer(base64.b64decode(d["scale"]), dtype="<f4").reshape(shape[:-1])
        return dequantize_rows(q, scale)
    return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)


def _bytes_per(dtype: Dtype) -> float:
    return 1.0 + 4.0 / 197 if dtype == "uint8" else 2.0  # uint8 also stores one float32 scale per row


def _spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` evenly spaced, always including the last."""
    if k >= n:
        return list(range(n))
    picks = {round(i * (n - 1) / max(1, k - 1)) for i in range(k)} if k > 1 else {n - 1}
    return sorted(picks)


@dataclass
class Plan:
    """What fits in the budget: positions of the layers, whether all heads, which query rows."""

    layer_pos: list[int]
    all_heads: bool
    query_pos: list[int] | None  # positions along the query dim; None = all captured rows
    notes: list[str] = field(default_factory=list)


def plan(attn: Attentions, budget_bytes: int, dtype: Dtype, with_rollout: bool) -> Plan:
    """Choose what to store so raw (+ rollout) attention fits ``budget_bytes``."""
    L, _B, H, Q, N = attn.weights.shape
    per = _bytes_per(dtype)

    def size(k: int, heads: int, q: int) -> float:
        return k * (heads + (1 if with_rollout else 0)) * q * N * per

    notes: list[str] = []
    for heads_all in ((True, False) if H > 1 else (True,)):
        h = H if heads_all else 1
        for k in range(L, 0, -1):
            if size(k, h, Q) <= budget_bytes:
                if k < L:
                    notes.append(
                        f"size budget ({budget_bytes / 1e6:.1f} MB): stored {k} of {L} captured layers"
                    )
                if not heads_all:
                    notes.append(f"size budget ({budget_bytes / 1e6:.1f} MB): stored the head mean only")
                return Plan(_spread(L, k), heads_all, None, notes)
    # even one layer's N x N head mean is too big: keep the prefix-token rows only
    prefix_rows = list(range(attn.num_prefix_tokens))
    if attn.queries is None:
        q_pos = prefix_rows
    else:
        q_pos = [i for i, t in enumerate(attn.queries) if t < attn.num_prefix_tokens]
    if not q_pos:
        raise VitscopeError(
            "budget_bytes", f"{N} tokens without prefix tokens do not fit {budget_bytes} bytes",
            "raise budget_bytes, use fewer layers or a smaller image",
        )
    k = L
    while k > 1 and k * H * len(q_pos) * N * per > budget_bytes:
        k -= 1
    notes.append(
        f"size budget ({budget_bytes / 1e6:.1f} MB): {N} tokens are too many to store every query row; only "
        "the prefix-token queries ([CLS], registers) are stored, hovering patches reads values only"
        + (f"; stored {k} of {L} layers" if k < L else "")
    )
    return Plan(_spread(L, k), True, q_pos, notes)


def _image_data_url(img: np.ndarray, max_side: int = IMAGE_MAX_SIDE) -> tuple[str, int, int]:
    """``(H, W, 3)`` float image -> (JPEG data URL, height, width) with its longest side <= ``max_side``."""
    from PIL import Image

    from vitscope.viz._render import pil_from_array

    pil = pil_from_array(img)
    if max(pil.size) > max_side:
        s = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * s)), max(1, round(pil.height * s))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), pil.height, pil.width


def video_block(frames: Any, attn: Attentions) -> dict[str, Any]:
    """The page's ``video`` entry: the time axis of ``attn`` and its input frames as JPEG data URLs.

    Args:
        frames: the clip the model saw as RGB ``(T, H, W, 3)`` (uint8, or float in [0, 1]) with ``T = attn.frames
            * attn.tubelet`` (`vitscope.viz.video.frames_rgb` of the pixel values).
        attn: a video's `Attentions`.
    """
    arr = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    T = attn.frames * attn.tubelet
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise VitscopeError("image", f"a video's frames of shape {arr.shape}",
                            "pass the clip as RGB frames (T, H, W, 3), e.g. vitscope.viz.video.frames_rgb(pixels)")
    if arr.shape[0] != T:
        raise VitscopeError(
            "image", f"{arr.shape[0]} frames for {attn.frames} token frames of {attn.tubelet} input frames each",
            f"pass the {T} frames the model saw",
        )
    rgb = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)  # (T, H, W, 3)
    images = [_image_data_url(rgb[t], VIDEO_FRAME_MAX_SIDE) for t in range(T)]
    rows, cols = attn.frame_grid
    return {
        "frames": attn.frames, "tubelet": attn.tubelet, "input_frames": T, "frame_grid": [int(rows), int(cols)],
        "images": [src for src, _, _ in images], "height": images[0][1], "width": images[0][2],
    }


def colormap_lut(cmap: str) -> str:
    """256 RGB entries of a matplotlib colormap as base64 bytes (768 bytes)."""
    from vitscope.viz._render import colormap_table

    return base64.b64encode(colormap_table(cmap).tobytes()).decode("ascii")


def _grid_maps(maps: Mapping[str, Any], grid: tuple[int, int]) -> list[dict[str, Any]]:
    """``[{"name", "values": rows*cols floats (row-major)}]``; a map of another grid is refused."""
    out = []
    for name, m in maps.items():
        a = np.asarray(m.detach().cpu() if hasattr(m, "detach") else m, dtype=np.float64)
        if a.shape != grid:
            raise VitscopeError("maps", f"map {name!r} is {a.shape}, the page's grid is {grid}",
                                "pass maps on the patch grid (rows, cols)")
        out.append({"name": str(name), "values": [float(v) for v in a.reshape(-1)]})
    return out


def pack_features(patches: Any, rgb: Any, *, layer: int, norm: str | None, dims: int = FEATURE_DIMS
                  ) -> dict[str, Any]:
    """The feature views of one image for the page (see the module docstring).

    Args:
        patches: ``(rows, cols, D)`` patch features (`vitscope.methods.features.Features.patches` of one image).
        rgb: ``(rows, cols, 3)`` PCA colours in [0, 1] (`vitscope.methods.pca.pca_rgb`).
        layer, norm: what the features are (shown on the page).
        dims: most dimensions kept per patch.
    """
    import torch

    f = torch.as_tensor(patches).detach().double().cpu()
    rows, cols, D = f.shape
    unit = f.reshape(rows * cols, D)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (P, D): cosines are dot products
    if dims < D:  # the top right singular vectors: eigenvectors of unit^T unit (D x D), largest first
        _, vecs = torch.linalg.eigh(unit.T @ unit)
        unit = unit @ vecs.flip(-1)[:, :dims]  # (P, dims): the best rank-dims approximation of every dot product
    return {
        "layer": int(layer), "norm": norm, "dims": int(unit.shape[1]), "width": int(D),
        "pca": encode_array(np.asarray(torch.as_tensor(rgb).detach().float().cpu(), dtype=np.float32), "float16"),
        "unit": encode_array(unit.numpy().reshape(rows, cols, -1), "float16"),
    }


def packed_similarity(features: dict[str, Any], row: int, col: int) -> np.ndarray:
    """What the page draws for a click on patch ``(row, col)``: the cosine of its packed vector to every patch's,
    ``(rows, cols)`` (for tests and tools; the page does the same in JavaScript)."""
    u = decode_array(features["unit"]).astype(np.float64)  # (rows, cols, K)
    u = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
    return np.asarray(u @ u[row, col], dtype=np.float64)


def pack(
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
) -> dict[str, Any]:
    """Everything the page needs, as a JSON-ready dict (see the module docstring for the layout).

    Args:
        attn: captured attention; every query row (``queries=None``) enables patch queries and rollout.
        image: the image the model saw (path, PIL, array); it is cropped like the model's ``policy``. For a
            video's attention: its frames ``(T, H, W, 3)`` (`video_block`); the page then has a time slider.
        batch: which image of the batch.
        dtype: ``"uint8"`` (per-row scaled, 1 byte per weight) or ``"float16"``.
        budget_bytes: cap on the stored arrays; past it fewer layers/heads/rows are kept (noted on the page).
        residual: rollout's identity weight.
        labels: optional lines shown under the title (e.g. the model's top predictions).
        maps: extra maps on the patch grid ``(rows, cols)`` by name (e.g. ``"chefer text:a cat"``), shown as
            methods of their own (the gradient maps of `vitscope.viewer.view`'s ``target``).
        features: the feature views of this image (`pack_features`): the page's PCA and similarity tabs.
    """
    from vitscope.viz._render import display_image

    if not 0 <= batch < attn.batch_size:
        raise VitscopeError("batch", f"index {batch} out of range for {attn.batch_size} images", "pick an image")
    if attn.grids is not None:  # a padded batch (images at their own aspect ratios): this image on its own grid
        attn, batch = attn.image(batch), 0
    if dtype not in ("uint8", "float16"):
        raise VitscopeError("dtype", f"unknown dtype {dtype!r}", "use 'uint8' or 'float16'")
    vblock = video_block(image, attn) if attn.frames > 1 or attn.tubelet > 1 else None  # frames checked first
    contiguous = attn.layers == tuple(range(len(attn.layers)))
    with_rollout = attn.queries is None
    p = plan(attn, int(budget_bytes), dtype, with_rollout)
    notes = list(p.notes)
    w = attn.weights[:, batch].detach().float().cpu()  # (L, H, Q, N)
    raw = w[p.layer_pos]
    if not p.all_heads:
        raw = raw.mean(dim=1, keepdim=True)
    if p.query_pos is not None:
        raw = raw[:, :, p.query_pos]
    query_tokens = list(range(attn.num_tokens)) if attn.queries is None else list(attn.queries)
    if p.query_pos is not None:
        query_tokens = [query_tokens[i] for i in p.query_pos]
    heads: list[Any] = ["mean"] if (attn.heads == "mean" or not p.all_heads) else list(attn.heads)
    if attn.heads != "mean" and len(attn.heads) < attn.num_heads:
        notes.append(f"only heads {list(attn.heads)} of {attn.num_heads} were captured: 'mean' averages those")

    rollout: dict[str, Any] | None = None
    if with_rollout:
        full = rollout_all_rows(attn, batch, residual)  # (L, N, N)
        r = full[p.layer_pos]
        if p.query_pos is not None:
            r = r[:, p.query_pos]
        rollout = encode_array(r.numpy(), dtype)
        rollout["residual"] = residual
        if not contiguous:
            notes.append(f"rollout runs over the captured layers {list(attn.layers)} only")
    else:
        notes.append("rollout needs every query row: capture with queries=None to enable it")
    if attn.queries is not None:
        notes.append("only some query rows were captured: hovering patches reads values, it cannot switch query")

    if vblock is not None:  # a video: every input frame; the first is the page's image
        src, ih, iw = vblock["images"][0], vblock["height"], vblock["width"]
    else:
        src, ih, iw = _image_data_url(display_image(image, attn, policy))
    for note in notes:  # also on the page; a warning so scripts and notebooks hear of it without asking
        warnings.warn(f"viewer: {note}", VitscopeWarning, stacklevel=3)
    return {
        "format": FORMAT,
        "title": title or str(attn.meta.get("model", "attention")),
        "model": str(attn.meta.get("model", "")),
        "labels": list(labels or []),
        "image": {"src": src, "height": ih, "width": iw},
        "grid": list(attn.grid),
        "patch_size": list(attn.patch_size),
        "input_size": list(attn.image_size),
        "prefix": list(attn.prefix),
        "suffix": list(attn.suffix),  # tokens after the patches (YOLOS: "det"); patches are attn.patch_slice
        "patches": [attn.patch_slice.start, attn.patch_slice.stop],
        "num_layers": attn.num_layers,
        "num_heads": attn.num_heads,
        "layers": [attn.layers[i] for i in p.layer_pos],
        "heads": heads,
        "queries": query_tokens,
        "tokens": attn.num_tokens,
        "attention": encode_array(raw.numpy(), dtype),
        "rollout": rollout,
        "maps": _grid_maps(maps or {}, (int(attn.grid[0]), int(attn.grid[1]))),
        "cmap": {"name": cmap, "lut": colormap_lut(cmap)},
        "notes": notes,
        "features": features,
        "video": vblock,
    }
