"""`capture`: one forward pass in, one exact `Attentions` out.

How attention leaves the model: the adapter names, per layer, the module that computes attention;
`vitscope.capture.intercept` sees the q, k, scale and bias its attention kernel gets (after RoPE, qk-norm and
position biases) while the model runs its own (fused/SDPA or eager) attention, and the probabilities are
recomputed as ``softmax(q_rows @ k^T * scale + bias_rows)`` in float32, for the requested query rows and heads
only, in row chunks (an eager layer's own probabilities are sliced instead).
The model's own computation is never altered, so its outputs are bit-identical to an uncaptured run, and a
caller who asks for last-layer [CLS] rows of a 1024 px image never materialises an ``N x N`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vitscope.adapters.base import AttentionSite, SizePolicy
from vitscope.attentions import Attentions
from vitscope.capture.budget import check_capture_budget
from vitscope.capture.hooks import StopForward, eval_mode, record_sites, record_token_norms
from vitscope.capture.intercept import (
    AttentionCall,
    CaptureError,
    observe_attention,
    prove_batch_axis,
    refuse_compiled,
)
from vitscope.capture.probe import check_token_axis
from vitscope.capture.windows import check_windowed_layers
from vitscope.errors import VitscopeError
from vitscope.layout import TokenLayout, resolve_indices

QuerySpec = None | str | int | tuple[int, int] | Sequence[int | str | tuple[int, int]]
HeadSpec = Literal["all", "mean"] | Sequence[int]


def resolve_layers(layers: int | Sequence[int] | None, num_layers: int, argument: str = "layers",
                   ) -> tuple[int, ...]:
    """Absolute, range-checked layer indices (negatives count from the end; default all), each once."""
    if layers is None:
        return tuple(range(num_layers))
    return resolve_indices(layers, num_layers, argument, "layer")


def resolve_heads(heads: HeadSpec, num_heads: int) -> tuple[int, ...] | Literal["mean"]:
    """``"mean"``, or absolute, range-checked head indices (``"all"``: every head), each once."""
    if isinstance(heads, str):
        if heads == "mean":
            return "mean"
        if heads == "all":
            return tuple(range(num_heads))
        raise VitscopeError("heads", f"unknown value {heads!r}", "use 'all', 'mean' or a list of head indices")
    return resolve_indices(heads, num_heads, "heads", "head")


def resolve_queries(
    queries: QuerySpec, prefix: tuple[str, ...], grid: tuple[int, int], suffix: tuple[str, ...] = (),
) -> tuple[int, ...] | None:
    """Token indices of the query rows to keep (``None`` = all). Accepts ``"cls"``, indices, ``(row, col)``."""
    if queries is None:
        return None
    try:
        return TokenLayout(prefix, grid, suffix=suffix).resolve_queries(queries)
    except VitscopeError as exc:
        fix = "use queries=None for all rows, or a list of token indices / (row, col) patches"
        named_cls = queries == "cls" if isinstance(queries, str) else isinstance(queries, list) and "cls" in queries
        if named_cls and "cls" not in prefix:
            fix = "this model has no [CLS] (e.g. SigLIP pools patches): use queries=None and a mean over queries"
        raise VitscopeError("queries", exc.problem, fix) from None


@dataclass
class CaptureResult:
    """`Attentions` plus the model's own output of the same forward pass."""

    attentions: Attentions
    output: Any
    pixel_values: torch.Tensor


