"""`capture`: one forward pass in, one exact `Attentions` out.

How attention leaves the model: the adapter names, per layer, where q and k can be read (`Tap`). Forward hooks
read them while the model runs its own (fused/SDPA or eager) attention, and the probabilities are recomputed
as ``softmax(q_rows @ k^T * scale)`` in float32, for the requested query rows and heads only, in row chunks.
The model's own computation is never altered, so its outputs are bit-identical to an uncaptured run, and a
caller who asks for last-layer [CLS] rows of a 1024 px image never materialises an ``N x N`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vitscope.adapters.base import SizePolicy, VitModel
from vitscope.attentions import Attentions
from vitscope.capture.budget import check_capture_budget
from vitscope.capture.hooks import eval_mode, record_block_outputs, record_sites
from vitscope.errors import VitscopeError
from vitscope.limits import limits

QuerySpec = None | str | int | tuple[int, int] | Sequence[int | str | tuple[int, int]]
HeadSpec = Literal["all", "mean"] | Sequence[int]

#: Upper bound on the float32 scratch (bytes) of one chunk of attention logits.
CHUNK_BYTES = 64 * 2**20


def resolve_layers(layers: int | Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Absolute, range-checked layer indices (negatives count from the end; default all)."""
    if layers is None:
        return tuple(range(num_layers))
    items = [layers] if isinstance(layers, int) else list(layers)
    if not items:
        raise VitscopeError("layers", "empty selection", f"pass indices in [-{num_layers}, {num_layers - 1}]")
    out = []
    for i in items:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise VitscopeError(
                "layers", f"layer {i} out of range for a model with {num_layers} layers",
                f"use an index in [-{num_layers}, {num_layers - 1}]",
            )
        out.append(j)
    return tuple(dict.fromkeys(out))


def resolve_heads(heads: HeadSpec, num_heads: int) -> tuple[int, ...] | Literal["mean"]:
    if heads == "mean":
        return "mean"
    if heads == "all":
        return tuple(range(num_heads))
    if isinstance(heads, str):
        raise VitscopeError("heads", f"unknown value {heads!r}", "use 'all', 'mean' or a list of head indices")
    items = [heads] if isinstance(heads, int) else list(heads)
    out = []
    for h in items:
        j = int(h) + num_heads if int(h) < 0 else int(h)
        if not 0 <= j < num_heads:
            raise VitscopeError(
                "heads", f"head {h} out of range for a model with {num_heads} heads",
                f"use an index in [-{num_heads}, {num_heads - 1}]",
            )
        out.append(j)
    return tuple(dict.fromkeys(out))


def resolve_queries(
    queries: QuerySpec, prefix: tuple[str, ...], grid: tuple[int, int]
) -> tuple[int, ...] | None:
    """Token indices of the query rows to keep (``None`` = all). Accepts ``"cls"``, indices, ``(row, col)``."""
    if queries is None:
        return None
    probe = Attentions(
        weights=torch.zeros(0, 0, 1, 0, len(prefix) + grid[0] * grid[1]), prefix=prefix, grid=grid,
        patch_size=(1, 1), image_size=grid, layers=(), heads="mean", queries=(), num_layers=0, num_heads=0,
    )
    if isinstance(queries, (str, int, tuple)):
        items: list[Any] = [queries]
    else:
        items = list(queries)
    out = []
    for q in items:
        try:
            out.append(probe.token_index(q))
        except (ValueError, IndexError) as exc:
            fix = "use queries=None for all rows, or a list of token indices / (row, col) patches"
            if q == "cls" and "cls" not in prefix:
                fix = "this model has no [CLS] (e.g. SigLIP pools patches): use queries=None and a mean over queries"
            raise VitscopeError("queries", str(exc), fix) from None
    return tuple(dict.fromkeys(out))


@dataclass
class CaptureResult:
    """`Attentions` plus the model's own output of the same forward pass."""

    attentions: Attentions
    output: Any
    pixel_values: torch.Tensor


