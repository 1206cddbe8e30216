"""Low-memory attention analyses: fused maps, rollout and mean distance without ``L x H x N x N``.

`vitscope.capture` with ``queries=None`` returns every layer's, every head's full ``N x N`` matrix: for ViT-B/16 at
1024 px that is ``12 x 12 x 4097^2`` float32 values, 9.7 GB. The analyses here need far less at any one time:

- `fused_attention`: the head-fused ``N x N`` matrix of each layer, ``(layer, batch, query, key)``, computed in
  row chunks during the forward pass (peak scratch ``2 * CHUNK_BYTES``, never one ``H x N x N`` tensor).
- `streaming_rollout`: attention rollout (Abnar & Zuidema 2020) for chosen query rows. q and k of every layer
  are kept during the forward pass (``2 * N * D`` values per layer, far below ``H * N^2``); the rows are then
  pushed through the layers from last to first, ``r <- r @ A'_l``, each ``A'_l`` built chunk by chunk.
- `streaming_distance`: the mean attention distance of each head (Dosovitskiy et al. 2021, Fig. 7), summed over
  row chunks as the forward pass goes.

Each recomputes ``softmax(q k^T * scale)`` from the hooked q and k like `capture` does, so the model's own
(SDPA) attention stays on and its outputs are unchanged. Logits are computed in ``compute_dtype`` (float32 by
default; float16/bfloat16 allowed on CUDA/MPS for speed) and softmax, fusion and products are float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vitscope.adapters.base import SizePolicy, VitModel
from vitscope.capture.core import CHUNK_BYTES, QuerySpec, resolve_layers, resolve_queries
from vitscope.capture.hooks import eval_mode, record_sites
from vitscope.errors import VitscopeError

HeadFusion = Literal["mean", "max", "min"]
_FUSIONS = ("mean", "max", "min")
_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ plumbing
def default_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, fallback: torch.device) -> torch.device:
    """``None`` -> ``fallback``; ``"auto"`` -> `default_device`; else the named device (checked to exist)."""
    if device is None:
        return fallback
    if isinstance(device, str) and device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VitscopeError("device", f"unknown device {device!r}", "use 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VitscopeError("device", "CUDA is not available here", "use device='cpu' or 'auto'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VitscopeError("device", "Apple MPS is not available here", "use device='cpu' or 'auto'")
    return dev


def _check_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
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


def _check_fusion(head_fusion: str) -> None:
    if head_fusion not in _FUSIONS:
        raise VitscopeError("head_fusion", f"unknown value {head_fusion!r}", "use 'mean', 'max' or 'min'")


def _fuse(probs: torch.Tensor, head_fusion: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, c, N)`` -> ``(B, c, N)`` (into ``out`` when given)."""
    if head_fusion == "mean":
        return torch.mean(probs, dim=1, out=out) if out is not None else probs.mean(dim=1)
    if head_fusion == "max":
        return torch.amax(probs, dim=1, out=out) if out is not None else probs.amax(dim=1)
    return torch.amin(probs, dim=1, out=out) if out is not None else probs.amin(dim=1)


