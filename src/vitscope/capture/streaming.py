"""Low-memory attention analyses: fused maps, rollout and mean distance without ``L x H x N x N``.

`vitscope.capture` with ``queries=None`` returns every layer's, every head's full ``N x N`` matrix: for ViT-B/16 at
1024 px that is ``12 x 12 x 4097^2`` float32 values, 9.7 GB. The analyses here need far less at any one time:

- `fused_attention`: the head-fused ``N x N`` matrix of each layer, ``(layer, batch, query, key)``, computed in
  cache-sized row chunks during the forward pass (peak scratch at most ``2 * CHUNK_BYTES``, never one
  ``H x N x N`` tensor).
- `vitscope.methods.streaming.streaming_rollout`: attention rollout (Abnar & Zuidema 2020) for chosen query rows. q and k of every layer
  are kept during the forward pass (``2 * N * D`` values per layer, far below ``H * N^2``); the rows are then
  pushed through the layers from last to first, ``r <- r @ A'_l``, each ``A'_l`` built chunk by chunk.
- `vitscope.methods.streaming.streaming_distance`: the mean attention distance of each head (Dosovitskiy et al. 2021, Fig. 7), summed over
  row chunks as the forward pass goes.

Each recomputes ``softmax(q k^T * scale + bias)`` from the intercepted q, k and bias like `capture` does, so the model's own
(SDPA) attention stays on and its outputs are unchanged. Logits are computed in ``compute_dtype`` (float32 by
default; float16/bfloat16 allowed on CUDA/MPS for speed) and softmax, fusion and products are float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vitscope._ops import check_fusion, fuse_heads
from vitscope.adapters.base import SizePolicy, VitModel
from vitscope.capture.core import QuerySpec, check_call_tokens, resolve_layers, resolve_queries
from vitscope.capture.hooks import StopForward, eval_mode, record_token_norms
from vitscope.capture.intercept import (
    CHUNK_BYTES,
    AttentionCall,
    CaptureError,
    Scratch,
    observe_attention,
    prob_chunks,
    prove_batch_axis,
    refuse_compiled,
)
from vitscope.capture.prepare import prepare
from vitscope.capture.probe import check_token_axis
from vitscope.capture.windows import check_windowed_layers
from vitscope.errors import VitscopeError

HeadFusion = Literal["mean", "max", "min"]
_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ plumbing
def check_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.float32:
        return dtype
    if dtype in _HALF:
        if device.type == "cpu":
            raise VitscopeError(
                "compute_dtype", f"{dtype} logits on CPU are slower and less exact than float32",
                "keep compute_dtype=torch.float32 on CPU (half precision is for CUDA/MPS)",
            )
        return dtype
    raise VitscopeError("compute_dtype", f"unsupported dtype {dtype}", "use torch.float32, float16 or bfloat16")


def fuse_chunk(probs: torch.Tensor, head_fusion: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, c, N)`` -> ``(B, c, N)`` (into ``out`` when given): `vitscope._ops.fuse_heads` over dim 1."""
    return fuse_heads(probs, head_fusion, dim=1, out=out)


#: Default float32 size of one chunk of ``B x H x rows x N`` logits: small enough that the product, the softmax
#: and what reads the chunk next run in the CPU's cache (a chunk of the whole layer, up to `CHUNK_BYTES`, streams
#: through main memory three times and made rollout at 518 px ~1.6x slower per layer).
CACHE_CHUNK_BYTES = 2 * 2**20
#: ... but at least this many rows per chunk (fewer rows make the ``q k^T`` products too thin to be efficient).
MIN_CHUNK_ROWS = 16


