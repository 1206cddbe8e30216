"""An attention kernel that also returns the head-mean probabilities, in cache-sized blocks.

Rollout with mean head fusion needs ``F = mean_h softmax(q_h k_h^T * scale)`` of every layer. Rebuilding F
after the fused kernel ran costs a second ``q k^T`` per head; `mean_sdpa` computes the attention itself, one
block of query rows and one head at a time, and adds each block's probabilities into F while the block sits
in cache: ``O = P V`` and ``F`` come from the same ``q k^T``, and no ``H x N x N`` tensor exists at any time.
`vitscope.capture.intercept.substitute_sdpa` runs it in place of plain float32 CPU SDPA calls when a caller
asks (``kernel="mean"``); its output equals SDPA's within float32 rounding (not bitwise).
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK_ELEMENTS", "MIN_BLOCK_ROWS", "WHOLE_ELEMENTS", "block_rows", "mean_sdpa"]

#: Elements of one head's ``(c, Nk)`` block of logits: about 1 MB of float32, written by the ``q k^T`` GEMM,
#: exponentiated, summed and read by the product with V while it sits in cache; at least `MIN_BLOCK_ROWS`
#: query rows (a thinner GEMM loses more to its own overhead than the cache saves; measured at N = 261, 1374
#: and 5334 on one thread).
BLOCK_ELEMENTS = 1 << 18
MIN_BLOCK_ROWS = 96
#: Layers with at most this many ``H x Nq x Nk`` elements (4 MB of float32: DINOv2-S/14 and ViT-B/16 at 224 px)
#: are computed with every head at once, in one block.
WHOLE_ELEMENTS = 1 << 20

_LOG2E = 1.4426950408889634


def block_rows(n_queries: int, n_keys: int) -> int:
    """Query rows per block for ``n_keys`` keys (`BLOCK_ELEMENTS`, `MIN_BLOCK_ROWS`), at most ``n_queries``."""
    return max(1, min(n_queries, max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(1, n_keys))))


def mean_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O, F)`` for q ``(B, H, Nq, d)``, k ``(B, H, Nk, d)``, v ``(B, H, Nk, dv)`` (float32, no mask):
    ``O = softmax(q k^T * scale) V`` ``(B, H, Nq, dv)`` and ``F = mean_h softmax(q_h k_h^T * scale)``
    ``(B, Nq, Nk)``.

    A small layer (`WHOLE_ELEMENTS`) is one block with every head. Otherwise, per block of query rows and per
    head: one GEMM ``log2(e) * scale * q k^T`` (the factor folded into q), the
    row maxima subtracted and ``exp2`` in place, the row sums, one GEMM with V scaled by the reciprocal sums,
    and the block added into F weighted by ``1 / (H * sum)``. F's block stays in cache over the heads. ``O``
    is laid out ``(B, Nq, H, dv)`` in memory (a transposed view), as the CPU flash kernel returns it, so the
    model's following ``transpose(1, 2).reshape(B, Nq, H * dv)`` copies nothing.
    """
    B, H, Nq, _ = q.shape  # (batch, heads, query tokens, head size)
    Nk, dv = k.shape[2], v.shape[3]
    out = torch.empty(B, Nq, H, dv, dtype=q.dtype, device=q.device)
    fused = torch.empty(B, Nq, Nk, dtype=q.dtype, device=q.device)
    if H * Nq * Nk <= WHOLE_ELEMENTS:  # a small layer: all heads at once (fewer, larger calls)
        for b in range(B):
            p = torch.bmm(q[b] * (scale * _LOG2E), k[b].transpose(-1, -2))  # (H, Nq, Nk) log2(e) * logits
            p.sub_(p.amax(dim=-1, keepdim=True)).exp2_()
            p.mul_(p.sum(dim=-1, keepdim=True).reciprocal_())  # the probabilities
            out[b] = torch.bmm(p, v[b]).transpose(0, 1)  # (Nq, H, dv)
            torch.sum(p, dim=0, out=fused[b]).mul_(1.0 / H)
        return out.transpose(1, 2), fused
    c = block_rows(Nq, Nk)
    block = torch.empty(c, Nk, dtype=q.dtype, device=q.device)  # one head's logits, then its probabilities
    for b in range(B):
        qs = q[b] * (scale * _LOG2E)  # (H, Nq, d), a contiguous copy: logits in base 2
        kt = k[b].transpose(-1, -2)  # (H, d, Nk): the GEMM reads the transposed view as it is
        for s in range(0, Nq, c):
            e = min(Nq, s + c)
            f = fused[b, s:e]  # (c', Nk)
            for h in range(H):
                p = torch.mm(qs[h, s:e], kt[h], out=block[: e - s])  # (c', Nk) log2(e) * logits
                p.sub_(p.amax(dim=-1, keepdim=True)).exp2_()  # unnormalised, each row's largest is 1
                inv = p.sum(dim=-1, keepdim=True).reciprocal_()  # (c', 1)
                out[b, s:e, h] = torch.mm(p, v[b, h]).mul_(inv)  # (c', dv)
                w = inv.mul_(1.0 / H)  # each row's weight in the head mean
                if h == 0:
                    torch.mul(p, w, out=f)
                else:
                    f.addcmul_(p, w)
    return out.transpose(1, 2), fused
