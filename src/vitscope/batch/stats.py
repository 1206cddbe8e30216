"""Per-image measures and the dataset summary of a batch run: one implementation for both engines.

Each finished image gets a small record (`image_record`, and `localisation` when a mask is given): its mean
attention distance per (layer, head), patch-token norms per layer, prediction, and pointing game / mask IoU.
Local batch mode keeps the record in the image's ``manifest.jsonl`` line (``"stats"``), the Ray engine in the
image's Parquet row. `SummaryAccumulator` adds records one image at a time and merges accumulators of disjoint
sets of images (the Ray engine builds one per group of parts, on the cluster), so the summary never needs the
maps on one machine. `write_summary` writes ``summary.json`` and the distance figure ``distance.png``.
"""

from __future__ import annotations

import io
import json
import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitscope._ops import combine_moments
from vitscope.capture.intercept import AttentionCall
from vitscope.errors import VitscopeError
from vitscope.methods.observe import Observer

SUMMARY = "summary.json"
DISTANCE_FIGURE = "distance.png"
#: The per-image fields `SummaryAccumulator.add` reads (the Ray engine's columns of the same names).
STAT_FIELDS = ("distance", "norm_mean", "norm_high", "patch_tokens", "prediction", "label", "score", "pointing",
               "iou")
PER_IMAGE_CUT = "per image and layer: q75 + 3 IQR of its patch-token norms"


# ------------------------------------------------------------------------------------------------ per image
def image_statistics(vit: Any, pixels: Any, *, norm_threshold: float | None = None) -> dict[str, np.ndarray]:
    """Per-image measures the summary aggregates, for pixels ``(B, C, H, W)``, from one forward pass of their own.

    Batch mode reads the same measures from the map's forward pass instead (`ImageMeasures` as an observer of
    the method's `MapContext`); this runs them alone. See `ImageMeasures.result` for what is returned.
    """
    from vitscope.adapters import as_vit
    from vitscope.capture.prepare import prepare
    from vitscope.methods.registry import MapContext

    vit, pixels = prepare(as_vit(vit), pixels)
    measures = ImageMeasures(vit, pixels, norm_threshold=norm_threshold)
    MapContext(vit, pixels, observers=[measures]).observe()
    return measures.result()


#: Distance reductions an `ImageMeasures` lets wait on its thread before the forward pass waits for them (each
#: holds one layer's patch q and k: the memory stays bounded when the thread is slower than the forward).
_MAX_PENDING = 2
_MEASURE_THREAD: list[ThreadPoolExecutor] = []


def _measure_thread() -> ThreadPoolExecutor:
    """The one thread the per-image measures' distance reductions run on (made on first use)."""
    if not _MEASURE_THREAD:
        _MEASURE_THREAD.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitscope-measures"))
    return _MEASURE_THREAD[0]


def spare_core(device: Any) -> bool:
    """Whether a CPU forward leaves a core idle: torch's compute threads fewer than the cores this process may
    use, and the machine's 1-minute load average (this run's own threads included) at least half a core below
    them. Then the distances' reductions run beside the forward pass, on that core, instead of in it; on a
    machine whose other work keeps the cores busy, a thread of their own would only compete with the forward
    (and cost the copies of q and k), so they run inside it."""
    import torch

    if getattr(device, "type", device) != "cpu":
        return False  # a GPU's kernels are asynchronous already
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if torch.get_num_threads() >= cores:
        return False
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): the thread count decides
        return True
    return load + 0.5 <= cores