def attention_rows(
    q: torch.Tensor, k: torch.Tensor, scale: float, rows: Sequence[int] | None, fuse_heads: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q[rows] @ k^T * scale)`` in float32, chunked over rows: ``(B, H or 1, Q, N)``.

    q, k: ``(B, H, N, d)``. ``out`` (optional) receives the result in place.
    """
    B, H, N, _ = k.shape
    if rows is not None:
        ids = list(rows)
        # a run of consecutive rows (e.g. [CLS] alone) is a view, not a gather
        q = q[:, :, ids[0] : ids[-1] + 1] if ids == list(range(ids[0], ids[0] + len(ids))) else q[:, :, ids]
    q = q.float()  # no copy when already float32
    k = k.float()
    Q = q.shape[2]
    if out is None:
        out = torch.empty(B, 1 if fuse_heads else H, Q, N, dtype=torch.float32, device=q.device)
    chunk = max(1, CHUNK_BYTES // max(1, B * H * N * 4))
    kt = k.transpose(-2, -1)  # (B, H, d, N)
    for s in range(0, Q, chunk):
        logits = torch.matmul(q[:, :, s : s + chunk], kt).mul_(scale)  # (B, H, c, N)
        if fuse_heads:
            out[:, :, s : s + chunk] = logits.softmax(dim=-1).mean(dim=1, keepdim=True)
        else:
            torch.softmax(logits, dim=-1, out=out[:, :, s : s + chunk])
    return out


def capture_full(
    model: Any,
    images: Any,
    *,
    layers: int | Sequence[int] | None = None,
    queries: QuerySpec = None,
    heads: HeadSpec = "all",
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    token_norms: bool = False,
    device: str | torch.device | None = None,
    max_tokens: int | None = None,
    max_bytes: int | None = None,
) -> CaptureResult:
    """Like `capture`, also returning the model output and the pixel values used."""
    from vitscope.adapters import as_vit

    vit: VitModel = as_vit(model)
    info = vit.info
    layer_ids = resolve_layers(layers, info.num_layers)
    head_sel = resolve_heads(heads, info.num_heads)
    dev = torch.device(device) if device is not None else vit.device
    with limits(max_tokens=max_tokens):  # preprocessing refuses too many tokens before it resizes
        pixels = vit.preprocess(images, policy=policy, size=size).to(dev, vit.dtype)
    if pixels.shape[1] != info.preprocess.channels:
        raise VitscopeError(
            "images", f"{pixels.shape[1]} channels but the model expects {info.preprocess.channels}",
            "pass pixel values with the model's channel count",
        )
    B, _, Hpx, Wpx = pixels.shape
    grid = vit.grid_for((Hpx, Wpx))
    query_ids = resolve_queries(queries, info.prefix, grid)
    N = info.num_prefix_tokens + grid[0] * grid[1]
    n_heads = 1 if head_sel == "mean" else len(head_sel)
    n_q = N if query_ids is None else len(query_ids)
    check_capture_budget(B, N, len(layer_ids), n_heads, n_q, n_heads=info.num_heads, grid=grid,
                         limit_bytes=max_bytes, max_tokens=max_tokens)
    weights = torch.empty(len(layer_ids), B, n_heads, n_q, N, dtype=torch.float32, device=dev)
    norms = torch.empty(info.num_layers, B, N, dtype=torch.float32, device=dev) if token_norms else None
    pos = {layer: i for i, layer in enumerate(layer_ids)}
    sites = [vit.sites[i] for i in layer_ids]
    by_layer = {s.layer: s for s in sites}

    def on_layer(layer: int, t: dict[str, torch.Tensor]) -> None:
        q, k = t["q"], t["k"]  # (B, H, N', d)
        if q.shape[2] != N:
            raise VitscopeError(
                "images", f"layer {layer} saw {q.shape[2]} tokens, expected {N} for a {grid[0]}x{grid[1]} grid "
                f"plus {info.num_prefix_tokens} prefix tokens", "check the model's patch size and prefix tokens",
            )
        if head_sel != "mean":
            q, k = q[:, list(head_sel)], k[:, list(head_sel)]
        attention_rows(q, k, by_layer[layer].scale, query_ids, head_sel == "mean", out=weights[pos[layer]])

    def on_block(layer: int, x: torch.Tensor) -> None:
        assert norms is not None
        norms[layer] = x.float().norm(dim=-1)

    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(eval_mode(vit.module))
        stack.enter_context(record_sites(sites, ("q", "k"), on_layer))
        if token_norms:
            stack.enter_context(record_block_outputs(vit.sites, on_block))
        output = vit(pixels)

    attn = Attentions(
        weights=weights, prefix=info.prefix, grid=grid, patch_size=info.patch_size, image_size=(Hpx, Wpx),
        layers=layer_ids, heads=head_sel, queries=query_ids, num_layers=info.num_layers,
        num_heads=info.num_heads, token_norms=norms, meta={"model": info.name, "family": info.family},
    )
    return CaptureResult(attentions=attn, output=output, pixel_values=pixels)


def capture(
    model: Any,
    images: Any,
    *,
    layers: int | Sequence[int] | None = None,
    queries: QuerySpec = None,
    heads: HeadSpec = "all",
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
    token_norms: bool = False,
    device: str | torch.device | None = None,
    max_tokens: int | None = None,
    max_bytes: int | None = None,
) -> Attentions:
    """Run ``model`` once on ``images`` and return its attention probabilities exactly.

    Args:
        model: a `VitModel` (from `vitscope.load`), a spec string (``"vitscope:shapes"``, ``"hf:..."``,
            ``"timm:..."``, a folder or a checkpoint file) or a supported ``nn.Module``.
        images: a path, PIL image, numpy array or a list of them (preprocessed the model's way), or a tensor
            ``(B, C, H, W)`` of pixel values used as is.
        layers: layer indices (negatives count from the end); default all.
        queries: ``None`` for every query row, ``"cls"`` for the [CLS] row only, or a list of token indices /
            ``"cls"`` / ``"register:K"`` / ``(row, col)`` patches.
        heads: ``"all"``, ``"mean"`` (fused by averaging as they are computed), or a list of head indices.
        policy: ``"resize"`` (to the model's size), ``"crop"`` (to a multiple of the patch size, DINO's
            way) or ``"native"``; default the model's own.
        size: target ``(height, width)``, or an int for the shorter side (aspect kept).
        token_norms: also record each block's output token norms (for artifact detection).
        max_tokens, max_bytes: refuse, before running, inputs with more tokens or captures whose estimated
            attention memory is larger (defaults in `vitscope.limits`; the error gives the estimate and the
            options that lower it: ``layers``, ``queries``, ``heads="mean"``, a smaller ``size``).

    Returns:
        `Attentions` with ``weights`` of shape ``(layers, batch, heads, queries, keys)``.

    Example:
        >>> import vitscope
        >>> attn = vitscope.capture("vitscope:shapes", "cat.png", layers=[-1], queries="cls")  # doctest: +SKIP
        >>> attn.to_grid(attn.weights[0, 0, :, 0]).shape  # (heads, rows, cols)  # doctest: +SKIP
    """
    return capture_full(
        model, images, layers=layers, queries=queries, heads=heads, policy=policy, size=size,
        token_norms=token_norms, device=device, max_tokens=max_tokens, max_bytes=max_bytes,
    ).attentions