def chunk_rows_for(chunk_rows: int | None, B: int, H: int, N: int) -> int:
    """Query rows per chunk: ``chunk_rows`` when given, else as many as fit in `CACHE_CHUNK_BYTES` (at least
    `MIN_CHUNK_ROWS`, at most `CHUNK_BYTES`' worth)."""
    if chunk_rows is None:
        row = max(1, B * H * N * 4)
        return max(1, min(CHUNK_BYTES // row, max(MIN_CHUNK_ROWS, CACHE_CHUNK_BYTES // row)))
    if int(chunk_rows) < 1:
        raise VitscopeError("chunk_rows", f"must be >= 1, got {chunk_rows}", "pass a positive row count or None")
    return int(chunk_rows)


@dataclass
class StreamRun:
    """A model prepared for one streaming pass: pixels on its device, grid, tokens
    (``[prefix, patches, suffix]``: ``num_tokens`` counts all three)."""

    vit: VitModel
    pixels: torch.Tensor
    grid: tuple[int, int]
    num_tokens: int

    @property
    def batch(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def patch_slice(self) -> slice:
        """The patch tokens: after the prefix, before the suffix (e.g. YOLOS's detection tokens)."""
        P0 = self.vit.info.num_prefix_tokens
        return slice(P0, P0 + self.grid[0] * self.grid[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.pixels.shape[-2]), int(self.pixels.shape[-1]))


def prepare_run(
    model: Any, images: Any, device: str | torch.device | None, policy: SizePolicy | None,
    size: int | tuple[int, int] | None,
) -> StreamRun:
    vit, pixels = prepare(model, images, policy=policy, size=size, device=device)
    grid = vit.grid_for((int(pixels.shape[-2]), int(pixels.shape[-1])))
    info = vit.info
    return StreamRun(vit, pixels, grid, info.num_prefix_tokens + grid[0] * grid[1] + info.num_suffix_tokens)


def forward_qk(run: StreamRun, layer_ids: Sequence[int], on_layer: Any, norms: torch.Tensor | None = None,
               allow_probs: bool = False, every_row: bool = False,
               kernel: str | Mapping[int, str | None] | None = None, until_captured: bool = False) -> Any:
    """Run the model once, intercepting the attention of ``layer_ids``: ``on_layer(layer, call)`` gets each
    layer's `AttentionCall` (q, k ``(B, H, N, d)``, scale, additive bias) as the kernel saw it; ``norms``, when
    given, ``(num_layers, B, N)``, gets every block's output token norms (`vitscope.capture.hooks.record_token_norms`).
    A layer that materialises its attention (``call.probs``, an eager softmax) is refused unless ``allow_probs``
    (the caller then reads ``call.probs``). ``every_row``: the caller reads every row of every layer, so the
    verification computes them once and leaves them in ``call.verified`` (`observe_attention`). ``kernel``
    (``"lse"``, ``"probs"`` or ``"mean"``, or a mapping from layer to one of them): `vitscope.capture.intercept.substitute_sdpa`
    runs the plain SDPA calls and leaves the rows' log-sum-exp, the probabilities or their head mean on the call
    (``"probs"`` and ``"mean"`` round the output differently: for callers that return no model output).
    Returns the model's output; with ``until_captured`` (and no ``norms``) the pass ends once every layer in
    ``layer_ids`` was delivered (`vitscope.capture.intercept.observe_attention`'s ``until_captured``) and
    ``None`` is returned."""
    vit, N = run.vit, run.num_tokens

    def deliver(call: AttentionCall) -> None:
        check_call_tokens(call, N, run.grid, vit.info.num_prefix_tokens, vit.info.num_suffix_tokens)
        if (call.q is None or call.k is None) and not (allow_probs and call.probs is not None):
            raise CaptureError(
                "model", f"layer {call.layer} computes its attention matrix explicitly (an eager softmax), so the "
                "low-memory paths cannot rebuild it in chunks from q and k",
                "use the model's fused attention (timm: fused_attn=True; transformers: attn_implementation='sdpa'), "
                "or vitscope.capture",
            )
        on_layer(call.layer, call)

    refuse_compiled(vit.module)
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(eval_mode(vit.module))
        sites = [vit.sites[i] for i in layer_ids]
        px = run.pixels
        check_token_axis(vit, sites, (int(px.shape[1]), int(px.shape[2]), int(px.shape[3])), px.dtype, px.device, N)
        prove_batch_axis(vit, px, sites, N)
        check = stack.enter_context(observe_attention(sites, deliver, batch=run.batch, tokens=N,
                                                     every_row=every_row, kernel=kernel,
                                                     until_captured=until_captured and norms is None))
        if norms is not None:
            stack.enter_context(record_token_norms(vit.sites, norms))
        try:
            out = vit(run.pixels)
        except StopForward:
            out = None
        check()
        return out


# ------------------------------------------------------------------------------------------------ fused
def fused_attention(
    model: Any,
    images: Any,
    *,
    layers: int | Sequence[int] | None = None,
    queries: QuerySpec = None,
    head_fusion: HeadFusion = "mean",
    chunk_rows: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Head-fused attention of each layer, computed in row chunks: ``(layer, batch, query, key)`` float32.

    ``fused[l, b, i, j] = fuse_h softmax(q_{l,h} k_{l,h}^T * scale)[b, i, j]`` with ``fuse`` the mean, max or
    min over heads. Equals ``capture(model, images, layers=layers, queries=queries).fused(head_fusion)``
    while the peak scratch stays ``2 * CHUNK_BYTES`` (or ``B x H x chunk_rows x N``) instead of ``H x N x N``
    per layer.

    Args:
        layers, queries, policy, size: as in `vitscope.capture`.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        chunk_rows: query rows per chunk (default: `chunk_rows_for`'s cache-sized chunks).
        compute_dtype: dtype of the ``q k^T`` logits; float16/bfloat16 only on CUDA/MPS.
        device: run there (``"auto"`` picks CUDA, MPS, then CPU); moves the model when it lives elsewhere.

    Example:
        >>> fused = vitscope.capture.streaming.fused_attention(vit, "cat.png", layers=[-1])  # doctest: +SKIP
        >>> fused.shape  # (1, 1, N, N)  # doctest: +SKIP
    """
    check_fusion(head_fusion)
    run = prepare_run(model, images, device, policy, size)
    info = run.vit.info
    cdt = check_compute_dtype(compute_dtype, run.pixels.device)
    layer_ids = resolve_layers(layers, info.num_layers)
    check_windowed_layers(info, layer_ids, default=layers is None)
    query_ids = resolve_queries(queries, info.prefix, run.grid, info.suffix)
    B, N = run.batch, run.num_tokens
    Q = N if query_ids is None else len(query_ids)
    out = torch.empty(len(layer_ids), B, Q, N, dtype=torch.float32, device=run.pixels.device)
    pos = {layer: i for i, layer in enumerate(layer_ids)}
    chunk = chunk_rows_for(chunk_rows, B, info.num_heads, N)
    scratch = Scratch()

    def on_layer(layer: int, call: AttentionCall) -> None:
        q, k, bias = call.q, call.k, call.bias_rows(slice(None))
        assert q is not None and k is not None
        if query_ids is not None:
            q = q[:, :, list(query_ids)]  # (B, H, Q, d)
            bias = call.bias_rows(list(query_ids))
        for start, stop, probs in prob_chunks(q, k, call.scale, chunk, cdt, scratch, bias):
            out[pos[layer], :, start:stop] = fuse_chunk(probs, head_fusion)

    forward_qk(run, layer_ids, on_layer, until_captured=True)
    return out