class ImageMeasures(Observer):
    """Per-image measures read from a forward pass (an `Observer` of a `MapContext`): every layer's attention
    (mean attention distance per head), every block's output token norms, and the model's output (prediction).

    ``vit`` and ``pixels`` ``(B, C, H, W)`` (prepared: on the model's device) are those of the context.
    ``background``: reduce each layer's distances on a thread of their own while the forward pass goes on
    (default: when `spare_core`); the layer's patch q and k are then copied first (inside the forward pass the
    kernel's own are read in place), the reduction is the same, so the results are identical either way."""

    def __init__(self, vit: Any, pixels: Any, *, norm_threshold: float | None = None,
                 background: bool | None = None) -> None:
        import torch

        from vitscope.methods.distance import DISTANCE_BLOCK_BYTES

        info = vit.info
        self.vit, self.norm_threshold = vit, norm_threshold
        self.layers = tuple(range(info.num_layers))
        self.token_norms = True
        B = int(pixels.shape[0])
        self.grid = vit.grid_for((int(pixels.shape[-2]), int(pixels.shape[-1])))
        self.patch_size = (int(info.patch_size[0]), int(info.patch_size[1]))
        self.P0, self.P = info.num_prefix_tokens, self.grid[0] * self.grid[1]  # patches: P0 .. P0 + P - 1
        dev = pixels.device
        self.distance = torch.zeros(info.num_layers, B, info.num_heads, dtype=torch.float32, device=dev)
        self.scratch = torch.empty(DISTANCE_BLOCK_BYTES // 4 + 16 * self.P, dtype=torch.float32, device=dev)
        self.background = spare_core(dev) if background is None else bool(background)
        self._pending: deque[Future[None]] = deque()
        self.norms: Any = None
        self.output: Any = None

    def on_attention(self, call: AttentionCall) -> None:
        """Mean attention distance of each head (`vitscope.methods.distance.mean_attention_distance`'s): patch
        rows renormalised over patch keys, weighted by the patch-centre distances, averaged over query patches.

        From the kernel's q and k only the patch block of the logits is formed (renormalising over patch keys
        is that block's own softmax: `add_distance_from_qk`); from probabilities (an explicit softmax, or a
        capture that kept the whole layer) their patch block is read (`add_distance_from_probs`)."""
        from vitscope.methods.distance import (
            add_distance_from_probs,
            add_distance_from_qk,
            qk_operands,
        )

        P0, P = self.P0, self.P
        acc = self.distance[call.layer]  # (B, H)
        patches = slice(P0, P0 + P)
        if call.probs is not None:  # the attention itself (captured, or the model's explicit softmax)
            self._wait(0)  # the scratch is the thread's while it works
            add_distance_from_probs(acc, call.probs[:, :, patches, patches], self.grid, self.patch_size,
                                    scratch=self.scratch)
            return
        assert call.q is not None and call.k is not None
        bias = call.bias_rows(patches)  # (B or 1, H or 1, P or 1, N)
        q, k = call.q[:, :, patches], call.k[:, :, patches]  # (B, H, P, d) views of the kernel's own tensors
        bias = None if bias is None else bias[..., patches]
        if not self.background:  # inside the forward: the kernel's q and k read in place, nothing copied
            add_distance_from_qk(acc, q, k, call.scale, bias, self.grid, self.patch_size, scratch=self.scratch)
            return
        qc, kc, bias_c = qk_operands(q, k, bias)  # copies: the model's stay untouched
        self._wait(_MAX_PENDING - 1)
        self._pending.append(_measure_thread().submit(add_distance_from_qk, acc, qc, kc, call.scale, bias_c,
                                                      self.grid, self.patch_size, scratch=self.scratch))

    def _wait(self, keep: int) -> None:
        """Wait until at most ``keep`` reductions are pending (re-raising a failed one)."""
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def on_norms(self, norms: Any) -> None:
        self.norms = norms  # (L, B, N)

    def on_output(self, output: Any) -> None:
        self.output = output

    def result(self) -> dict[str, np.ndarray]:
        """Numpy arrays: ``distance`` ``(B, layers, heads)`` (mean attention distance in pixels, patch centres,
        rows renormalised over patch keys), ``norm_mean`` and ``norm_high`` ``(B, layers)`` (mean patch-token
        output norm; patch tokens above ``norm_threshold``, or by default above Tukey's far fence
        ``q75 + 3 IQR`` of that image's patch norms in that layer, `vitscope.methods.artifacts.outlier_threshold`),
        ``patch_tokens`` ``(B,)``, and ``prediction`` / ``score`` ``(B,)`` (argmax class and its softmax
        probability; ``-1`` / nan without a classifier)."""
        import torch

        self._wait(0)  # every layer's distances are in
        if self.output is None or self.norms is None:
            raise RuntimeError("ImageMeasures.result() before the forward pass it observes")
        P0, S = self.vit.info.num_prefix_tokens, self.vit.info.num_suffix_tokens
        patch = self.norms[:, :, P0 : self.norms.shape[-1] - S].double().cpu().numpy()  # (L, B, P) row-major
        L, B, P = patch.shape
        if self.norm_threshold is not None:
            cut = np.full((L, B, 1), float(self.norm_threshold))
        else:  # `outlier_threshold` of each (layer, image) row at once: q75 + 3 IQR
            q25, q75 = np.percentile(patch, [25, 75], axis=2, keepdims=True)  # (L, B, 1) each
            cut = q75 + 3.0 * (q75 - q25)
        high = (patch > cut).sum(axis=2).T.astype(np.int64)  # (B, L)
        logits = self.vit.logits(self.output)
        if logits is not None:
            probs = torch.softmax(logits.detach().float(), dim=-1)
            score, pred = probs.max(dim=-1)
            prediction, scores = pred.cpu().numpy().astype(np.int64), score.cpu().numpy().astype(np.float32)
        else:
            prediction, scores = np.full(B, -1, dtype=np.int64), np.full(B, np.nan, dtype=np.float32)
        distance = self.distance.double().cpu().numpy().transpose(1, 0, 2)  # (B, L, H)
        return {"distance": distance, "norm_mean": patch.mean(axis=2).T, "norm_high": high,
                "patch_tokens": np.full(B, P, dtype=np.int64), "prediction": prediction, "score": scores}


def image_record(stats: Mapping[str, np.ndarray], b: int, labels: Any = None) -> dict[str, Any]:
    """Image ``b`` of `image_statistics`' output as plain values (lists, ints, floats; ``None`` when absent):
    what both engines store per image. ``distance`` is flattened ``(layers * heads)``, layer-major."""
    pred = int(stats["prediction"][b])
    names = list(labels) if labels else None
    return {"distance": np.asarray(stats["distance"][b], dtype=np.float64).ravel().tolist(),
            "norm_mean": np.asarray(stats["norm_mean"][b], dtype=np.float64).tolist(),
            "norm_high": np.asarray(stats["norm_high"][b], dtype=np.int64).tolist(),
            "patch_tokens": int(stats["patch_tokens"][b]),
            "prediction": pred if pred >= 0 else None,
            "label": str(names[pred]) if names and 0 <= pred < len(names) else None,
            "score": float(np.float32(stats["score"][b])) if pred >= 0 else None}


def localisation(heat: np.ndarray, mask: np.ndarray, tau: float = 0.6) -> dict[str, Any]:
    """``pointing`` (pointing game hit, `vitscope.methods.metrics.pointing_game`) and ``iou`` (Jaccard of the
    map's ``tau``-mass mask with ``mask``, `mask_jaccard`) for one ``(rows, cols)`` map and a bool ``(H, W)``
    mask in the model input's frame."""
    import torch

    from vitscope.methods.metrics import mask_jaccard, pointing_game

    maps = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None]  # (1, rows, cols)
    gt = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None]  # (1, H, W)
    hit = bool(pointing_game(maps, gt)[0])
    iou = float(mask_jaccard(maps.clamp_min(0), gt, tau=tau).best[0, 0])
    return {"pointing": hit, "iou": iou}


