"""Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL).

The layers form a graph: one node per (layer input, token); an edge from token ``j`` at the input of layer
``l`` to token ``i`` at its output with capacity ``Â_l[i, j]``, the same residual-augmented, head-fused,
row-normalised attention as rollout (``Â_l = rownorm((1 - a) fuse_h A_l + a I)``, default ``a = 0.5``). The
map value of patch ``p`` is the maximum flow from input node ``p`` to the [CLS] node at the output of the
last layer. Where rollout multiplies (sums over all paths, weighted by products), flow is limited by the
narrowest cut, so it spreads less mass to unrelated tokens.

Exact computation: ``scipy.sparse.csgraph.maximum_flow`` (Dinic) on integer capacities
``round(cap * 2**20)``, one max-flow per patch; the rounding error is below ``2**-21`` per edge of the min
cut. The graph has ``layers * N**2`` edges, so the exact method is limited to ``N <= max_tokens`` tokens
(default `MAX_TOKENS`); beyond that a clear error is raised unless ``approximate=True``.

Approximation (``approximate=True``): the patch grid is pooled into ``k x k`` cells (``k`` the smallest
integer making the token count fit, edge cells smaller), prefix tokens kept as they are. The coarse
attention is ``Â_c[I, J] = mean_{i in I} sum_{j in J} Â[i, j]`` (rows still sum to 1), the exact flow is
computed on the coarse graph, and each patch gets its cell's flow divided by the cell's patch count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.methods._common import (
    Query,
    check_unit,
    contiguous_layers,
    fuse_heads,
    mix_residual,
    per_image_maps,
    require_full,
    token_ids_for_query,
)
from vitscope.methods.registry import MapContext, MapResult, Method, register

#: Largest token count (prefix + patches) for the exact flow. Measured on one CPU core, 12 layers: 0.3 s per
#: image at 50 or 81 tokens, 4.7 s at 197 tokens (ViT-B/16 at 224 px).
MAX_TOKENS = 260
#: Integer scale of the capacities handed to scipy's max-flow.
CAPACITY_SCALE = 2**20


def _pooling(n_prefix: int, grid: tuple[int, int], k: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Assignment matrix ``M`` ``(N_coarse, N)`` of fine tokens to coarse tokens, and the coarse grid."""
    rows, cols = grid
    cr, cc = math.ceil(rows / k), math.ceil(cols / k)
    n_fine, n_coarse = n_prefix + rows * cols, n_prefix + cr * cc
    m = np.zeros((n_coarse, n_fine))
    for t in range(n_prefix):
        m[t, t] = 1.0
    for r in range(rows):
        for c in range(cols):
            m[n_prefix + (r // k) * cc + (c // k), n_prefix + r * cols + c] = 1.0
    return m, (cr, cc)


def max_flows(factors: list[np.ndarray], sink_row: np.ndarray, sources: list[int]) -> np.ndarray:
    """Max flow from each input token in ``sources`` to one output node.

    Args:
        factors: ``K - 1`` matrices ``(N, N)``, ``factors[m][i, j]`` the capacity from token ``j`` at depth
            ``m`` to token ``i`` at depth ``m + 1``.
        sink_row: ``(N,)`` capacities from the tokens at depth ``K - 1`` into the sink.
        sources: token indices at depth 0.

    Returns:
        ``(len(sources),)`` flow values (in capacity units).
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    N = sink_row.shape[0]
    depth = len(factors) + 1
    sink = depth * N
    src_nodes, dst_nodes, caps = [], [], []
    for m, f in enumerate(factors):
        i, j = np.nonzero(f > 0)
        src_nodes.append(m * N + j)
        dst_nodes.append((m + 1) * N + i)
        caps.append(f[i, j])
    (j_last,) = np.nonzero(sink_row > 0)
    src_nodes.append((depth - 1) * N + j_last)
    dst_nodes.append(np.full(j_last.shape, sink))
    caps.append(sink_row[j_last])
    cap_int = np.rint(np.concatenate(caps) * CAPACITY_SCALE).astype(np.int32)
    graph = csr_array(
        (cap_int, (np.concatenate(src_nodes), np.concatenate(dst_nodes))), shape=(sink + 1, sink + 1)
    )
    graph.sum_duplicates()
    out = np.zeros(len(sources))
    for n, s in enumerate(sources):
        out[n] = maximum_flow(graph, int(s), sink).flow_value / CAPACITY_SCALE
    return out


def attention_flow(
    attn: Attentions,
    *,
    head_fusion: str = "mean",
    residual: float = 0.5,
    start_layer: int = 0,
    query: Query = None,
    max_tokens: int = MAX_TOKENS,
    approximate: bool = False,
) -> torch.Tensor:
    """Attention flow map ``(batch, rows, cols)``: max flow from each input patch to [CLS] at the top.

    Capacities are the rollout factors ``Â_l = rownorm((1 - residual) fuse_h A_l + residual I)`` of the
    consecutive captured layers from ``start_layer`` on (see the module docstring). The sink is the query
    token at the last layer: [CLS] by default; for models without [CLS] (or ``query="mean"``) a virtual node
    whose incoming capacities are the mean of the last layer's patch rows.

    Args:
        attn: attentions with every query row, consecutive layers.
        head_fusion: ``"mean"`` (default), ``"max"`` or ``"min"``.
        residual: identity weight ``a`` (default 0.5, the paper's ``0.5 A + 0.5 I``).
        start_layer: first layer of the graph (default 0).
        query: sink token (see `cls_map`).
        max_tokens: largest ``N`` computed exactly (default `MAX_TOKENS`).
        approximate: past ``max_tokens``, compute the flow on a pooled grid instead of raising.

    Returns:
        float32 ``(batch, rows, cols)``; every value lies in ``[0, 1]`` (a row of the last factor sums to 1).
    """
    if attn.grids is not None:  # a padded batch: each image's own tokens, on its own grid
        return per_image_maps(attn, lambda a: attention_flow(a, head_fusion=head_fusion, residual=residual,
                                                             start_layer=start_layer, query=query,
                                                             max_tokens=max_tokens, approximate=approximate))
    require_full(attn, "attention_flow")
    check_unit("residual", residual)
    positions = contiguous_layers(attn, start_layer, "attention_flow")
    N, n_prefix, (rows, cols) = attn.num_tokens, attn.num_prefix_tokens, attn.grid
    pool: np.ndarray | None = None
    grid = attn.grid
    if max_tokens < N:
        if attn.num_suffix_tokens:
            raise VitscopeError(
                "attn", f"exact attention flow is limited to {max_tokens} tokens, these attentions have {N}, and the "
                "pooled approximation does not handle suffix tokens", "raise max_tokens, or use rollout",
            )
        if attn.frames > 1:
            raise VitscopeError(
                "attn", f"exact attention flow is limited to {max_tokens} tokens, these attentions have {N}, and the "
                "pooled approximation would pool patches of different frames together", "raise max_tokens, or use "
                "rollout",
            )
        if not approximate:
            raise VitscopeError(
                "attn", f"exact attention flow is limited to {max_tokens} tokens, these attentions have {N} "
                f"({n_prefix} prefix + {rows}x{cols} patches)",
                "pass approximate=True (flow on a pooled grid), raise max_tokens, or use rollout",
            )
        k = 2
        while n_prefix + math.ceil(rows / k) * math.ceil(cols / k) > max_tokens:
            k += 1
            if k > max(rows, cols):
                raise VitscopeError("max_tokens", f"{max_tokens} cannot hold even one pooled cell",
                                    f"use max_tokens > {n_prefix + 1}")
        pool, grid = _pooling(n_prefix, attn.grid, k)
    sink_ids = token_ids_for_query(attn.prefix, grid, query, attn.suffix if pool is None else ())
    B = attn.batch_size
    maps = np.zeros((B, grid[0] * grid[1]))
    for b in range(B):
        factors = []
        for p in positions:
            fused = fuse_heads(attn.weights[p, b : b + 1].double(), head_fusion, attn.heads, dim=1)  # (1, N, N)
            f = mix_residual(fused, residual, True)[0].cpu().numpy()
            if pool is not None:
                f = (pool @ f @ pool.T) / pool.sum(axis=1, keepdims=True)  # mean over rows, sum over columns
            factors.append(f)
        sink_row = factors[-1][sink_ids].mean(axis=0)
        sources = list(range(n_prefix, n_prefix + grid[0] * grid[1]))  # the patches (not the suffix tokens)
        maps[b] = max_flows(factors[:-1], sink_row, sources)
    out = torch.from_numpy(maps).reshape(B, *grid)
    if pool is not None:
        sizes = pool[n_prefix:, n_prefix:].sum(axis=1)  # patches per coarse cell
        cell_of = pool[n_prefix:, n_prefix:].argmax(axis=0)  # (P_fine,) coarse cell of each fine patch
        fine = out.reshape(B, -1)[:, torch.from_numpy(cell_of)] / torch.from_numpy(sizes[cell_of])
        out = fine.reshape(B, rows, cols)
    return out.float()


def _compute(ctx: MapContext, *, head_fusion: str = "mean", residual: float = 0.5, start_layer: int = 0,
             query: Query = None, approximate: bool = True) -> MapResult:
    grid_map = attention_flow(ctx.capture(), head_fusion=head_fusion, residual=residual, start_layer=start_layer,
                              query=query, approximate=approximate)
    return MapResult(map=grid_map.float())


register(Method(
    name="flow", compute=_compute,
    summary="attention flow: max flow from each patch to the query through the rollout graph",
    paper="Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020",
))