def _chunk_rows(chunk_rows: int | None, B: int, H: int, N: int) -> int:
    if chunk_rows is None:
        return max(1, CHUNK_BYTES // max(1, B * H * N * 4))
    if int(chunk_rows) < 1:
        raise VitscopeError("chunk_rows", f"must be >= 1, got {chunk_rows}", "pass a positive row count or None")
    return int(chunk_rows)


class Scratch:
    """Reusable flat float buffers, so chunks do not allocate (and page-fault) fresh memory every time.

    On CPU a fresh 64 MiB tensor is a new ``mmap`` whose pages fault in on first touch, which costs about as
    much as the softmax over it; reusing one buffer per role pays that once per call instead of per chunk.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` backed by the ``role`` buffer (grown when too small)."""
        n = math.prod(shape)
        buf = self._bufs.get(role)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[role] = buf
        return buf[:n].view(shape)


def prob_chunks(
    q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int, compute_dtype: torch.dtype = torch.float32,
    scratch: Scratch | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, softmax(q[:, :, start:stop] @ k^T * scale))`` as float32 ``(B, H, c, N)``.

    q: ``(B, H, Q, d)``, k: ``(B, H, N, d)``. Only one chunk of logits exists at a time: the yielded tensor is
    a view of a reused buffer (``scratch``, shared across calls when given), so consume it before advancing.
    """
    scratch = scratch or Scratch()
    k = k if k.dtype == compute_dtype else k.to(compute_dtype)
    kt = k.transpose(-2, -1)  # (B, H, d, N)
    B, H, Q, _ = q.shape
    N = k.shape[2]
    dev = q.device
    for start in range(0, Q, chunk):
        stop = min(Q, start + chunk)
        qc = q[:, :, start:stop].to(compute_dtype) * scale  # scale the (c, d) rows, not the (c, N) logits
        logits = scratch.get("logits", (B, H, stop - start, N), compute_dtype, dev)
        torch.matmul(qc, kt, out=logits)  # (B, H, c, N)
        probs = scratch.get("probs", (B, H, stop - start, N), torch.float32, dev)
        torch.softmax(logits, dim=-1, dtype=torch.float32, out=probs) if compute_dtype != torch.float32 else \
            torch.softmax(logits, dim=-1, out=probs)
        yield start, stop, probs


@dataclass
class _Run:
    """A model prepared for one streaming pass: pixels on its device, grid, tokens."""

    vit: VitModel
    pixels: torch.Tensor
    grid: tuple[int, int]
    num_tokens: int

    @property
    def batch(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.pixels.shape[-2]), int(self.pixels.shape[-1]))


def _prepare(
    model: Any, images: Any, device: str | torch.device | None, policy: SizePolicy | None,
    size: int | tuple[int, int] | None,
) -> _Run:
    from vitscope.adapters import as_vit

    vit = as_vit(model)
    dev = resolve_device(device, vit.device)
    if dev != vit.device:
        vit.module.to(dev)  # the `device=` argument moves the model, as `model.to(device)` would
    pixels = vit.preprocess(images, policy=policy, size=size).to(dev, vit.dtype)
    if pixels.shape[1] != vit.info.preprocess.channels:
        raise VitscopeError(
            "images", f"{pixels.shape[1]} channels but the model expects {vit.info.preprocess.channels}",
            "pass pixel values with the model's channel count",
        )
    grid = vit.grid_for((int(pixels.shape[-2]), int(pixels.shape[-1])))
    from vitscope.capture.budget import check_tokens

    check_tokens(vit.info.num_prefix_tokens + grid[0] * grid[1], grid)  # also for pixel tensors passed as is
    return _Run(vit, pixels, grid, vit.info.num_prefix_tokens + grid[0] * grid[1])


def _forward_qk(run: _Run, layer_ids: Sequence[int], on_layer: Any) -> Any:
    """Run the model once with q/k hooks on ``layer_ids``; ``on_layer(layer, q, k)`` gets ``(B, H, N, d)``."""
    vit, N = run.vit, run.num_tokens

    def deliver(layer: int, t: dict[str, torch.Tensor]) -> None:
        q, k = t["q"], t["k"]
        if q.shape[2] != N:
            raise VitscopeError(
                "images", f"layer {layer} saw {q.shape[2]} tokens, expected {N} for a {run.grid[0]}x{run.grid[1]} "
                f"grid plus {vit.info.num_prefix_tokens} prefix tokens", "check the model's patch size and prefix",
            )
        on_layer(layer, q, k)

    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(eval_mode(vit.module))
        stack.enter_context(record_sites([vit.sites[i] for i in layer_ids], ("q", "k"), deliver))
        return vit(run.pixels)


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
        chunk_rows: query rows per chunk (default: as many as fit in ``CHUNK_BYTES`` of float32 logits).
        compute_dtype: dtype of the ``q k^T`` logits; float16/bfloat16 only on CUDA/MPS.
        device: run there (``"auto"`` picks CUDA, MPS, then CPU); moves the model when it lives elsewhere.

    Example:
        >>> fused = vitscope.capture.streaming.fused_attention(vit, "cat.png", layers=[-1])  # doctest: +SKIP
        >>> fused.shape  # (1, 1, N, N)  # doctest: +SKIP
    """
    _check_fusion(head_fusion)
    run = _prepare(model, images, device, policy, size)
    info = run.vit.info
    cdt = _check_compute_dtype(compute_dtype, run.pixels.device)
    layer_ids = resolve_layers(layers, info.num_layers)
    query_ids = resolve_queries(queries, info.prefix, run.grid)
    B, N = run.batch, run.num_tokens
    Q = N if query_ids is None else len(query_ids)
    out = torch.empty(len(layer_ids), B, Q, N, dtype=torch.float32, device=run.pixels.device)
    pos = {layer: i for i, layer in enumerate(layer_ids)}
    chunk = _chunk_rows(chunk_rows, B, info.num_heads, N)
    scratch = Scratch()

    def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if query_ids is not None:
            q = q[:, :, list(query_ids)]  # (B, H, Q, d)
        for start, stop, probs in prob_chunks(q, k, run.vit.sites[layer].scale, chunk, cdt, scratch):
            out[pos[layer], :, start:stop] = _fuse(probs, head_fusion)

    _forward_qk(run, layer_ids, on_layer)
    return out


# ------------------------------------------------------------------------------------------------ rollout
@dataclass
class TokenRows:
    """Rows over all ``N`` tokens for some query tokens (e.g. rollout's joint attention of [CLS]).

    Attributes:
        rows: float32 ``(batch, query, key)``; ``key`` covers all ``N = len(prefix) + rows * cols`` tokens.
        queries: token index of each entry along dim 1, or ``"mean"`` for the mean over the patch rows.
        prefix, grid, patch_size, image_size: the token layout, as in `vitscope.Attentions`.
        meta: provenance (model, method, parameters).
    """

    rows: torch.Tensor
    queries: tuple[int | str, ...]
    prefix: tuple[str, ...]
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix)

    def maps(self) -> torch.Tensor:
        """Patch part of every row on the grid: ``(batch, query, rows, cols)`` (height before width)."""
        gh, gw = self.grid
        return self.rows[..., self.num_prefix_tokens :].reshape(*self.rows.shape[:-1], gh, gw)

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
                  device: torch.device) -> tuple[tuple[int | str, ...], torch.Tensor]:
    """The starting rows ``r`` ``(B, R, N)``: one-hot rows of the query tokens, or the patch mean for ``"mean"``."""
    if queries == "auto":
        queries = "cls" if "cls" in prefix else "mean"
    if queries == "mean":
        r = torch.zeros(B, 1, N, dtype=torch.float32, device=device)
        r[:, 0, len(prefix) :] = 1.0 / (N - len(prefix))  # mean over the patch rows
        return ("mean",), r
    ids = resolve_queries(queries, prefix, grid)
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
) -> TokenRows:
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020), streamed.

    Per layer ``F_l = fuse_h softmax(q k^T * scale)``, ``A'_l = rownorm((1 - a) discard(F_l) + a I)`` with
    ``a = residual``, and the joint attention is ``R = A'_{L-1} @ ... @ A'_{start_layer}``. Only the chosen
    query rows ``r`` of ``R`` are computed, from the last layer down: ``r <- r @ A'_l``, each ``A'_l`` rebuilt
    from the stored q and k in row chunks, so no ``H x N x N`` (let alone ``L x H x N x N``) tensor is ever
    held. With ``discard_ratio > 0`` one layer's fused ``B x N x N`` matrix is materialised at a time, since
    the discard threshold is global over the matrix. Same semantics as `vitscope.methods.rollout.rollout`.

    Args:
        residual: weight ``a`` of the identity (the skip connection); 0.5 as in the paper.
        head_fusion: ``"mean"`` (the paper's), ``"max"`` or ``"min"`` over heads.
        discard_ratio: share of each fused matrix's lowest entries zeroed (never the [CLS] key column).
        start_layer: first layer of the product (absolute or negative; earlier layers are skipped).
        renormalize: divide each ``A'_l``'s rows by their sum (a no-op for mean fusion without discard).
        queries: ``"auto"`` ([CLS], or ``"mean"`` over patch rows for models without one), ``"cls"``,
            ``"mean"``, a list of token indices / ``(row, col)`` patches, or ``None`` for all rows.
        chunk_rows, compute_dtype, policy, size, device: as in `fused_attention`.

    Returns:
        `TokenRows` with ``rows`` ``(batch, query, N)``; ``.map()`` is the ``(batch, rows, cols)`` map.

    Example:
        >>> r = streaming_rollout(vit, "cat.png")  # doctest: +SKIP
        >>> r.map().shape  # (1, rows, cols)  # doctest: +SKIP
    """
    from vitscope.methods._common import discard_lowest

    _check_fusion(head_fusion)
    for name, value, top in (("residual", residual, 1.0), ("discard_ratio", discard_ratio, 1.0)):
        if not (0.0 <= float(value) <= top) or (name == "discard_ratio" and value >= 1.0):
            raise VitscopeError(name, f"{value} is out of range", "pass a value in [0, 1] ([0, 1) for discard_ratio)")
    run = _prepare(model, images, device, policy, size)
    info = run.vit.info
    cdt = _check_compute_dtype(compute_dtype, run.pixels.device)
    L = info.num_layers
    start = start_layer + L if start_layer < 0 else start_layer
    if not 0 <= start < L:
        raise VitscopeError("start_layer", f"{start_layer} out of range for {L} layers", f"use {-L}..{L - 1}")
    B, N, dev = run.batch, run.num_tokens, run.pixels.device
    query_ids, r = _initial_rows(queries, info.prefix, run.grid, N, B, dev)  # r: (B, R, N)
    layer_ids = tuple(range(start, L))
    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        # q, k are views into the fused qkv output: copy them so v (and the rest) can be freed.
        stored[layer] = (q.contiguous(), k.contiguous())

    _forward_qk(run, layer_ids, on_layer)

    chunk = _chunk_rows(chunk_rows, B, info.num_heads, N)
    a = float(residual)
    cls_index = info.prefix.index("cls") if "cls" in info.prefix else None
    # mean-fused rows already sum to 1, so (1 - a) F + a I does too: renormalising would only add rounding
    renorm = renormalize and (head_fusion != "mean" or discard_ratio > 0)
    scratch = Scratch()
    for layer in reversed(layer_ids):
        q, k = stored.pop(layer)  # (B, H, N, d); freed after this layer
        scale = run.vit.sites[layer].scale
        blocks: Iterator[tuple[int, int, torch.Tensor]]
        if discard_ratio > 0:
            fused = torch.empty(B, N, N, dtype=torch.float32, device=dev)
            for s, e, probs in prob_chunks(q, k, scale, chunk, cdt, scratch):
                _fuse(probs, head_fusion, out=fused[:, s:e])
            fused = discard_lowest(fused, float(discard_ratio), cls_index)
            blocks = ((s, min(N, s + chunk), fused[:, s : s + chunk]) for s in range(0, N, chunk))
        else:
            blocks = (
                (s, e, _fuse(probs, head_fusion, out=scratch.get("fused", (B, e - s, N), torch.float32, dev)))
                for s, e, probs in prob_chunks(q, k, scale, chunk, cdt, scratch)
            )
        new_r = torch.zeros_like(r)
        for s, e, block in blocks:
            if a != 0.0:  # rows s:e of A'_l = (1 - a) F_l + a I, built in place, (B, c, N)
                block.mul_(1.0 - a)
                diag = torch.arange(e - s, device=dev)
                block[:, diag, diag + s] += a
            if renorm:
                block.div_(block.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny))
            new_r.baddbmm_(r[:, :, s:e], block)  # r[:, :, s:e] @ A'_l[s:e]
        r = new_r
        del q, k
    return TokenRows(
        rows=r, queries=query_ids, prefix=info.prefix, grid=run.grid, patch_size=info.patch_size,
        image_size=run.image_size,
        meta={"model": info.name, "method": "rollout", "residual": a, "head_fusion": head_fusion,
              "discard_ratio": float(discard_ratio), "start_layer": start, "renormalize": renormalize},
    )


# ------------------------------------------------------------------------------------------------ distance
def patch_centres(grid: tuple[int, int], patch_size: tuple[int, int], device: torch.device | None = None,
                  ) -> torch.Tensor:
    """Pixel coordinates ``(y, x)`` of every patch centre in row-major order: ``(rows * cols, 2)`` float32."""
    (gh, gw), (ph, pw) = grid, patch_size
    ys = (torch.arange(gh, dtype=torch.float32, device=device) + 0.5) * ph
    xs = (torch.arange(gw, dtype=torch.float32, device=device) + 0.5) * pw
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (gh, gw) each
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)


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
    over query patches (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Fig. 7). Prefix tokens
    are neither queries nor keys.
    """
    run = _prepare(model, images, device, policy, size)
    info = run.vit.info
    cdt = _check_compute_dtype(compute_dtype, run.pixels.device)
    layer_ids = resolve_layers(layers, info.num_layers)
    B, N, P0 = run.batch, run.num_tokens, info.num_prefix_tokens
    P = N - P0
    dev = run.pixels.device
    centres = patch_centres(run.grid, info.patch_size, dev)  # (P, 2)
    out = torch.zeros(len(layer_ids), B, info.num_heads, dtype=torch.float32, device=dev)
    pos = {layer: i for i, layer in enumerate(layer_ids)}
    chunk = _chunk_rows(chunk_rows, B, info.num_heads, N)
    scratch = Scratch()

    def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        acc = out[pos[layer]]  # (B, H)
        for s, e, probs in prob_chunks(q[:, :, P0:], k, run.vit.sites[layer].scale, chunk, cdt, scratch):
            patch = probs[..., P0:]  # (B, H, c, P)
            dist = (centres[s:e, None, :] - centres[None]).norm(dim=-1)  # (c, P)
            weighted = (patch * dist).sum(dim=-1) / patch.sum(dim=-1)  # (B, H, c)
            acc += weighted.sum(dim=-1)
        acc /= P

    _forward_qk(run, layer_ids, on_layer)
    return out
