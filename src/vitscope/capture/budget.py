"""How much a capture costs before it runs: token count and attention memory, refused with the estimate.

A capture keeps ``layers x batch x heads x queries x keys`` float32 probabilities, recomputes them in row
chunks (`vitscope.capture.core.CHUNK_BYTES` of scratch) and reads each layer's q and k; the model's own
forward pass costs ``N^2`` per head and layer whatever is kept, so the token count has a limit of its own.
Both limits come from `vitscope.limits` (per call, or for a block with `vitscope.limits.limits`).
"""

from __future__ import annotations

from typing import Literal

from vitscope import limits
from vitscope.errors import VitscopeError
from vitscope.limits import _human, check_tokens

__all__ = ["DENSE_BYTES", "MEAN_DENSE_BYTES", "Strategy", "check_capture_budget", "check_tokens", "choose_strategy",
           "estimate_capture_bytes"]

Strategy = Literal["dense", "fused", "streaming"]

#: Below this many bytes of kept head-fused ``L x B x N x N`` float32 attention, methods that have both strategies
#: build each layer's rows while the layer runs and keep them ("dense"); above it they keep q and k and rebuild
#: the rows in chunks afterwards ("streaming").
DENSE_BYTES = 32 * 2**20

#: The same budget where the caller fuses heads by their mean (rollout with mean fusion, no discard): there the
#: kernel substituted for SDPA (`vitscope.capture.kernels.mean_sdpa`) builds the head-mean rows block by block
#: with the layer's own output, so dense costs no ``H x N x N`` at any time and no second ``q k^T``; only the kept
#: ``4 L B N^2`` bytes count (DINOv2-S/14 at 518 px: 91 MB).
MEAN_DENSE_BYTES = 256 * 2**20


def choose_strategy(batch: int, tokens: int, n_layers: int, *,
                    budget_bytes: int | None = None, fused: bool = False) -> Strategy:
    """``"dense"``, ``"fused"`` or ``"streaming"`` for a method over ``n_layers`` layers' head-fused attention
    (heads do not count: dense keeps head-fused rows, the others compute one cache-sized chunk at a time).

    The arithmetic is the same either way (one ``softmax(q k^T)`` per layer and head, in cache-sized row chunks);
    what differs is what is kept between the forward pass and the product over layers: ``"dense"`` keeps each
    layer's fused ``B x N x N`` rows (``4 L B N^2`` bytes; built while the layer runs, from the kernel's own
    probabilities when it materialises them), ``"streaming"`` keeps q and k (``8 L B H N d`` bytes) and rebuilds
    the rows afterwards. Dense is picked while its kept memory is within ``budget_bytes`` (default
    `DENSE_BYTES`), so small inputs skip the copies of q and k and large ones never hold ``N^2`` per layer.
    ``fused=True`` (the caller fuses heads by their mean: rollout with mean fusion and no discard) raises the
    default budget to `MEAN_DENSE_BYTES` (its dense rows come from the substituted kernel, the attention computed
    once), and above it picks ``"fused"``: it keeps what streaming keeps plus each row's log-sum-exp
    (``4 L B H N`` bytes more) and computes the products over the probabilities from them, never building them
    (`vitscope.methods.streaming.streaming_rollout`).
    """
    for name, value in (("batch", batch), ("tokens", tokens), ("n_layers", n_layers)):
        if value < 1:
            raise VitscopeError(name, f"must be positive, got {value}", "pass the model's and input's sizes")
    dense = 4 * n_layers * batch * tokens * tokens
    cap = (MEAN_DENSE_BYTES if fused else DENSE_BYTES) if budget_bytes is None else budget_bytes
    if dense <= cap:
        return "dense"
    return "fused" if fused else "streaming"



def estimate_capture_bytes(
    batch: int, tokens: int, n_layers: int, n_heads_kept: int, n_queries: int, *, n_heads: int | None = None,
    head_dim: int = 64, chunk_bytes: int = 64 * 2**20,
) -> int:
    """Bytes of float32 attention a capture holds: the kept probabilities, one chunk of logits, one layer's q/k."""
    kept = 4 * n_layers * batch * n_heads_kept * n_queries * tokens
    heads = n_heads if n_heads is not None else n_heads_kept
    qk = 2 * 4 * batch * heads * tokens * head_dim
    scratch = min(chunk_bytes, 4 * batch * heads * n_queries * tokens) if n_queries else 0
    return kept + qk + scratch


def check_capture_budget(
    batch: int, tokens: int, n_layers: int, n_heads_kept: int, n_queries: int, *, n_heads: int | None = None,
    head_dim: int = 64, limit_bytes: int | None = None, max_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> int:
    """Refuse a capture whose token count or estimated attention memory is over the limits; return the estimate.

    ``n_heads_kept`` is 1 for ``heads="mean"``; ``n_queries`` the kept query rows (``tokens`` for all rows).
    """
    for name, value in (("batch", batch), ("tokens", tokens)):
        if value < 1:
            raise VitscopeError(name, f"must be positive, got {value}", "pass at least one image and one patch")
    check_tokens(tokens, grid, max_tokens)
    need = estimate_capture_bytes(batch, tokens, n_layers, n_heads_kept, n_queries, n_heads=n_heads,
                                  head_dim=head_dim)
    cap = limits.max_bytes(limit_bytes)
    if need > cap:
        fixes = []
        if n_layers > 1:
            fixes.append("`layers=-1`")
        if n_queries > 1:
            fixes.append("`queries='cls'`")
        if n_heads_kept > 1:
            fixes.append("`heads='mean'`")
        fixes.append("a smaller `size=...`")
        raise VitscopeError(
            "capture", f"needs about {_human(need)} of attention memory ({n_layers} layers x {batch} images x "
            f"{n_heads_kept} heads x {n_queries:,} queries x {tokens:,} keys, float32), more than the "
            f"{_human(cap)} limit", f"ask for less: {', '.join(fixes)}; or raise the limit `max_bytes=...`",
        )
    return need