def attention_rows(
    q: torch.Tensor, k: torch.Tensor, scale: float, rows: Sequence[int] | None, fuse_heads: bool,
    out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q[rows] @ k^T * scale + bias[rows])`` in float32, chunked over rows: ``(B, H or 1, Q, N)``.

    q, k: ``(B, H, N, d)``; bias broadcastable to ``(B, H, N, N)``. ``out`` (optional) receives the result.
    """
    call = AttentionCall(layer=-1, scale=scale, q=q, k=k, bias=bias)
    return call.rows(rows, None, fuse_heads, out=out)


def check_call_tokens(call: AttentionCall, expected: int, grid: tuple[int, int], num_prefix: int,
                      num_suffix: int = 0) -> None:
    """The layer's softmax runs over exactly ``prefix + rows * cols + suffix`` tokens, queries and keys alike
    (global token attention; `vitscope.capture.probe.check_token_axis` proves the axis follows the image;
    a windowed layer's call, whose batch is not the images', is refused by the engine: `observe_attention`)."""
    _, _, Nq, Nk = call.shape
    if Nq != expected or Nk != expected:
        after = f" and {num_suffix} suffix" if num_suffix else ""
        raise CaptureError(
            "images", f"layer {call.layer} attends {Nq} queries over {Nk} keys, expected {expected} for a "
            f"{grid[0]}x{grid[1]} grid plus {num_prefix} prefix{after} tokens",
            "vitscope reads global token softmax attention (every token attends to every token); the model drops, "
            "adds or reorders tokens, or its softmax is not over the tokens",
        )


def check_declared(call: AttentionCall, site: AttentionSite, declared: dict[str, torch.Tensor]) -> None:
    """Declared q/k taps (`vitscope.wrap`) must give the attention the kernel computes (first query row)."""
    q, k = declared["q"], declared["k"]  # (B, H, N, d)
    if q.shape != k.shape or q.shape[2] != call.shape[2] or q.shape[1] != call.shape[1]:
        raise CaptureError(
            "model", f"layer {site.layer}: the declared q/k have shape {tuple(q.shape)}, the attention kernel "
            f"sees {call.shape[1]} heads x {call.shape[2]} tokens", "fix num_heads, or drop qkv=/q=/k= from wrap()",
        )
    scale = site.scale if site.scale is not None else q.shape[-1] ** -0.5
    mine = AttentionCall(layer=site.layer, scale=scale, q=q, k=k).rows([0], None, False)
    theirs = call.rows([0], None, False)
    err = float((mine - theirs).abs().max())
    if err > 1e-4:
        raise CaptureError(
            "model", f"layer {site.layer}: attention from the declared q/k differs from what the model computes "
            f"by {err:.3g} (RoPE, qk-norm or a position bias applied after the projections?)",
            "drop qkv=/q=/k=/scale= from vitscope.wrap(...): vitscope reads q and k at the attention kernel",
        )


def guarded_forward(vit: Any, pixels: torch.Tensor, sites: Sequence[AttentionSite],
                    on_call: Any, *, rows: Sequence[int] | None, tokens: int,
                    to_check: Sequence[AttentionSite] = (), declared: dict[int, dict[str, torch.Tensor]] | None = None,
                    norms: torch.Tensor | None = None, until_captured: bool = False) -> Any:
    """The model's one forward pass on ``pixels`` ``(B, C, H, W)`` (a video's ``(B, T, C, H, W)``) with the
    attention of ``sites`` observed (``on_call(call)`` per verified kernel call; ``rows``: the query rows wanted,
    ``tokens``: N) and every guard of a capture: compiled models refused, the token axis checked (once per model
    and geometry; a video model runs at its one size and frame count, so its shape checks stand), the batch axis
    proven, declared q/k (``to_check``) recorded into ``declared`` for `check_declared`, block token norms into
    ``norms`` ``(L, B, N)``. Used by `capture_full` and by the observed pass of `vitscope.methods.observe`.
    Returns the model output; with ``until_captured`` (and no ``norms``) the pass ends as soon as every site's
    attention is captured (`vitscope.capture.intercept.observe_attention`'s ``until_captured``: later blocks
    and the head do not run) and ``None`` is returned."""
    B, (C, H, W) = int(pixels.shape[0]), (int(s) for s in pixels.shape[-3:])  # a video's: (B, T, C, H, W)
    refuse_compiled(vit.module)
    if sites and not vit.info.frames:
        check_token_axis(vit, sites, (C, H, W), pixels.dtype, pixels.device, tokens)
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(eval_mode(vit.module))
        prove_batch_axis(vit, pixels, sites, tokens)
        if to_check:
            assert declared is not None
            stack.enter_context(record_sites(to_check, ("q", "k"), declared.__setitem__))
        check = stack.enter_context(observe_attention(sites, on_call, batch=B, rows=rows, tokens=tokens,
                                                     until_captured=until_captured and norms is None))
        if norms is not None:
            stack.enter_context(record_token_norms(vit.sites, norms))
        try:
            output = vit(pixels)
        except StopForward:
            output = None
        check()
    return output


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
    output: bool = True,
) -> CaptureResult:
    """Like `capture`, also returning the model output and the pixel values used. ``output=False``: the forward
    pass ends once the last wanted layer's attention is captured (`guarded_forward`'s ``until_captured``); the
    result's ``output`` is then ``None``."""
    from vitscope.capture.prepare import prepare

    if not isinstance(token_norms, bool):
        raise VitscopeError("token_norms", f"expected True or False, got {token_norms!r}", "pass token_norms=True")
    vit, pixels = prepare(model, images, policy=policy, size=size, device=device, max_tokens=max_tokens)
    info = vit.info  # (after prepare: a model wrapped without a layout now has the measured one)
    layer_ids = resolve_layers(layers, info.num_layers)
    check_windowed_layers(info, layer_ids, default=layers is None)
    head_sel = resolve_heads(heads, info.num_heads)
    dev = pixels.device
    B, (Hpx, Wpx) = int(pixels.shape[0]), (int(pixels.shape[-2]), int(pixels.shape[-1]))  # a video: (B, T, C, H, W)
    grid = vit.grid_for((Hpx, Wpx))  # a video's is the stacked grid (T' * rows, cols)
    query_ids = resolve_queries(queries, info.prefix, grid, info.suffix)
    N = info.num_prefix_tokens + grid[0] * grid[1] + info.num_suffix_tokens
    n_heads = 1 if head_sel == "mean" else len(head_sel)
    n_q = N if query_ids is None else len(query_ids)
    check_capture_budget(B, N, len(layer_ids), n_heads, n_q, n_heads=info.num_heads, grid=grid,
                         limit_bytes=max_bytes, max_tokens=max_tokens)
    weights = torch.empty(len(layer_ids), B, n_heads, n_q, N, dtype=torch.float32, device=dev)
    norms = torch.empty(info.num_layers, B, N, dtype=torch.float32, device=dev) if token_norms else None
    pos = {layer: i for i, layer in enumerate(layer_ids)}
    sites = [vit.sites[i] for i in layer_ids]
    heads_kept = None if head_sel == "mean" else list(head_sel)
    declared: dict[int, dict[str, torch.Tensor]] = {}
    to_check = [s for s in sites if s.q is not None and s.k is not None]  # declared by `wrap`: cross-checked

    def on_call(call: AttentionCall) -> None:
        check_call_tokens(call, N, grid, info.num_prefix_tokens, info.num_suffix_tokens)
        if call.layer in declared:
            check_declared(call, vit.sites[call.layer], declared.pop(call.layer))
        call.rows(query_ids, heads_kept, head_sel == "mean", out=weights[pos[call.layer]])

    model_output = guarded_forward(vit, pixels, sites, on_call, rows=query_ids, tokens=N, to_check=to_check,
                                   declared=declared, norms=norms, until_captured=not output)

    attn = Attentions(
        weights=weights, prefix=info.prefix, grid=grid, patch_size=info.patch_size, image_size=(Hpx, Wpx),
        layers=layer_ids, heads=head_sel, queries=query_ids, num_layers=info.num_layers,
        num_heads=info.num_heads, token_norms=norms, meta={"model": info.name, "family": info.family},
        suffix=info.suffix, frames=info.token_frames, tubelet=info.tubelet,
    )
    return CaptureResult(attentions=attn, output=model_output, pixel_values=pixels)


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
        device: where a model loaded from a spec runs; a model object stays where it is and the inputs follow
            it (see `vitscope.capture.prepare`).
        max_tokens, max_bytes: refuse, before running, inputs with more tokens or captures whose estimated
            attention memory is larger (defaults in `vitscope.limits`; the error gives the estimate and the
            options that lower it: ``layers``, ``queries``, ``heads="mean"``, a smaller ``size``).

    Returns:
        `Attentions` with ``weights`` of shape ``(layers, batch, heads, queries, keys)``. The forward pass ends
        once the last requested layer's attention is captured: later blocks, the final norm and the head do not
        run (``layers=[3]`` of a 12-layer model costs four blocks), and after the first capture at a size that
        layer's kernel computes only the rows that prove the capture; `capture_full` runs the model whole.

    Threads: one model may be captured from several threads at once, and each capture equals a sequential one.
    vitscope's hooks sit on the model's modules but act only on the forward pass of the thread that registered
    them (torch's function-mode stack is per thread), and a training model stays in eval mode until the last
    overlapping capture is done (`vitscope.capture.hooks`).

    Example:
        >>> import vitscope
        >>> attn = vitscope.capture("vitscope:shapes", "cat.png", layers=[-1], queries="cls")  # doctest: +SKIP
        >>> attn.to_grid(attn.weights[0, 0, :, 0]).shape  # (heads, rows, cols)  # doctest: +SKIP
    """
    return capture_full(
        model, images, layers=layers, queries=queries, heads=heads, policy=policy, size=size,
        token_norms=token_norms, device=device, max_tokens=max_tokens, max_bytes=max_bytes, output=False,
    ).attentions
