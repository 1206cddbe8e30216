"""Mean attention distance per (layer, head), in pixels (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words", Fig. 7 and Appendix D.8: "the average distance in image space across which information is
integrated, based on the attention weights").

For one image, layer ``l`` and head ``h``, over the query patches ``i`` and key patches ``j``:

    d(l, h) = mean_i  sum_j  w_ij * dist(i, j)
    w_ij    = A_ij / sum_{j' patch} A_ij'   (renormalize=True: prefix keys removed, rows re-summed to 1)
    w_ij    = A_ij                          (renormalize=False: prefix keys simply excluded)

Prefix-token query rows are never used. Two distances between patches ``i`` and ``j`` (offset ``dr`` rows,
``dc`` columns, patch ``ph x pw`` pixels):

- ``"centre"``: between patch centres, ``sqrt((dr*ph)^2 + (dc*pw)^2)``.
- ``"pixel"``: the expected distance between a uniformly random pixel of patch ``i`` and one of patch ``j``
  (pixel centres). Pixel offsets inside the patches differ by ``u = u_i - u_j`` with
  ``P(u = k) = (ph - |k|) / ph^2`` for ``|k| < ph`` (and likewise ``v`` for the width), so
  ``E = sum_{k, m} P(k) P(m) sqrt((dr*ph + k)^2 + (dc*pw + m)^2)`` — exact, computed once per offset. It is
  not 0 for ``i = j`` (two pixels of one patch are on average ``~0.52 * patch`` apart).

`DistanceAccumulator` streams over many images (mean and standard deviation across images) without ever
holding more than one batch of attention.
"""

from __future__ import annotations

from typing import Literal

import torch

from vitscope._ops import combine_moments
from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError

DistanceMetric = Literal["centre", "pixel"]


def offset_distances(grid: tuple[int, int], patch_size: tuple[int, int], metric: DistanceMetric = "centre",
                     ) -> torch.Tensor:
    """Distance in pixels for every patch offset: ``(2*rows - 1, 2*cols - 1)`` float64, index ``(dr+rows-1, dc+cols-1)``."""
    rows, cols = grid
    ph, pw = patch_size
    dr = torch.arange(-(rows - 1), rows, dtype=torch.float64) * ph  # (2R-1,)
    dc = torch.arange(-(cols - 1), cols, dtype=torch.float64) * pw  # (2C-1,)
    if metric == "centre":
        return torch.sqrt(dr[:, None] ** 2 + dc[None, :] ** 2)
    if metric != "pixel":
        raise VitscopeError("metric", f"unknown distance {metric!r}", "use 'centre' or 'pixel'")
    k = torch.arange(-(ph - 1), ph, dtype=torch.float64)
    m = torch.arange(-(pw - 1), pw, dtype=torch.float64)
    pk = (ph - k.abs()) / ph**2  # (2ph-1,) distribution of the row offset between two pixels
    pm = (pw - m.abs()) / pw**2
    y = dr[:, None, None, None] + k[None, None, :, None]  # (2R-1, 1, 2ph-1, 1)
    x = dc[None, :, None, None] + m[None, None, None, :]  # (1, 2C-1, 1, 2pw-1)
    dist = torch.sqrt(y**2 + x**2)  # (2R-1, 2C-1, 2ph-1, 2pw-1)
    return (dist * pk[:, None] * pm[None, :]).sum(dim=(-2, -1))


