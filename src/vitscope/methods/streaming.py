"""Rollout and mean attention distance without ``L x H x N x N``: the streaming strategies of those methods.

Built on `vitscope.capture.streaming` (one forward pass with the attention intercepted, probabilities rebuilt in
row chunks from the kernel's q, k and bias):

- `streaming_rollout`: attention rollout (Abnar & Zuidema 2020) for chosen query rows. q and k of every layer
  are kept during the forward pass (``2 * N * D`` values per layer, far below ``H * N^2``); the rows are then
  pushed through the layers from last to first, ``r <- r @ A'_l``, each ``A'_l`` built chunk by chunk. Same
  factors as `vitscope.methods.rollout` (``mix_residual``), applied in place per chunk.
- `streaming_distance`: the mean attention distance of each head (Dosovitskiy et al. 2021, Fig. 7), summed over
  row chunks as the forward pass goes, with the same patch distances as `vitscope.methods.distance`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vitscope._ops import check_fusion
from vitscope.adapters.base import SizePolicy
from vitscope.capture.budget import choose_strategy
from vitscope.capture.core import QuerySpec, resolve_layers, resolve_queries
from vitscope.capture.intercept import AttentionCall
from vitscope.capture.kernels import block_rows
from vitscope.capture.streaming import (
    HeadFusion,
    Scratch,
    StreamRun,
    check_compute_dtype,
    chunk_rows_for,
    forward_qk,
    fuse_chunk,
    prepare_run,
    prob_chunks,
)
from vitscope.errors import VitscopeError
from vitscope.methods._common import discard_lowest
from vitscope.methods.distance import offset_distances, patch_distances, refuse_video


# ------------------------------------------------------------------------------------------------ rollout
@dataclass
class TokenRows:
    """Rows over all ``N`` tokens for some query tokens (e.g. rollout's joint attention of [CLS]).

    Attributes:
        rows: float32 ``(batch, query, key)``; ``key`` covers all ``N = len(prefix) + rows * cols + len(suffix)``
            tokens.
        queries: token index of each entry along dim 1, or ``"mean"`` for the mean over the patch rows.
        prefix, grid, patch_size, image_size, suffix: the token layout, as in `vitscope.Attentions`.
        meta: provenance (model, method, parameters).
    """

    rows: torch.Tensor
    queries: tuple[int | str, ...]
    prefix: tuple[str, ...]
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)
    suffix: tuple[str, ...] = ()

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix)

    @property
    def patch_slice(self) -> slice:
        """The patch columns: after the prefix, before the suffix."""
        return slice(len(self.prefix), len(self.prefix) + self.grid[0] * self.grid[1])

    def maps(self) -> torch.Tensor:
        """Patch part of every row on the grid: ``(batch, query, rows, cols)`` (height before width)."""
        gh, gw = self.grid
        return self.rows[..., self.patch_slice].reshape(*self.rows.shape[:-1], gh, gw)

    def map(self, query: int | str | None = None) -> torch.Tensor:
        """One query's patch map ``(batch, rows, cols)``: ``"cls"``, ``"mean"``, a token index, or the first."""
        if query is None:
            return self.maps()[:, 0]
        if query == "cls":
            if "cls" not in self.prefix:
                raise VitscopeError("query", "this model has no [CLS] token", "pass 'mean' or a token index")
            query = self.prefix.index("cls")
        key: int | str = query if query == "mean" else int(query)
        if key not in self.queries:
            raise VitscopeError("query", f"{query!r} was not computed (queries {list(self.queries)})",
                                "compute it with queries=[...]")
        return self.maps()[:, self.queries.index(key)]


def _initial_rows(queries: Any, prefix: tuple[str, ...], grid: tuple[int, int], N: int, B: int,
                  device: torch.device, suffix: tuple[str, ...] = ()) -> tuple[tuple[int | str, ...], torch.Tensor]:
    """The starting rows ``r`` ``(B, R, N)``: one-hot rows of the query tokens, or the patch mean for ``"mean"``
    (the patch rows only: neither prefix nor suffix tokens)."""
    if queries == "auto":
        queries = "cls" if "cls" in prefix else "mean"
    if queries == "mean":
        r = torch.zeros(B, 1, N, dtype=torch.float32, device=device)
        r[:, 0, len(prefix) : len(prefix) + grid[0] * grid[1]] = 1.0 / (grid[0] * grid[1])  # mean over patch rows
        return ("mean",), r
    ids = resolve_queries(queries, prefix, grid, suffix)
    rows_idx = list(range(N)) if ids is None else list(ids)
    r = torch.zeros(B, len(rows_idx), N, dtype=torch.float32, device=device)
    r[:, torch.arange(len(rows_idx), device=device), torch.tensor(rows_idx, device=device)] = 1.0
    return tuple(rows_idx), r


def streaming_rollout(
    model: Any,
    images: Any,
    *,
    residual: float = 0.5,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    renormalize: bool = True,
    queries: QuerySpec | Literal["auto", "mean"] = "auto",
    chunk_rows: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    strategy: Literal["auto", "dense", "fused", "streaming"] = "auto",
) -> TokenRows:
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020), by rows.

    Per layer ``F_l = fuse_h softmax(q k^T * scale)``, ``A'_l = rownorm((1 - a) discard(F_l) + a I)`` with
    ``a = residual``, and the joint attention is ``R = A'_{L-1} @ ... @ A'_{start_layer}``. Only the chosen
    query rows ``r`` of ``R`` are computed, from the last layer down: ``r <- r @ A'_l``, so no ``N x N x N``
    product and no ``H x N x N`` (let alone ``L x H x N x N``) tensor is ever held; only the rows of ``A'_l``
    that ``r`` weights are built (the last layer's: the query rows). For mean fusion without discard,
    ``r @ A'_l = (1 - a) / H * sum_h r @ P_h + a r`` is one product with each chunk of probabilities (no fused
    matrix, no identity). With ``discard_ratio > 0`` one layer's fused ``B x N x N`` matrix is materialised at a
    time, since the discard threshold is global over the matrix. Same semantics as
    `vitscope.methods.rollout.rollout`.

    Strategies (`vitscope.capture.budget.choose_strategy`, same result within float32 rounding): ``"dense"``
    builds each layer's fused rows while the layer runs and keeps them (``4 L B N^2`` bytes): for mean fusion
    from `vitscope.capture.kernels.mean_sdpa`, which a plain float32 CPU SDPA call is run as (the attention in
    cache-sized blocks, the head-mean rows added up from the very probabilities that make the layer's output: no
    second ``q k^T``, no ``H x N x N``); for max/min fusion from the probabilities of SDPA's definition written
    out (`vitscope.capture.intercept.substitute_sdpa`); from the kernel's own probabilities when it materialises
    them; else they are rebuilt from q and k. The substituted kernels' outputs differ from the fused kernel's by
    float32 rounding, which only a map is made of here. ``"streaming"`` keeps q and k and rebuilds the rows in
    chunks afterwards. ``"fused"`` (mean fusion without discard; else it streams) has SDPA's own CPU kernel give
    each row's log-sum-exp ``lse`` with its unchanged output, keeps q, k and ``lse``, and computes ``r @ P_h``
    afterwards as ``r @ exp(s q k^T - lse)`` in cache-sized blocks (one GEMM, one ``exp2`` and one product per
    block: no max, sum or division, no ``N x N`` anywhere, about half an attention's cost per layer;
    `_lse_products`); layers whose call the kernel does not take (CUDA, a mask, other dtypes) stream. ``"auto"``
    picks dense while its kept rows fit the budget (larger for mean fusion: `MEAN_DENSE_BYTES`), then fused (or
    streaming). The last layer's few query rows (`FEW_ROWS`) are computed as it runs, and since no model output
    is returned the forward pass ends there (the final norm and head do not run).

    Args:
        model, images: as in `vitscope.capture`; ``model`` may also be a prepared
            `vitscope.capture.streaming.StreamRun` (``images`` then unused).
        residual: weight ``a`` of the identity (the skip connection); 0.5 as in the paper.
        head_fusion: ``"mean"`` (the paper's), ``"max"`` or ``"min"`` over heads.
        discard_ratio: share of each fused matrix's lowest entries zeroed (never the [CLS] key column).
        start_layer: first layer of the product (absolute or negative; earlier layers are skipped).
        renormalize: divide each ``A'_l``'s rows by their sum (a no-op for mean fusion without discard).
        queries: ``"auto"`` ([CLS], or ``"mean"`` over patch rows for models without one), ``"cls"``,
            ``"mean"``, a list of token indices / ``(row, col)`` patches, or ``None`` for all rows.
        chunk_rows, compute_dtype, policy, size, device: as in `fused_attention`.
        strategy: ``"auto"``, ``"dense"`` or ``"streaming"`` (above).

    Returns:
        `TokenRows` with ``rows`` ``(batch, query, N)``; ``.map()`` is the ``(batch, rows, cols)`` map;
        ``meta["strategy"]`` says which strategy ran.

    Example:
        >>> r = streaming_rollout(vit, "cat.png")  # doctest: +SKIP
        >>> r.map().shape  # (1, rows, cols)  # doctest: +SKIP
    """
    check_fusion(head_fusion)
    for name, value, top in (("residual", residual, 1.0), ("discard_ratio", discard_ratio, 1.0)):
        if not (0.0 <= float(value) <= top) or (name == "discard_ratio" and value >= 1.0):
            raise VitscopeError(name, f"{value} is out of range", "pass a value in [0, 1] ([0, 1) for discard_ratio)")
    if strategy not in ("auto", "dense", "fused", "streaming"):
        raise VitscopeError("strategy", f"unknown strategy {strategy!r}",
                            "use 'auto', 'dense', 'fused' or 'streaming'")
    # a `StreamRun` is a model already prepared with its pixels (the registry's context: not prepared twice)
    run = model if isinstance(model, StreamRun) else prepare_run(model, images, device, policy, size)
    info = run.vit.info
    cdt = check_compute_dtype(compute_dtype, run.pixels.device)
    L = info.num_layers
    start = start_layer + L if start_layer < 0 else start_layer
    if not 0 <= start < L:
        raise VitscopeError("start_layer", f"{start_layer} out of range for {L} layers", f"use {-L}..{L - 1}")
    B, N, H, dev = run.batch, run.num_tokens, info.num_heads, run.pixels.device
    query_ids, r = _initial_rows(queries, info.prefix, run.grid, N, B, dev, info.suffix)  # r: (B, R, N)
    layer_ids = tuple(range(start, L))
    # mean-fused rows already sum to 1, so (1 - a) F + a I does too: renormalising would only add rounding
    plain_mean = head_fusion == "mean" and discard_ratio == 0
    chosen = choose_strategy(B, N, len(layer_ids), fused=plain_mean) if strategy == "auto" else strategy
    chunk = chunk_rows_for(chunk_rows, B, H, N)
    a = float(residual)
    cls_index = info.prefix.index("cls") if "cls" in info.prefix else None
    renorm = renormalize and not plain_mean
    # the last layer multiplies the one-hot (or patch-mean) start rows: only the rows they weight are needed;
    # a discard threshold is taken over the whole matrix, so then every row is built
    first_rows = _rows_weighted(r) if discard_ratio == 0 else None
    # the last layer's few query rows are computed as it runs (no kernel substituted there)
    last_direct = first_rows is not None and len(first_rows) <= FEW_ROWS
    # the kernel substituted for plain SDPA calls: dense takes the head-mean rows (mean fusion) or the probabilities
    # with the layer's output, fused the rows' log-sum-exp (mean fusion; else it streams)
    each = {"dense": "mean" if plain_mean else "probs", "fused": "lse" if plain_mean else None}.get(chosen)
    kernel: dict[int, str | None] = dict.fromkeys(layer_ids, each)
    if last_direct:
        kernel[layer_ids[-1]] = None
    scratch = Scratch()
    kept: dict[int, _LayerRows] = {}
    from_kernel: list[int] = []  # layers whose rows the substituted kernel gave (probabilities or lse)

    def on_layer(layer: int, call: AttentionCall) -> None:
        rows = first_rows if layer == layer_ids[-1] else None
        if rows is not None and last_direct and call.probs is None:
            # the last layer's few rows, now: the verified rows (the query's among them) or a chunk of them
            kept[layer] = _LayerRows(rows, fused=_fused_rows(call, rows, head_fusion, chunk, cdt, scratch))
        elif call.mean_probs is not None:  # the substituted kernel's head-mean rows (dense, mean fusion)
            from_kernel.append(layer)
            kept[layer] = _LayerRows(rows, fused=call.mean_probs if rows is None else call.mean_probs[:, rows])
        elif call.lse is not None:  # r @ P_h from q, k and lse after the forward pass (`_lse_products`; rows
            # that r does not weight add nothing); q and k stay views of the layer's qkv (``3 B N D`` kept, no copy)
            from_kernel.append(layer)
            assert call.q is not None and call.k is not None
            kept[layer] = _LayerRows(None, q=call.q, k=call.k, scale=call.scale, lse=call.lse)
        elif call.probs is not None:  # the kernel materialised A: fuse its own probabilities
            if call.q is not None:
                from_kernel.append(layer)
            p = call.probs if rows is None else call.probs[:, :, rows]  # (B, H, R', N)
            kept[layer] = _LayerRows(rows, fused=fuse_chunk(p.float(), head_fusion))
        elif chosen == "dense":
            kept[layer] = _LayerRows(rows, fused=_fused_rows(call, rows, head_fusion, chunk, cdt, scratch))
        else:  # q, k may be views into a fused qkv output: copy them so v (and the rest) can be freed
            assert call.q is not None and call.k is not None
            kept[layer] = _LayerRows(rows, q=call.q.contiguous(), k=call.k.contiguous(), scale=call.scale,
                                     bias=call.bias_rows(slice(None)))

    # dense rows rebuilt from q and k (calls the kernel does not take) reuse the verification's, built for every row
    # at once; mean fusion's come from its kernel, and its last layer needs only the query rows
    forward_qk(run, layer_ids, on_layer, allow_probs=True, every_row=chosen == "dense" and not plain_mean,
               kernel=kernel, until_captured=True)  # no output wanted: the pass ends at the last layer's attention

    for layer in reversed(layer_ids):
        item = kept.pop(layer)  # freed after this layer
        ids = list(range(N)) if item.rows is None else item.rows  # the rows of A'_l this layer builds
        r_rows = r if item.rows is None else r[:, :, ids]  # (B, R, R') the weights of those rows
        # plain mean: the identity's share r @ (a I) = a r up front; otherwise each block carries it
        new_r = r * a if plain_mean and a != 0.0 else torch.zeros_like(r)
        if plain_mean and item.lse is not None:  # (1 - a) / H * sum_h r @ P_h, from the kernel's lse
            new_r.add_(_lse_products(r, item), alpha=(1.0 - a) / H)
        elif plain_mean and item.fused is None:  # (1 - a) / H * sum_h r @ P_h, one product per chunk
            assert item.q is not None and item.k is not None
            q = item.q if item.rows is None else item.q[:, :, ids]
            bias = item.bias if item.bias is None or item.rows is None or item.bias.shape[2] == 1 \
                else item.bias[:, :, ids]
            for s, e, probs in prob_chunks(q, item.k, item.scale, chunk, cdt, scratch, bias):  # (B, H, c, N)
                weights = r_rows[:, :, s:e].repeat(1, 1, H)  # (B, R, H * c), head-major like probs' rows
                new_r.baddbmm_(weights, probs.view(B, H * (e - s), N), alpha=(1.0 - a) / H)
        else:
            for s, e, block in _fused_blocks(item, head_fusion, chunk, cdt, scratch, discard_ratio, cls_index):
                if not plain_mean:  # rows s:e of A'_l = (1 - a) F_l + a I, renormalised, (B, c, N)
                    block = block * (1.0 - a)
                    cols = torch.tensor(ids[s:e], device=dev)
                    block[:, torch.arange(e - s, device=dev), cols] += a
                    if renorm:
                        block.div_(block.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny))
                    new_r.baddbmm_(r_rows[:, :, s:e], block)
                else:
                    new_r.baddbmm_(r_rows[:, :, s:e], block, alpha=1.0 - a)
        r = new_r
        del item
    # fused streams for other fusions, and where no layer's call was one the kernel takes
    streamed = chosen == "fused" and (not plain_mean or (any(kernel.values()) and not from_kernel))
    return TokenRows(
        rows=r, queries=query_ids, prefix=info.prefix, grid=run.grid, patch_size=info.patch_size,
        image_size=run.image_size, suffix=info.suffix,
        meta={"model": info.name, "method": "rollout", "residual": a, "head_fusion": head_fusion,
              "discard_ratio": float(discard_ratio), "start_layer": start, "renormalize": renormalize,
              "strategy": "streaming" if streamed else chosen,
              "kernel_layers": len(from_kernel)},
    )


@dataclass
class _LayerRows:
    """What rollout keeps of one layer between the forward pass and the product: the head-fused rows
    (``fused`` ``(B, R', N)``, "dense" or an eager kernel's probabilities) or q, k, scale and bias to rebuild
    them ("streaming"); ``rows`` are the query rows kept (``None``: all ``N``)."""

    rows: list[int] | None
    fused: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None
    lse: torch.Tensor | None = None  # (B, H, N) each row's log-sum-exp ("fused"), with q and k


#: The last layer's query rows, when at most this many, are computed as the layer runs (the verification's rows
#: reused) instead of by a substituted kernel that would build every row.
FEW_ROWS = 64


def _lse_products(r: torch.Tensor, item: _LayerRows) -> torch.Tensor:
    """``sum_h r @ P_h`` ``(B, R, N)`` for rows ``r`` ``(B, R, N)`` and ``P_h = softmax(q_h k_h^T * scale)`` of a
    layer kept with its rows' log-sum-exp ``lse`` (the fused kernel's, from the forward pass).

    With ``lse`` known a row of ``P_h`` needs no max, sum or division: ``P_h[i, j] = exp(s q_i k_j - lse_i)``,
    which is at most 1 (no overflow). Per head, blocks of query rows are one GEMM
    ``2^(log2(e) s q_i k_j - log2(e) lse_i)`` (the ``- lse`` as the GEMM's added input, ``log2(e)`` folded into
    q), one in-place ``exp2`` and one ``r[:, i] @ P`` product accumulated into the result: the extra cost is one
    ``q k^T`` and ``N^2`` exponentials per head, about half of what the attention's own kernel does (it also
    multiplies by ``v``); only a cache-sized ``(c, N)`` block exists at a time. Float32 (``r >= 0``: no
    cancellation)."""
    q, k, lse = item.q, item.k, item.lse
    assert q is not None and k is not None and lse is not None
    B, H, N, _ = q.shape  # (batch, heads, tokens, head size)
    R = r.shape[1]
    log2e = 1.4426950408889634
    qs = (q * (item.scale * log2e)).float()  # (B, H, N, d): a copy, contiguous
    kt = k.float().transpose(-1, -2)  # (B, H, d, N): GEMM reads the transposed view as is
    shift = (lse.float() * -log2e).unsqueeze(-1)  # (B, H, N, 1): -log2(e) lse_i added to row i
    out = torch.zeros(B, R, N, dtype=torch.float32, device=r.device)
    c = block_rows(N, N)  # query rows per block: one head's block of about 1 MB
    block = torch.empty(c, N, dtype=torch.float32, device=r.device)
    for b in range(B):
        for h in range(H):
            for s in range(0, N, c):
                e = min(N, s + c)
                p = torch.addmm(shift[b, h, s:e], qs[b, h, s:e], kt[b, h], out=block[: e - s])  # (c', N)
                p.exp2_()  # P_h[s:e] = exp(s q k^T - lse)
                out[b].addmm_(r[b, :, s:e], p)  # (R, N) += (R, c') @ (c', N)
    return out


def _rows_weighted(r: torch.Tensor) -> list[int] | None:
    """The token indices with a non-zero weight in some row of ``r`` ``(B, R, N)`` (``None``: all of them)."""
    ids = torch.nonzero(r.ne(0).any(dim=0).any(dim=0)).flatten().tolist()
    return None if len(ids) == r.shape[-1] else ids


def _fused_rows(call: AttentionCall, rows: list[int] | None, head_fusion: str, chunk: int, cdt: torch.dtype,
                scratch: Scratch) -> torch.Tensor:
    """Head-fused attention rows ``(B, R', N)`` of a q/k call, built chunk by chunk."""
    assert call.q is not None and call.k is not None
    N = call.k.shape[2]
    if call.verified is not None and len(call.verified[0]) == N:  # the verification built every row: reuse
        probs = call.verified[1] if rows is None else call.verified[1][:, :, rows]  # (B, H, R', N)
        return fuse_chunk(probs, head_fusion)
    q = call.q if rows is None else call.q[:, :, rows]  # (B, H, R', d)
    bias = call.bias_rows(slice(None) if rows is None else rows)
    B, _, R, _ = q.shape
    out = torch.empty(B, R, call.k.shape[2], dtype=torch.float32, device=q.device)
    for s, e, probs in prob_chunks(q, call.k, call.scale, chunk, cdt, scratch, bias):
        fuse_chunk(probs, head_fusion, out=out[:, s:e])
    return out


def _fused_blocks(item: _LayerRows, head_fusion: str, chunk: int, cdt: torch.dtype, scratch: Scratch,
                  discard_ratio: float, cls_index: int | None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, fused rows (B, c, N))`` of one kept layer, discard applied (over the whole matrix)."""
    fused = item.fused
    if fused is None and discard_ratio > 0:
        fused = _fused_rows(AttentionCall(layer=-1, scale=item.scale, q=item.q, k=item.k, bias=item.bias),
                            item.rows, head_fusion, chunk, cdt, scratch)
    if fused is not None:
        if discard_ratio > 0:
            fused = discard_lowest(fused, float(discard_ratio), cls_index)
        R = fused.shape[1]
        for s in range(0, R, chunk):
            yield s, min(R, s + chunk), fused[:, s : s + chunk]
        return
    assert item.q is not None and item.k is not None
    q = item.q if item.rows is None else item.q[:, :, item.rows]
    bias = item.bias if item.bias is None or item.rows is None or item.bias.shape[2] == 1 else item.bias[:, :, item.rows]
    for s, e, probs in prob_chunks(q, item.k, item.scale, chunk, cdt, scratch, bias):
        B, _, c, N = probs.shape
        yield s, e, fuse_chunk(probs, head_fusion, out=scratch.get("fused", (B, c, N), torch.float32, probs.device))


# ------------------------------------------------------------------------------------------------ distance
@dataclass
class DistancePass:
    """What one `distance_pass` forward gives: ``distance`` ``(layer, batch, head)`` in pixels, the model's
    ``output``, and (with ``token_norms=True``) each block's output token norms ``(num_layers, batch, tokens)``
    float32 (prefix tokens first, then patches row-major)."""

    distance: torch.Tensor
    output: Any
    token_norms: torch.Tensor | None = None


def streaming_distance(
    model: Any,
    images: Any,
    *,
    layers: int | Sequence[int] | None = None,
    chunk_rows: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Mean attention distance of every head in pixels, ``(layer, batch, head)``, without ``N x N`` tensors.

    For query patch ``i`` the distance is ``sum_j A[i, j] * ||p_i - p_j||`` over patch keys ``j`` (patch
    centres in input pixels), with the patch part of the row renormalised to sum to 1; the result is the mean
    over query patches (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Fig. 7). Prefix and
    suffix tokens are neither queries nor keys. A layer that materialises its attention (an explicit softmax) is read from it.
    """
    return distance_pass(model, images, layers=layers, chunk_rows=chunk_rows, compute_dtype=compute_dtype,
                         policy=policy, size=size, device=device).distance


def distance_pass(
    model: Any,
    images: Any,
    *,
    layers: int | Sequence[int] | None = None,
    chunk_rows: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    token_norms: bool = False,
) -> DistancePass:
    """`streaming_distance`, plus the model's output and (``token_norms=True``) every block's output token
    norms, from the same single forward pass (batch mode's per-image measures need all three)."""
    run = prepare_run(model, images, device, policy, size)
    info = run.vit.info
    refuse_video(info.token_frames)
    cdt = check_compute_dtype(compute_dtype, run.pixels.device)
    layer_ids = resolve_layers(layers, info.num_layers)
    B, N = run.batch, run.num_tokens
    P0, P = run.patch_slice.start, run.grid[0] * run.grid[1]  # patches: tokens P0 .. P0 + P - 1
    dev = run.pixels.device
    table = offset_distances(run.grid, info.patch_size, "centre").to(dev)  # (2R-1, 2C-1), as mean_attention_distance
    out = torch.zeros(len(layer_ids), B, info.num_heads, dtype=torch.float32, device=dev)
    pos = {layer: i for i, layer in enumerate(layer_ids)}
    chunk = chunk_rows_for(chunk_rows, B, info.num_heads, N)
    scratch = Scratch()

    def patch_rows(call: AttentionCall) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, end, probs (B, H, c, N))`` over the patch query rows, ``start``/``end`` counted from the
        first patch row."""
        if call.probs is None:  # the kernel's q and k: rows rebuilt chunk by chunk
            assert call.q is not None and call.k is not None
            yield from prob_chunks(call.q[:, :, P0 : P0 + P], call.k, call.scale, chunk, cdt, scratch,
                                   call.bias_rows(slice(P0, P0 + P)))
            return
        for s in range(0, P, chunk):  # the model materialised A itself (an explicit softmax): read its rows
            e = min(P, s + chunk)
            yield s, e, call.rows(range(P0 + s, P0 + e), None, False)

    def on_layer(layer: int, call: AttentionCall) -> None:
        acc = out[pos[layer]]  # (B, H)
        for s, e, probs in patch_rows(call):
            patch = probs[..., P0 : P0 + P]  # (B, H, c, P)
            dist = patch_distances(run.grid, info.patch_size, queries=slice(s, e), table=table).float()  # (c, P)
            weighted = (patch * dist).sum(dim=-1) / patch.sum(dim=-1)  # (B, H, c)
            acc += weighted.sum(dim=-1)
        acc /= P

    norms = torch.empty(info.num_layers, B, N, dtype=torch.float32, device=dev) if token_norms else None
    output = forward_qk(run, layer_ids, on_layer, norms, allow_probs=True)
    return DistancePass(distance=out, output=output, token_norms=norms)