# ------------------------------------------------------------------------------------------------ masks
def check_masks(masks: str | os.PathLike[str] | None, policy: Any, vit: Any) -> Path | None:
    """The ``masks`` folder, or a one-line error: it must exist, and the model input must show the whole image
    (a centre crop would cut the mask's frame)."""
    if masks is None:
        return None
    mask_dir = Path(masks).expanduser()
    if not mask_dir.is_dir():
        raise VitscopeError("masks", f"not a folder: {mask_dir}", "pass the folder of mask images")
    if (policy or vit.info.preprocess.policy) == "crop":
        raise VitscopeError("masks", "masks need the whole image in the model input",
                            "use policy='resize' or 'native'")
    return mask_dir


def mask_for(masks: Path, rel: str) -> str | None:
    """The mask of input ``rel`` (``a/cat.jpg`` -> ``masks/a/cat.jpg`` or ``masks/a/cat.png``), if any."""
    for cand in (masks / rel, (masks / rel).with_suffix(".png")):
        if cand.is_file():
            return str(cand)
    return None


def mask_image(data: bytes, hw: tuple[int, int], name: str = "mask") -> np.ndarray:
    """An encoded mask image (non-zero = object) resized (nearest) to the model input ``(H, W)``: bool.
    An unreadable one is an `ImageError` naming it by ``name`` (its path), not by the buffer it was read into."""
    from PIL import Image, UnidentifiedImageError

    from vitscope import limits
    from vitscope.errors import ImageError
    from vitscope.images import _header_only, check_pixels

    cap = limits.max_pixels()
    try:
        with _header_only(cap), Image.open(io.BytesIO(data)) as im:
            check_pixels(im.width, im.height, cap, "masks", what=name)
            m = im.convert("L").resize((hw[1], hw[0]), Image.Resampling.NEAREST)
            return np.asarray(m) > 0
    except UnidentifiedImageError:
        raise ImageError("masks", f"{name} is not an image PIL can read", "pass a PNG mask") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageError):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError("masks", f"cannot read {name}: {msg}", "check the mask is a complete image") from None