def patch_distances(grid: tuple[int, int], patch_size: tuple[int, int], metric: DistanceMetric = "centre",
                    queries: slice | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
    """Distance from query patches ``queries`` (default all) to every patch: ``(Q, P)`` (row-major), float64
    pixels. ``table`` is `offset_distances` when already computed (streaming reuses it per chunk)."""
    rows, cols = grid
    table = offset_distances(grid, patch_size, metric) if table is None else table
    r = torch.arange(rows, device=table.device).repeat_interleave(cols)  # (P,)
    c = torch.arange(cols, device=table.device).repeat(rows)
    rq, cq = (r, c) if queries is None else (r[queries], c[queries])
    return table[(rq[:, None] - r[None, :]) + rows - 1, (cq[:, None] - c[None, :]) + cols - 1]


def refuse_video(frames: int) -> None:
    """Mean attention distance is a distance on one image's patch grid: a video's (several token frames on the
    stacked grid) would count frames as rows apart. One-line refusal."""
    if frames > 1:
        raise VitscopeError(
            "attn", f"mean attention distance is measured on one image's patch grid; this video has {frames} token "
            "frames stacked on one grid, whose distances across frames are not distances in the image",
            "use video_maps(...) and its temporal profile for where in time a video model looks",
        )


def _patch_query_positions(attn: Attentions) -> tuple[list[int], list[int]]:
    """(positions along dim 3, patch indices 0..P-1) of the captured patch query rows."""
    n_prefix, n_patches = attn.num_prefix_tokens, attn.num_patches
    tokens = range(attn.num_tokens) if attn.queries is None else attn.queries
    pairs = [(pos, tok - n_prefix) for pos, tok in enumerate(tokens) if 0 <= tok - n_prefix < n_patches]
    if not pairs:
        raise VitscopeError("attn", "no patch query rows were captured", "capture with queries=None")
    return [p for p, _ in pairs], [t for _, t in pairs]


def attention_distance_per_image(
    attn: Attentions, *, metric: DistanceMetric = "centre", renormalize: bool = True
) -> torch.Tensor:
    """``d(l, h)`` for every captured layer, image and head: float64 ``(layers, batch, heads)``.

    Averages over the captured patch query rows (all of them with ``queries=None``).
    """
    refuse_video(attn.frames)
    if attn.grids is not None:  # a padded batch: each image's distances on its own grid
        return torch.cat([attention_distance_per_image(a, metric=metric, renormalize=renormalize)
                          for a in attn.images()], dim=1)
    dist = patch_distances(attn.grid, attn.patch_size, metric).to(attn.weights.device)  # (P, P)
    q_pos, q_patch = _patch_query_positions(attn)
    d = dist[q_patch]  # (Q, P)
    L, B, H = attn.weights.shape[:3]
    out = torch.empty(L, B, H, dtype=torch.float64)
    for li in range(L):
        for b in range(B):  # one image at a time keeps the float64 scratch at (H, Q, P)
            w = attn.weights[li, b][:, q_pos][..., attn.patch_slice].double()  # (H, Q, P)
            if renormalize:
                w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            out[li, b] = (w * d).sum(dim=-1).mean(dim=-1).cpu()
    return out


def mean_attention_distance(
    attn: Attentions, *, metric: DistanceMetric = "centre", renormalize: bool = True, per_image: bool = False
) -> torch.Tensor:
    """Mean attention distance in pixels per (layer, head), averaged over the images of ``attn``.

    Args:
        attn: attentions with the patch query rows (``capture(..., queries=None)``), heads kept or averaged.
        metric: ``"centre"`` (patch centres) or ``"pixel"`` (expected distance between random pixels).
        renormalize: renormalise each row over patch keys (prefix tokens' mass removed); else the prefix
            columns are just excluded.
        per_image: return ``(layers, batch, heads)`` instead of the mean over images.

    Returns:
        float64 ``(layers, heads)`` (rows follow ``attn.layers``, columns ``attn.heads``).
    """
    per = attention_distance_per_image(attn, metric=metric, renormalize=renormalize)
    return per if per_image else per.mean(dim=1)


class DistanceAccumulator:
    """Mean attention distance streamed over batches: mean and standard deviation across images.

    Chan et al.'s pairwise update of (count, mean, M2) in float64, so results equal the one-batch
    computation up to rounding, whatever the batch sizes.

    Example:
        >>> acc = DistanceAccumulator(metric="centre")
        >>> for batch in loader:                                             # doctest: +SKIP
        ...     acc.update(vitscope.capture(vit, batch))                     # doctest: +SKIP
        >>> acc.mean, acc.std  # (layers, heads) in pixels                   # doctest: +SKIP
    """

    def __init__(self, metric: DistanceMetric = "centre", renormalize: bool = True) -> None:
        self.metric: DistanceMetric = metric
        self.renormalize = renormalize
        self.count = 0
        self.layers: tuple[int, ...] | None = None
        self.heads: object = None
        self._mean: torch.Tensor | None = None  # (L, H)
        self._m2: torch.Tensor | None = None  # (L, H)

    def update(self, attn: Attentions) -> DistanceAccumulator:
        """Add the images of ``attn`` (their attention is not kept)."""
        if self.layers is None:
            self.layers, self.heads = attn.layers, attn.heads
        elif (attn.layers, attn.heads) != (self.layers, self.heads):
            raise VitscopeError(
                "attn", f"layers/heads {attn.layers}/{attn.heads} differ from earlier batches "
                f"{self.layers}/{self.heads}", "capture every batch with the same layers and heads",
            )
        per = attention_distance_per_image(attn, metric=self.metric, renormalize=self.renormalize)  # (L, B, H)
        n_b = per.shape[1]
        mean_b = per.mean(dim=1)
        m2_b = ((per - mean_b[:, None]) ** 2).sum(dim=1)
        self.count, self._mean, self._m2 = combine_moments(self.count, self._mean, self._m2, n_b, mean_b, m2_b)
        return self

    def _need(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mean is None or self._m2 is None:
            raise VitscopeError("DistanceAccumulator", "no images added yet", "call update(attn) first")
        return self._mean, self._m2

    @property
    def mean(self) -> torch.Tensor:
        """Mean over images ``(layers, heads)``, pixels."""
        return self._need()[0]

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation over images ``(layers, heads)`` (``ddof=0``), pixels."""
        return (self._need()[1] / self.count).sqrt()
