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
holding more than one batch of attention. `add_distance_from_qk` and `add_distance_from_probs` are the same
measure read from one layer's attention as a forward pass computes it (batch mode's per-image measures): in
cache-sized blocks of one image's heads (the kernel's q and k read in place, the scale applied inside the
product), each block's renormalised patch rows weighted by the distances divided by ``P`` and summed in one
reduction per pair (``mean_i sum_j w_ij d_ij = sum_ij w_ij d_ij / P``; torch's cascaded sum keeps the ``P^2``
terms to float32 rounding, where one matrix-vector product drifted by ~4e-6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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


@functools.lru_cache(maxsize=16)
def _scaled_distances(grid: tuple[int, int], patch_size: tuple[int, int], metric: DistanceMetric,
                      device: torch.device) -> torch.Tensor:
    """`patch_distances` of every query patch divided by the patch count ``P``: ``(P, P)`` float32 on
    ``device``, cached per grid (the same for every layer and batch of that size)."""
    P = grid[0] * grid[1]
    return (patch_distances(grid, patch_size, metric) / P).to(device=device, dtype=torch.float32)


#: float32 bytes of attention worked through at once by `add_distance_from_qk` / `_from_probs`: what a core's
#: cache holds, so the product, the softmax and the weighted sum read it from cache, not memory.
DISTANCE_BLOCK_BYTES = 2**20


def _blocks(H: int, P: int) -> tuple[int, int]:
    """``(heads, rows)`` per block of one image's ``H`` heads with ``P x P`` patch attention each: several
    whole heads when one fits `DISTANCE_BLOCK_BYTES`, else one head in chunks of rows (at least 16)."""
    per_head = 4 * P * P
    if per_head <= DISTANCE_BLOCK_BYTES:
        return max(1, min(H, DISTANCE_BLOCK_BYTES // per_head)), P
    return 1, min(P, max(16, DISTANCE_BLOCK_BYTES // (4 * P)))


def _scratch(scratch: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """``scratch`` when it holds ``n`` float32 values, else a new buffer of ``n``."""
    if scratch is not None and scratch.numel() >= n and scratch.dtype == torch.float32 and scratch.device == device:
        return scratch
    return torch.empty(n, dtype=torch.float32, device=device)


def qk_operands(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q, k, bias)`` of `add_distance_from_qk` as fresh float32 copies (``q``, ``k`` ``(B, H, P, d)``
    contiguous; ``bias`` its own shape) that the model never touches again, so the reduction may run later, on
    another thread, with the same arithmetic as on the kernel's views."""
    qc = torch.empty(q.shape, dtype=torch.float32, device=q.device).copy_(q)  # (B, H, P, d)
    kc = torch.empty(k.shape, dtype=torch.float32, device=k.device).copy_(k)
    bias_c = None if bias is None else torch.empty(bias.shape, dtype=torch.float32, device=bias.device).copy_(bias)
    return qc, kc, bias_c


def _reduce_blocks(sums: torch.Tensor, B: int, H: int, P: int, dist: torch.Tensor, scratch: torch.Tensor | None,
                   fill: Callable[[torch.Tensor, int, int, int, int, int], None]) -> None:
    """``sums`` ``(B, H)`` ``+=`` each (image, head) pair's distance-weighted patch probabilities, block by block
    (`_blocks`: heads of one image, so the kernel's ``(B, H, ...)`` views are read in place):
    ``fill(blk, b, h0, h1, r0, r1)`` writes image ``b``'s heads ``h0:h1``, patch rows ``r0:r1`` of the
    probabilities renormalised over patch keys into ``blk`` ``(h, r, P)``; ``dist`` ``(P, P)`` the distances / P."""
    heads, rows = _blocks(H, P)
    buf = _scratch(scratch, heads * rows * P, dist.device)
    for b in range(B):
        for h0 in range(0, H, heads):
            h1 = min(H, h0 + heads)
            for r0 in range(0, P, rows):
                r1 = min(P, r0 + rows)
                blk = buf[: (h1 - h0) * (r1 - r0) * P].view(h1 - h0, r1 - r0, P)
                fill(blk, b, h0, h1, r0, r1)
                sums[b, h0:h1] += blk.mul_(dist[r0:r1]).view(h1 - h0, -1).sum(dim=-1)  # (h,)


def add_distance_from_qk(acc: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
                         bias: torch.Tensor | None, grid: tuple[int, int], patch_size: tuple[int, int],
                         metric: DistanceMetric = "centre", scratch: torch.Tensor | None = None) -> None:
    """``acc`` ``(B, H)`` float32 ``+=`` each image's and head's mean attention distance (renormalised over patch
    keys) of one layer, from its patch queries and keys.

    q, k: ``(B, H, P, d)`` the patch tokens' (row-major grid), any strides (read in place: no copy); bias: the
    additive bias of patch rows and keys, broadcastable to ``(B, H, P, P)``, or ``None``. Renormalising over
    patch keys is the softmax of the patch block of the logits alone, so only that block is formed:
    ``softmax(q k^T * scale + bias)`` over patch keys (the scale applied inside the product), one image's heads
    at a time in blocks of `DISTANCE_BLOCK_BYTES`, each weighted by the distances and summed per pair.
    ``scratch``: a float32 buffer of at least `DISTANCE_BLOCK_BYTES` (one is made when too small)."""
    B, H, P, _ = q.shape
    kt = k.transpose(-2, -1)  # (B, H, d, P): a view; the product reads it transposed, nothing is copied
    bias_full = None if bias is None else bias.expand(B, H, P, P)  # a view (zero strides where broadcast)

    def fill(blk: torch.Tensor, b: int, h0: int, h1: int, r0: int, r1: int) -> None:
        qb = q[b, h0:h1, r0:r1]  # (h, r, d), the model's strides
        if q.dtype != torch.float32:
            qb, kb = qb.float(), kt[b, h0:h1].float()
        else:
            kb = kt[b, h0:h1]
        if bias_full is None:  # scale * q k^T in the product itself (beta=0: blk's old values are ignored)
            torch.baddbmm(blk, qb, kb, beta=0.0, alpha=scale, out=blk)
        else:
            blk.copy_(bias_full[b, h0:h1, r0:r1])
            torch.baddbmm(blk, qb, kb, beta=1.0, alpha=scale, out=blk)
        torch._softmax(blk, -1, False, out=blk)  # renormalised over patch keys

    _reduce_blocks(acc, B, H, P, _scaled_distances(grid, patch_size, metric, q.device), scratch, fill)


def add_distance_from_probs(acc: torch.Tensor, probs: torch.Tensor, grid: tuple[int, int],
                            patch_size: tuple[int, int], metric: DistanceMetric = "centre",
                            scratch: torch.Tensor | None = None) -> None:
    """`add_distance_from_qk` from one layer's attention itself: ``probs`` ``(B, H, P, P)``, the patch rows
    and keys of the probabilities (any strides), each row renormalised over patch keys here."""
    B, H, P, _ = probs.shape

    def fill(blk: torch.Tensor, b: int, h0: int, h1: int, r0: int, r1: int) -> None:
        part = probs[b, h0:h1, r0:r1].float()  # (h, r, P)
        torch.div(part, part.sum(dim=-1, keepdim=True), out=blk)

    _reduce_blocks(acc, B, H, P, _scaled_distances(grid, patch_size, metric, probs.device), scratch, fill)


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