# ------------------------------------------------------------------------------------------------ summary
#: `SummaryAccumulator`'s array fields and their dtypes (lists in its JSON)
_ACC_ARRAYS = {"dist_mean": np.float64, "dist_m2": np.float64, "norm_high": np.int64, "norm_sum": np.float64}


@dataclass
class SummaryAccumulator:
    """Sums over images for the dataset summary; `add` one image, `merge` another accumulator.

    Mean attention distance as (count, mean, M2) per (layer, head), combined by Chan et al.'s pairwise update
    (`vitscope._ops.combine_moments`) in float64; high-norm and patch-token counts per layer; the sum of mean
    patch-token norms; pointing hits and IoU sum over masked images; images per predicted class. The result
    depends on the order of images only by rounding.
    """

    ok: int = 0
    failed: int = 0
    dist_n: int = 0
    dist_mean: np.ndarray | None = None  # (layers * heads,) float64
    dist_m2: np.ndarray | None = None  # (layers * heads,) float64
    norm_n: int = 0
    norm_high: np.ndarray | None = None  # (layers,) int64
    norm_tokens: int = 0
    norm_sum: np.ndarray | None = None  # (layers,) float64
    masked: int = 0
    hits: int = 0
    iou_sum: float = 0.0
    classes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of_image(cls, status: str, record: Mapping[str, Any] | None) -> SummaryAccumulator:
        """One image: its status (``"ok"`` or an error) and its record (fields of `STAT_FIELDS`, any may be
        missing or ``None``)."""
        if status != "ok":
            return cls(failed=1)
        r = record or {}
        acc = cls(ok=1)
        if r.get("prediction") is not None:
            acc.classes[str(int(r["prediction"]))] = 1
        if r.get("distance") is not None:
            acc.dist_n, acc.dist_mean = 1, np.asarray(r["distance"], dtype=np.float64)
            acc.dist_m2 = np.zeros_like(acc.dist_mean)
        if r.get("norm_high") is not None:
            acc.norm_n, acc.norm_tokens = 1, int(r["patch_tokens"])
            acc.norm_high = np.asarray(r["norm_high"], dtype=np.int64)
            acc.norm_sum = np.asarray(r["norm_mean"], dtype=np.float64)
        if r.get("pointing") is not None:
            acc.masked, acc.hits, acc.iou_sum = 1, int(bool(r["pointing"])), float(r["iou"])
        return acc

    def add(self, status: str, record: Mapping[str, Any] | None) -> SummaryAccumulator:
        """Add one image (`of_image`)."""
        return self.merge(self.of_image(status, record))

    def merge(self, other: SummaryAccumulator) -> SummaryAccumulator:
        """Add the images of ``other`` (a disjoint set)."""
        self.ok, self.failed = self.ok + other.ok, self.failed + other.failed
        for cls, n in other.classes.items():
            self.classes[cls] = self.classes.get(cls, 0) + n
        if other.dist_n:
            self.dist_n, self.dist_mean, self.dist_m2 = combine_moments(
                self.dist_n, self.dist_mean, self.dist_m2, other.dist_n, other.dist_mean, other.dist_m2)
        if other.norm_n:
            assert other.norm_high is not None and other.norm_sum is not None
            self.norm_n, self.norm_tokens = self.norm_n + other.norm_n, self.norm_tokens + other.norm_tokens
            self.norm_high = other.norm_high if self.norm_high is None else self.norm_high + other.norm_high
            self.norm_sum = other.norm_sum if self.norm_sum is None else self.norm_sum + other.norm_sum
        self.masked, self.hits, self.iou_sum = (self.masked + other.masked, self.hits + other.hits,
                                                self.iou_sum + other.iou_sum)
        return self

    def to_json(self) -> str:
        state = asdict(self)
        for name in _ACC_ARRAYS:
            if state[name] is not None:
                state[name] = state[name].tolist()
        return json.dumps(state)

    @classmethod
    def from_json(cls, text: str) -> SummaryAccumulator:
        state = json.loads(text)
        for name, dtype in _ACC_ARRAYS.items():
            if state[name] is not None:
                state[name] = np.asarray(state[name], dtype=dtype)
        return cls(**state)

    def summary(self, *, num_heads: int, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The summary `write_summary` writes.

        ``images`` / ``failed`` counts and the run's settings (``config``); ``distance``: ``mean`` and ``std``
        (population, over images) ``(layers, heads)`` in pixels and ``count``; ``high_norm``: per layer
        ``rate`` (share of patch tokens above the cut), ``mean_norm`` (mean over images of the mean patch-token
        norm) and ``cut``; ``localisation`` (only with masks): ``pointing_game`` (hit rate) and ``mask_iou``
        (mean) of the run's method over ``images`` masked images; ``predictions``: images per predicted class.
        """
        cfg = dict(config or {})
        out: dict[str, Any] = {"images": self.ok, "failed": self.failed, **cfg}
        if self.dist_n:
            mean = np.asarray(self.dist_mean).reshape(-1, num_heads)
            std = np.sqrt(np.maximum(np.asarray(self.dist_m2).reshape(-1, num_heads) / self.dist_n, 0.0))
            out["distance"] = {"count": self.dist_n, "mean": mean.tolist(), "std": std.tolist(),
                               "metric": "centre", "unit": "pixels"}
        if self.norm_n:
            cut = cfg.get("norm_threshold")
            out["high_norm"] = {"rate": (np.asarray(self.norm_high) / self.norm_tokens).tolist(),
                                "mean_norm": (np.asarray(self.norm_sum) / self.norm_n).tolist(),
                                "cut": cut if cut is not None else PER_IMAGE_CUT, "images": self.norm_n}
        if self.masked:
            out["localisation"] = {"images": self.masked, "pointing_game": self.hits / self.masked,
                                   "mask_iou": self.iou_sum / self.masked}
        out["predictions"] = dict(sorted(self.classes.items(), key=lambda kv: int(kv[0])))
        return out


def write_summary(output_dir: str | os.PathLike[str], summary: Mapping[str, Any], *, figure: bool = True) -> None:
    """``summary.json`` (atomically) and, when it has distances, ``distance.png`` (mean +- std per head)."""
    from vitscope._io import atomic_write_text

    out = Path(output_dir)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2))
    if figure and "distance" in summary:
        import matplotlib.pyplot as plt

        from vitscope.viz import distance_plot, save_figure

        dist = summary["distance"]
        fig = distance_plot(np.asarray(dist["mean"]), std=np.asarray(dist["std"]),
                            title=f"mean attention distance ({dist['count']} images)")
        try:
            save_figure(fig, out / DISTANCE_FIGURE)
        finally:
            plt.close(fig)
