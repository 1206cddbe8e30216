"""Intercept attention where the model computes it: one `AttentionCall` per layer per forward pass.

vitscope does not read q and k at the projections (RoPE, qk-norm, relative position biases and masks are
applied after them). It watches the attention computation itself, inside each layer's attention module:

- ``torch.nn.functional.scaled_dot_product_attention`` (timm's fused path, transformers' ``"sdpa"``
  implementation, DINOv2/v3, vitscope's own ViT, any module that calls it): a `torch.overrides.TorchFunctionMode`
  sees the q, k, v the kernel sees, its ``attn_mask`` (additive bias or boolean mask), ``is_causal``, ``scale``
  (SDPA's default ``1/sqrt(d)`` when unset) and ``enable_gqa``, and its output ``O = A V``;
- an explicit ``softmax`` of a ``(B, H, N, N)`` tensor (eager implementations): the probabilities themselves;
- ``nn.MultiheadAttention`` (torchvision, open_clip): module hooks read its inputs and weights, and q, k, v are
  computed exactly as ``F.multi_head_attention_forward`` does. The mode is never active inside it, so its fast
  path still runs and outputs stay bit-identical.

The mode is active only while one of the selected layers' attention modules runs (entered by a forward pre-hook,
left by the forward hook), so the rest of the network runs at full speed, and each call is attributed to the
layer whose module made it, never by counting. The hooks act only in the thread that registered them
(`vitscope.capture.hooks.this_thread_only`; torch's function-mode stack is per thread too), so captures of one
model from several threads at once each observe their own forward pass. On exit every hook is removed and any
mode still on the stack (after an exception inside the forward pass) is popped.

Every call proves itself before it is reported (`verify_call`): for a sample of query rows (row 0, a few spread
over the tokens, and the caller's rows when they are few) the recomputed attention times the kernel's own V gives
the kernel's own output, ``A_rows @ V == O_rows`` within a float32 tolerance (for ``nn.MultiheadAttention``:
``out_proj(A_rows @ V) == y_rows``). On explicit-softmax paths the softmax output is held until the module
multiplies it with V (``matmul``/``@``/``bmm``/``einsum``/``baddbmm``): the tensor multiplied with V must be the
softmax output itself (a view of it, or a dtype-cast or eval-dropout copy with equal values).

Guards (a one-line `CaptureError` naming the layer, never a silently wrong map or a raw exception):

- each selected layer must report exactly once per forward pass;
- a layer whose module ran without any call vitscope can see (a custom kernel, a compiled module) is refused;
- heads folded into the batch (SAM's and ViTDet's attention: SDPA on ``(B*H, N, d)`` or a softmax of
  ``(B*H, N, N)``) are unfolded when the leading axis is exactly images x ``num_heads``, read batch-major
  (``(B, H, N, d).reshape(B*H, N, d)``). Both orders verify row by row, so the order is proven once per module
  (`prove_batch_axis`): image 0 alone must give the batch-major reading of image 0 in a batch of two; a
  heads-major fold is refused, and so is any other fold (windows x images, a copy of the tokens);
- batch and head counts come from the kernel call: a call whose heads differ from the model's description
  (``wrap(num_heads=...)`` wrong, a loop of one-head calls) or whose batch differs from the number of images
  (patches or heads folded into the batch: MobileViT's unfold, a heads-first layout) is refused;
- the kernel's output is not ``softmax(q k^T * scale + bias) V`` for the sampled rows (a mask vitscope does not
  see, a different normalisation) -> refused;
- the weights multiplied with V are not the softmax output (talking heads, a mask multiplied in after the
  softmax, a renormalisation), or no product with V is seen after an explicit softmax -> refused;
- `AttentionCall.rows` checks that rows sum to 1.

A pass that needs no model output (``until_captured``) ends at the last wanted layer's kernel call once that
module is known to make one call per run at this token count; torch's SDPA then computes only the sampled rows,
whose outputs prove the recomputed rows exactly as a whole kernel's would (attention rows do not depend on the
other queries; causal calls, whose rows do, run whole).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vitscope.adapters.base import AttentionSite, VitModel, refuse_compiled
from vitscope.capture.hooks import StopForward, this_thread_only
from vitscope.capture.kernels import mean_sdpa
from vitscope.errors import CaptureError

#: Upper bound on the float32 scratch (bytes) of one chunk of attention logits.
CHUNK_BYTES = 64 * 2**20

__all__ = ["CHUNK_BYTES", "FLASH_CPU", "ROWS_CHUNK_BYTES", "AttentionCall", "CaptureError", "check_rows",
           "observe_attention", "refuse_compiled", "substitute_sdpa", "windowed_call_error"]

_SOFTMAXES = (torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax)
#: Calls that may multiply the attention weights with V on an explicit-softmax path.
_PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.einsum,
             torch.baddbmm, torch.Tensor.baddbmm)
_ROW_SUM_TOL = 1e-4
#: Query rows spread over the tokens (first and last included) that every call is verified on.
_SAMPLE_SPREAD = 4
#: The caller's own rows join the sample when there are at most this many.
_SAMPLE_ASKED = 4
#: Verification on; only `_verification_off` (benchmarks/speed.py) turns it off.
_VERIFY = True
#: Attention modules whose kernel's batch axis was seen to be the images' (a call with batch != heads passed).
_BATCH_AXIS_PROVEN: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
#: Attention modules seen by a call with a known batch: True when they fold heads into the batch (3-d call).
_FOLDS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
#: Folding modules whose fold was proven batch-major (`prove_batch_axis`).
_FOLD_ORDER_PROVEN: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
#: Attention module -> the token counts at which a whole run of it was seen to make exactly one attention call
#: (`_Engine.leave`): at those a pass may end at its kernel call (`_Engine.ends_at`), since no second call follows.
_ONE_CALL: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()


@contextmanager
def _verification_off() -> Iterator[None]:
    """Skip the per-call verification (private: benchmarks/speed.py measures what it costs)."""
    global _VERIFY
    before, _VERIFY = _VERIFY, False
    try:
        yield
    finally:
        _VERIFY = before


@dataclass
class AttentionCall:
    """One layer's attention as the model computed it.

    Either ``q``/``k`` (with ``scale`` and an additive ``bias``) describe ``A = softmax(q k^T * scale + bias)``,
    or ``probs`` holds ``A`` itself (the model materialised it). Shapes: q ``(B, H, Nq, d)``, k ``(B, H, Nk, d)``
    (grouped-query keys already repeated per head), v ``(B, H, Nk, dv)``, bias broadcastable to
    ``(B, H, Nq, Nk)``, probs ``(B, H, Nq, Nk)``.

    For ``probs`` calls (an explicit softmax) the call is reported once the module multiplies ``A`` with V, and
    ``v`` is that V when the product is a plain ``matmul``/``@``/``bmm`` (else ``None``).

    ``out`` is a tensor of the model's own graph from which ``dL/dA`` follows: the kernel output ``O = A V``
    (``out_to_heads`` maps its gradient to ``dL/dO`` ``(B, H, Nq, dv)``), or ``A`` itself for ``probs`` calls
    (``out_to_heads`` is ``None``: its gradient *is* ``dL/dA``).
    """

    layer: int
    scale: float = 1.0
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    out: torch.Tensor | None = None
    out_to_heads: Callable[[torch.Tensor], torch.Tensor] | None = None
    source: str = "sdpa"
    #: The rows `verify_call` recomputed and proved: ``(row ids, float32 probabilities (B, H, s, Nk))``;
    #: `rows` reuses them instead of recomputing when they cover the rows asked for (a [CLS] capture).
    verified: tuple[list[int], torch.Tensor] | None = None
    #: ``(B, H, Nq)`` float32 log-sum-exp of each row's logits, when the caller asked for the fused kernel
    #: (`observe_attention(kernel="lse")`) and the call was one it runs exactly (`substitute_sdpa`).
    lse: torch.Tensor | None = None
    #: ``(B, Nq, Nk)`` float32 head-mean probabilities ``mean_h A_h``, when the caller asked for them
    #: (`observe_attention(kernel="mean")`) and `substitute_sdpa` ran the call (`vitscope.capture.kernels.mean_sdpa`).
    mean_probs: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Nq, Nk)``."""
        if self.probs is not None:
            B, H, Nq, Nk = self.probs.shape
            return (B, H, Nq, Nk)
        assert self.q is not None and self.k is not None
        return (int(self.q.shape[0]), int(self.q.shape[1]), int(self.q.shape[2]), int(self.k.shape[2]))

    def bias_rows(self, ids: Sequence[int] | slice) -> torch.Tensor | None:
        """The additive bias for query rows ``ids``, broadcast to ``(B or 1, H or 1, rows, Nk)``."""
        if self.bias is None:
            return None
        b = self.bias
        while b.dim() < 4:
            b = b.unsqueeze(0)
        if b.shape[-2] == 1:
            return b
        return b[:, :, ids]

    def rows(
        self, rows: Sequence[int] | None, heads: Sequence[int] | None, fuse_heads: bool,
        out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Attention rows ``(B, H' or 1, Q, Nk)`` in ``dtype`` (float32 by default), chunked over rows.

        ``rows``/``heads``: token and head indices to keep (``None`` = all). ``fuse_heads`` averages the kept
        heads as they are computed. Raises `CaptureError` when a row does not sum to 1 within 1e-4.
        """
        B, H, Nq, Nk = self.shape
        ids = list(range(Nq)) if rows is None else list(rows)
        hsel = None if heads is None or list(heads) == list(range(H)) else list(heads)
        n_h = 1 if fuse_heads else (H if hsel is None else len(hsel))
        if out is None:
            out = torch.empty(B, n_h, len(ids), Nk, dtype=dtype, device=self._device)
        reuse = self._verified_positions(ids) if dtype == torch.float32 else None
        if self.probs is not None or reuse is not None:
            src = self.probs if reuse is None else self.verified[1]  # type: ignore[index]
            assert src is not None
            p = src if hsel is None else src[:, hsel]
            p = p[:, :, _index(ids if reuse is None else reuse)].to(dtype)
            if fuse_heads:
                torch.mean(p, dim=1, keepdim=True, out=out)
            else:
                out.copy_(p)
            if reuse is not None:  # these rows passed check_rows in verify_call; fusing keeps their sums
                return out
        else:
            assert self.q is not None and self.k is not None
            q, k = self.q, self.k
            if hsel is not None:
                q, k = q[:, hsel], k[:, hsel]
            bias = self.bias_rows(_index(ids))
            if bias is not None and hsel is not None and bias.shape[1] != 1:
                bias = bias[:, hsel]
            q = q[:, :, _index(ids)].to(dtype)
            # every head kept: the softmax writes straight into the result, in cache-sized chunks
            direct = (not fuse_heads and dtype in (torch.float32, torch.float64) and out.dtype == dtype
                      and out.stride(-1) == 1 and (len(ids) == 1 or out.stride(-2) == Nk))
            row_bytes = max(1, B * q.shape[1] * Nk * 4)
            chunk = max(1, (ROWS_CHUNK_BYTES if direct else CHUNK_BYTES) // row_bytes)
            for s, e, probs in prob_chunks(q, k.to(dtype), self.scale, chunk, dtype, None, bias,
                                           out=out if direct else None):  # (B, H', c, Nk)
                if fuse_heads:
                    torch.mean(probs, dim=1, keepdim=True, out=out[:, :, s:e])
                elif not direct:
                    out[:, :, s:e] = probs
                check_rows(out[:, :, s:e], self.layer)  # each chunk while it is hot
            return out
        check_rows(out, self.layer)
        return out

    def _verified_positions(self, ids: list[int]) -> list[int] | None:
        """Positions of ``ids`` among the verified rows, or ``None`` unless every one of them was verified."""
        if self.verified is None:
            return None
        where = {r: i for i, r in enumerate(self.verified[0])}
        pos = [where.get(r) for r in ids]
        return None if any(p is None for p in pos) else pos  # type: ignore[return-value]

    @property
    def _device(self) -> torch.device:
        t = self.probs if self.probs is not None else self.q
        assert t is not None
        return t.device


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
    scratch: Scratch | None = None, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, softmax(q[:, :, start:stop] @ k^T * scale + bias[:, :, start:stop]))`` as float32
    ``(B, H, c, N)`` (float64 for float64 logits).

    q: ``(B, H, Q, d)``, k: ``(B, H, N, d)``, bias (the layer's additive mask / position bias, rows aligned
    with q's): ``(B or 1, H or 1, Q or 1, N)``. Only one chunk of logits exists at a time: the yielded tensor is
    a view of a reused buffer (``scratch``, shared across calls when given), so consume it before advancing.

    ``out`` (``(B, H, Q, N)`` of the probabilities' dtype, its last two dims contiguous): the softmax of each
    chunk is written straight into ``out[:, :, start:stop]`` (no probabilities buffer and copy beside it: a
    capture of every row touches its result once) and that view is what is yielded.
    """
    scratch = scratch or Scratch()
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    k = k if k.dtype == compute_dtype else k.to(compute_dtype)
    kt = k.transpose(-2, -1)  # (B, H, d, N)
    B, H, Q, _ = q.shape
    N = k.shape[2]
    dev = q.device
    if out is not None and (out.dtype != out_dtype or tuple(out.shape) != (B, H, Q, N) or out.stride(-1) != 1
                            or (Q > 1 and out.stride(-2) != N)):
        raise ValueError(f"out: expected ({B}, {H}, {Q}, {N}) {out_dtype} with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    for start in range(0, Q, chunk):
        stop = min(Q, start + chunk)
        qc = q[:, :, start:stop].to(compute_dtype) * scale  # scale the (c, d) rows, not the (c, N) logits
        logits = scratch.get("logits", (B, H, stop - start, N), compute_dtype, dev)
        torch.matmul(qc, kt, out=logits)  # (B, H, c, N)
        if bias is not None:
            logits.add_(bias[:, :, start:stop] if bias.shape[2] != 1 else bias)
        if out is not None:
            dest = out[:, :, start:stop]  # (B, H, c, N): each (image, head) block is contiguous
            if dest.is_contiguous():
                _softmax_into(logits, dest, compute_dtype, out_dtype)
            else:
                for b in range(B):
                    for h in range(H):
                        _softmax_into(logits[b, h], dest[b, h], compute_dtype, out_dtype)
            yield start, stop, dest
            continue
        probs = scratch.get("probs", (B, H, stop - start, N), out_dtype, dev)
        _softmax_into(logits, probs, compute_dtype, out_dtype)
        yield start, stop, probs


def _softmax_into(logits: torch.Tensor, dest: torch.Tensor, compute_dtype: torch.dtype,
                  out_dtype: torch.dtype) -> None:
    """``dest = softmax(logits)`` over the last dim (``dest`` contiguous); half-precision logits give float32."""
    if compute_dtype == out_dtype:
        torch.softmax(logits, dim=-1, out=dest)
    else:
        torch.softmax(logits, dim=-1, dtype=out_dtype, out=dest)


#: Bytes of one chunk of logits when rows are written straight into a capture's result (`AttentionCall.rows`
#: with every head kept): small enough that the softmax reads its logits back from the cache
ROWS_CHUNK_BYTES = 4 * 2**20


def _index(ids: list[int]) -> slice | list[int]:
    """A run of consecutive indices as a slice (a view, not a gather)."""
    if ids and ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return ids


def windowed_call_error(call: AttentionCall, expected: int, batch: int) -> CaptureError | None:
    """A one-line error if ``call`` measures as windowed attention: fewer keys than the ``expected`` tokens, in a
    batch that is the ``batch`` images times the windows. ``None`` when it does not look windowed."""
    B, _, _, Nk = call.shape
    if not (Nk < expected and batch > 0 and B % batch == 0 and batch < B):
        return None
    return CaptureError(
        "layers", f"layer {call.layer} attends within {B // batch} local windows of {Nk} tokens (not over all "
        f"{expected} tokens), so it has no global attention map",
        "capture only the layers that attend globally (layers=[...], CLI --layers)",
    )


def check_rows(rows: torch.Tensor, layer: int) -> None:
    """Every attention row sums to 1 within 1e-4 (NaN fails too)."""
    if rows.numel() == 0:
        return
    err = (rows.sum(dim=-1, dtype=torch.float32) - 1).abs().max()
    if not bool(err <= _ROW_SUM_TOL):
        raise _rows_error(layer, float(err))


def _rows_error(layer: int, err: float) -> CaptureError:
    return CaptureError(
        "model", f"layer {layer}: captured attention rows do not sum to 1 (max error {err:.3g})",
        "the layer's attention is not a softmax over its keys that vitscope can recompute; report it",
    )


def _product_error(layer: int, step: str, worst: float) -> CaptureError:
    return CaptureError(
        "model", f"layer {layer}: the kernel's output is not softmax(q k^T) V for the captured rows: {step} "
        f"(output off by {worst:.3g} beyond the tolerance)",
        "vitscope only reads attention it can reproduce exactly: a mask or normalisation it does not see "
        "cannot be captured; report the model",
    )


# ------------------------------------------------------------------------------------------------ verification
def sample_rows(num_rows: int, asked: Sequence[int] | None = None) -> list[int]:
    """The query rows a call is verified on: row 0, ``_SAMPLE_SPREAD`` rows spread over ``num_rows`` (first and
    last included) and the caller's ``asked`` rows when they are few. At most ~9 rows whatever ``num_rows``."""
    ids = {0} | {round(i * (num_rows - 1) / (_SAMPLE_SPREAD - 1)) for i in range(_SAMPLE_SPREAD)}
    if asked is not None and len(asked) <= _SAMPLE_ASKED:
        ids |= {int(r) for r in asked if 0 <= int(r) < num_rows}
    return sorted(ids)


def _input_eps(t: torch.Tensor) -> float:
    """Machine epsilon of the kernel's arithmetic on ``t`` (``torch.finfo(dtype).eps``); float32 matmuls allowed
    to run in TF32 (``set_float32_matmul_precision("high")``, ``allow_tf32``) count as 10 mantissa bits, in
    bfloat16 (``"medium"``) as 7."""
    if t.dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            return 2.0**-7
        if precision == "high" or (t.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
            return 2.0**-10
    return float(torch.finfo(t.dtype).eps) if t.dtype.is_floating_point else 2.0**-23


def check_product(
    layer: int, a: torch.Tensor, v: torch.Tensor, o: torch.Tensor, *, eps_in: float, logit_bound: float, step: str,
    proj: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> None:
    """The model's output rows ``o`` equal ``a @ v`` (then ``proj``'s Linear when given) within a tolerance.

    a: ``(B, H, s, Nk)`` recomputed attention rows (float32/64); v: ``(B, H, Nk, dv)``; o: ``(B, H, s, dv)``, or
    ``(B, s, E)`` after ``proj = (weight, bias)``.

    Tolerance, per output element: ``|o - a v| <= rtol * max_j |v_j| + atol`` (the column's largest value over
    the keys bounds ``a |v|``, the size of the terms of the sum whatever cancels, since ``a >= 0`` sums to 1;
    it costs one pass over v instead of a second product). ``rtol = 4 eps_in (1 + logit_bound) + (Nk + dv) eps_c``,
    ``eps`` being twice the unit roundoff ``u``: a half-precision kernel rounds q and k (scaled), its logits,
    its weights and its output to the model's dtype (``eps_in``: 2^-10 float16, 2^-7 bfloat16, 2^-10 TF32), so a
    logit is off by up to ``3 u |q| |k| scale``, each weight by twice that relatively (through the normalisation),
    and the output by ``2 u`` more: ``6 u L + 2 u <= 4 eps_in (1 + L)``; the sums of ``Nk`` and ``dv`` terms are
    accumulated in float32 (``eps_c``). For a float32 model on CPU this is ~1e-4 relative or less; a wrong
    capture (talking heads, a post-softmax mask, a mask vitscope does not see) moves outputs by a sizeable part
    of ``a |v|``, far above it.
    """
    ct = a.dtype
    eps_c = float(torch.finfo(ct).eps)
    vv = v.to(ct)
    want = torch.matmul(a, vv)  # (B, H, s, dv)
    bound = vv.abs().amax(dim=-2, keepdim=True).expand_as(want)  # (B, H, s, dv): max_j |v_jc| >= (a |v|)_c
    n_terms = a.shape[-1] + v.shape[-1]
    if proj is not None:  # nn.MultiheadAttention: y = concat_h(O_h) W^T + b
        w, b = proj
        B, H, s, dv = want.shape
        want = F.linear(want.transpose(1, 2).reshape(B, s, H * dv), w.to(ct), None if b is None else b.to(ct))
        bound = F.linear(bound.transpose(1, 2).reshape(B, s, H * dv), w.to(ct).abs(),
                         None if b is None else b.to(ct).abs())
        n_terms += H * dv
    rtol = 4 * eps_in * (1 + logit_bound) + n_terms * eps_c
    tol = (bound * rtol).add_(eps_c * (1 + float(bound.amax()) if bound.numel() else eps_c))
    err = (o.to(ct) - want).abs_()
    if not bool((err <= tol).all()):  # NaN fails too
        worst = float(torch.nan_to_num(err - tol, nan=float("inf")).amax())
        raise _product_error(layer, step, worst)


#: Float32/64 kernels: the logit bound used instead of measuring |q| |k| (a logit of 1e3 already puts the
#: weights' float32 rounding at 1e-4; larger logits do not occur in attention that is not saturated).
_FULL_PRECISION_LOGITS = 1e3


def verify_call(call: AttentionCall, asked: Sequence[int] | None = None,
                mha: nn.MultiheadAttention | None = None, every_row: bool = False) -> None:
    """Prove a q/k call: the recomputed rows times the kernel's V reproduce the kernel's output (sample rows).

    For SDPA ``call.out`` is ``O`` ``(B, H, Nq, dv)``; for ``mha`` it is the module output ``y = out_proj(O)``.
    ``every_row`` (float32 SDPA, ``B x H x Nq x Nk`` within `CHUNK_BYTES`): every row is computed once (the
    caller reads them all from ``call.verified``); the sampled ones are checked as always.
    """
    q, k, v, out = call.q, call.k, call.v, call.out
    assert q is not None and k is not None and v is not None and out is not None
    B, H, Nq, _ = call.shape
    if mha is None and out.dim() == 3:  # heads folded into the batch: (B*H, Nq, dv), batch-major
        out = out.reshape(B, H, Nq, -1)
    ids = sample_rows(Nq, asked)
    Nk = int(k.shape[2])
    every_row = (every_row and mha is None and call.probs is None and call.mean_probs is None
                 and q.dtype == torch.float32 and 4 * B * H * Nq * Nk <= CHUNK_BYTES
                 and not (q.requires_grad or k.requires_grad))
    with torch.no_grad():
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        idx = _row_index(ids, q.device)
        if every_row:
            kept = list(range(Nq))
            bias_all = call.bias_rows(slice(None))
            logits = torch.matmul(q.detach() * call.scale, k.detach().transpose(-2, -1))  # (B, H, Nq, Nk)
            if bias_all is not None:
                logits = logits + bias_all
            a_all = torch.softmax(logits, dim=-1)
            if _input_eps(q) <= 2.0**-20:  # row sums and A@V == O checked on the sampled rows, as without it
                _check_rows_and_product(call.layer, a_all.index_select(2, idx), v.detach(),
                                        out.detach().index_select(2, idx), _input_eps(q))
                call.verified = (kept, a_all)
                return
        qs = _plain(q).index_select(2, idx)  # (B, H, s, d): a fresh copy
        qs = qs.mul_(call.scale) if qs.dtype == dt else qs.to(dt).mul_(call.scale)
        kd = _plain(k) if k.dtype == dt else _plain(k).to(dt)
        logits = _bmm(qs, kd.transpose(-2, -1))  # (B, H, s, Nk)
        bias = call.bias_rows(ids)
        if bias is not None:
            logits = logits.add_(bias)
        a = torch.softmax(logits, dim=-1)
        eps_in = _input_eps(q)
        if mha is None and eps_in <= 2.0**-20:  # float32/64 SDPA: both checks, one synchronisation
            _check_rows_and_product(call.layer, a, _plain(v), _plain(out).index_select(2, idx), eps_in)
        else:
            check_rows(a, call.layer)
        if dt == torch.float32 and not (q.requires_grad or k.requires_grad):
            call.verified = (ids, a)  # proved: `AttentionCall.rows` reuses them (no graph: no grad wanted)
        if mha is None and eps_in <= 2.0**-20:
            return
        if eps_in > 2.0**-20:  # half precision / TF32: the logits' rounding counts, bound them by |q| |k| scale
            bound = float(qs.norm(dim=-1).amax() * kd.norm(dim=-1).amax())  # qs carries the scale already
            if bias is not None:
                finite = bias[torch.isfinite(bias)]
                bound += float(finite.abs().amax()) if finite.numel() else 0.0
        else:
            bound = _FULL_PRECISION_LOGITS
        if mha is None:
            check_product(call.layer, a, v.detach(), out.detach()[:, :, ids], eps_in=eps_in, logit_bound=bound,
                          step="scaled_dot_product_attention")
        else:
            y = out.detach() if mha.batch_first else out.detach().transpose(0, 1)  # (B, N, E)
            check_product(call.layer, a, v.detach(), y[:, ids], eps_in=eps_in, logit_bound=bound,
                          step="nn.MultiheadAttention", proj=(mha.out_proj.weight, mha.out_proj.bias))


_ROW_INDEX: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _row_index(ids: list[int], device: torch.device) -> torch.Tensor:
    """``ids`` as an index tensor on ``device`` (cached: the same few sample rows recur every call)."""
    key = (tuple(ids), device)
    idx = _ROW_INDEX.get(key)
    if idx is None:
        if len(_ROW_INDEX) > 256:
            _ROW_INDEX.clear()
        idx = _ROW_INDEX[key] = torch.tensor(ids, dtype=torch.long, device=device)
    return idx


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its graph (``detach`` only where there is one: one dispatched op less per tensor)."""
    return t.detach() if t.requires_grad else t


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of ``(B, H, m, k)`` and ``(B, H, k, n)``; for one image a 3-d ``bmm`` of views (no batch
    broadcasting logic: the verification's thin products are small enough for that to count)."""
    if a.shape[0] == 1 and b.shape[0] == 1:
        return torch.bmm(a[0], b[0]).unsqueeze(0)
    return torch.matmul(a, b)


def _check_rows_and_product(layer: int, a: torch.Tensor, v: torch.Tensor, o: torch.Tensor, eps_in: float) -> None:
    """`check_rows` and `check_product` (float32/64 kernel, ``logit_bound = _FULL_PRECISION_LOGITS``) of SDPA
    rows in one pass and one synchronisation, and the same errors (rows first). a: ``(B, H, s, Nk)``, v:
    ``(B, H, Nk, dv)``, o: ``(B, H, s, dv)``, a fresh copy of the kernel's rows (overwritten here).

    Per output element ``|o - a v| <= rtol max_j |v_j| + eps_c (1 + max_j |v_j|)``: `check_product`'s
    tolerance with its absolute term taken per column (``max_j |v_j|`` of that column, not of the whole layer:
    never looser). The row sums are read only when that fails: a recomputed softmax row that does not sum to 1
    has a NaN (0/0, an infinite logit), which fails the product check too, so the rows' error still comes first.
    """
    ct = a.dtype
    eps_c = float(torch.finfo(ct).eps)
    vv = v if v.dtype == ct else v.to(ct)
    want = _bmm(a, vv)  # (B, H, s, dv)
    Nk = a.shape[-1]
    rtol = 4 * eps_in * (1 + _FULL_PRECISION_LOGITS) + (Nk + v.shape[-1]) * eps_c
    oc = o if o.dtype == ct else o.to(ct)
    diff = oc.sub_(want).abs_()  # (B, H, s, dv)
    # first against a bound that cannot exceed max_j |v_jc|, from what is computed anyway: each row of ``a v`` is
    # a convex combination of v's rows, so max_i |(a v)_ic| <= max_j |v_jc| (shrunk by its float32 rounding);
    # passing with the smaller tolerance passes with the real one, so the pass over all of v is taken only when
    # this does not settle it (a column the sampled rows average to about 0, or a wrong output)
    cheap = want.abs().amax(dim=-2, keepdim=True).mul_(1 - 2 * (Nk + 2) * eps_c)  # (B, H, 1, dv)
    worst = float(diff.sub(cheap, alpha=rtol + eps_c).amax())  # NaN stays NaN
    if worst <= eps_c:
        return
    # (B, H, 1, dv): max_j |v_jc|, without an |v| copy (and not linalg.vector_norm: ~100x slower on CPU)
    bound = torch.maximum(vv.amax(dim=-2, keepdim=True), vv.amin(dim=-2, keepdim=True).neg_())
    worst = float(diff.sub_(bound, alpha=rtol + eps_c).amax())
    if worst <= eps_c:
        return
    r_err = float(a.sum(dim=-1, dtype=torch.float32).sub_(1).abs_().amax())
    if not r_err <= _ROW_SUM_TOL:
        raise _rows_error(layer, r_err)
    raise _product_error(layer, "scaled_dot_product_attention", worst - eps_c)


def _is_softmax_output(w: torch.Tensor, probs: torch.Tensor) -> bool:
    """``w`` is the softmax output: the tensor itself, a view of it in the same layout, or an equal copy
    (a dtype cast such as transformers' ``softmax(..., dtype=float32).to(q.dtype)``, an eval-mode dropout)."""
    if w.numel() != probs.numel():
        return False
    if w is probs:
        return True
    same_memory = w.data_ptr() == probs.data_ptr() and w.is_contiguous() and probs.is_contiguous()
    if same_memory and w.dtype == probs.dtype:
        return True
    with torch.no_grad():
        return bool(torch.equal(w.detach().reshape(probs.shape), probs.detach().to(w.dtype)))


def _product_operands(func: Any, args: tuple[Any, ...]) -> tuple[Any, Any] | None:
    """The two factors of a product call (weights candidate first as written), else ``None``."""
    if func is torch.einsum:
        ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        return (ops[0], ops[1]) if len(ops) == 2 else None
    if func in (torch.baddbmm, torch.Tensor.baddbmm):
        return (args[1], args[2]) if len(args) >= 3 else None
    return (args[0], args[1]) if len(args) >= 2 else None


# ------------------------------------------------------------------------------------------------ kernels
def _sdpa_call(layer: int, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor,
               fold: tuple[int, int] | None = None) -> AttentionCall:
    """The SDPA call's q, k, v, bias. ``fold = (B, H)``: its 3-d ``(B*H, N, d)`` tensors fold heads into the
    batch (batch-major), unfolded here to ``(B, H, N, d)`` (`_Engine.fold`)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    folded = fold is not None and q.dim() == 3 and k.dim() == 3 and v.dim() == 3
    if folded:
        assert fold is not None
        B, H = fold
        q, k, v = (t.reshape(B, H, t.shape[1], t.shape[2]) for t in (q, k, v))  # (B, H, N, d)
        mask = bound.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 3 and mask.shape[0] == B * H:  # (B*H, Nq, Nk)
            bound["attn_mask"] = mask.reshape(B, H, mask.shape[1], mask.shape[2])
    if q.dim() != 4:
        raise CaptureError(
            "model", f"layer {layer}: scaled_dot_product_attention got {q.dim()}-d queries, expected (B, H, N, d)",
            "vitscope reads batched multi-head attention only",
        )
    if bound.get("dropout_p", 0.0):
        raise CaptureError("model", f"layer {layer}: attention dropout is active", "put the model in eval mode")
    Hq, Hk = q.shape[1], k.shape[1]
    if Hk != Hq:  # grouped-query attention: each key head serves Hq // Hk query heads
        k = k.repeat_interleave(Hq // Hk, dim=1)
        v = v.repeat_interleave(Hq // Hk, dim=1)
    scale = bound.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bias = _additive(bound.get("attn_mask"), bool(bound.get("is_causal", False)), q.shape[2], k.shape[2], q.device)
    if folded:  # out stays the kernel's own (B*H, Nq, dv) tensor (the graph's); its gradient is unfolded
        B, H, Nq, _ = q.shape
        return AttentionCall(layer=layer, scale=scale, q=q, k=k, v=v, bias=bias, out=out,
                             out_to_heads=lambda g: g.reshape(B, H, Nq, -1))
    return AttentionCall(layer=layer, scale=scale, q=q, k=k, v=v, bias=bias, out=out, out_to_heads=_identity)


def _identity(g: torch.Tensor) -> torch.Tensor:
    return g


def _additive(mask: torch.Tensor | None, causal: bool, Nq: int, Nk: int, device: torch.device) -> torch.Tensor | None:
    """SDPA's ``attn_mask``/``is_causal`` as one float32 additive bias (``-inf`` where not attended)."""
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:  # SDPA: True = take part in attention
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
        else:
            bias = mask.float()
    if causal:
        tri = torch.ones(Nq, Nk, dtype=torch.bool, device=device).tril()
        c = torch.zeros(Nq, Nk, device=device).masked_fill_(~tri, float("-inf"))
        bias = c if bias is None else bias + c
    return bias


def _softmax_call(layer: int, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
                  fold: tuple[int, int] | None = None) -> AttentionCall | None:
    """An explicit softmax over the last dim of a ``(B, H, N, N)`` tensor, else ``None`` (not attention).
    ``fold = (B, H)``: a 3-d ``(B*H, N, N)`` softmax folds heads into the batch (batch-major): unfolded."""
    x = args[0] if args else kwargs.get("input")
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    if fold is not None and x.dim() == 3 and dim in (-1, 2) and x.shape[1] == x.shape[2]:  # (B*H, N, N)
        B, H = fold
        probs = out.reshape(B, H, out.shape[1], out.shape[2])  # (B, H, Nq, Nk), a view of the model's softmax
        # the gradient flows to the model's own (B*H, Nq, Nk) tensor: unfold it (it *is* dL/dA)
        return AttentionCall(layer=layer, probs=probs, out=out, out_to_heads=None, source="softmax")
    if x.dim() != 4 or dim not in (-1, 3):
        return None
    return AttentionCall(layer=layer, probs=out, out=out, out_to_heads=None, source="softmax")


#: The CPU fused kernel that also returns each row's log-sum-exp (``None`` where this torch lacks it).
FLASH_CPU: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
#: ``torch._fused_sdp_choice``'s answer when SDPA itself would run that kernel.
_FLASH_CHOICE = 1
#: torch's own SDPA: only calls of it are substituted (a replaced ``F.scaled_dot_product_attention`` computes
#: something else, which the verification must see as it is)
_TORCH_SDPA: Any = getattr(torch._C._nn, "scaled_dot_product_attention", None)
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def substitute_sdpa(kernel: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Run an SDPA call so that it also hands back what a caller would otherwise recompute: ``(output, extra)``,
    or ``None`` (the call is then run as it is) unless it is a plain float32 CPU call without mask, causal
    flag, dropout, grouped keys or a graph.

    - ``kernel="lse"``: the very kernel SDPA dispatches to (`FLASH_CPU`, only when ``torch._fused_sdp_choice``
      picks it for these inputs, so the output is bitwise SDPA's); ``extra`` is each row's log-sum-exp
      ``(B, H, Nq)`` of ``q k^T * scale``.
    - ``kernel="probs"``: SDPA's definition written out (its math backend), ``A = softmax(q k^T * scale)``,
      ``O = A V``; ``extra`` is ``A`` ``(B, H, Nq, Nk)``. The output equals SDPA's within float32 rounding
      (about 1e-7 relative), not bitwise: used only where the caller returns no model output (rollout's maps).
    - ``kernel="mean"``: `vitscope.capture.kernels.mean_sdpa`, the same definition in cache-sized blocks;
      ``extra`` is ``mean_h A_h`` ``(B, Nq, Nk)`` (no ``H x N x N`` tensor); output as with ``"probs"``.
    """
    bound = dict(zip(_SDPA_NAMES, args, strict=False))
    bound.update(kwargs)
    q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    if bound.get("attn_mask") is not None or bound.get("dropout_p") or bound.get("is_causal") \
            or bound.get("enable_gqa"):
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (q, k, v)):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None
    scale = bound.get("scale")
    if kernel == "lse":
        if FLASH_CPU is None:
            return None
        try:
            if int(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale)) != _FLASH_CHOICE:
                return None
        except (RuntimeError, TypeError, AttributeError):  # an older torch without this query
            return None
        out, lse = FLASH_CPU(q, k, v, 0.0, False, attn_mask=None, scale=scale)
        return out, lse
    s = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if kernel == "mean":
        return mean_sdpa(q, k, v, s)
    probs = torch.softmax(torch.matmul(q * s, k.transpose(-2, -1)), dim=-1)  # (B, H, Nq, Nk)
    return torch.matmul(probs, v), probs


def sampled_sdpa(args: tuple[Any, ...], kwargs: dict[str, Any], asked: Sequence[int] | None) -> torch.Tensor | None:
    """torch's SDPA on the query rows `verify_call` reads (``sample_rows(Nq, asked)``) only: the output
    ``(..., Nq, dv)`` holds those rows, every other row is ``NaN`` (never read; a read would fail the check).
    For the call a pass ends at (`_Engine.ends_at`): the rest of the layer's kernel is not computed. ``None``
    (run the call as it is) where a row depends on the other queries or the call cannot be sliced: a causal
    flag, dropout, a graph, a nested tensor, a mask without a query axis of 1 or ``Nq``."""
    bound = dict(zip(_SDPA_NAMES, args, strict=False))
    bound.update(kwargs)
    q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    if q.dim() not in (3, 4) or q.is_nested or bound.get("is_causal") or bound.get("dropout_p"):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None
    Nq = int(q.shape[-2])
    idx = _row_index(sample_rows(Nq, asked), q.device)
    mask = bound.get("attn_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
            return None
        if mask.shape[-2] == Nq:
            mask = mask.index_select(-2, idx)  # (..., s, Nk)
        elif mask.shape[-2] != 1:
            return None
    rows = _TORCH_SDPA(**{**bound, "query": q.index_select(-2, idx), "attn_mask": mask})  # (..., s, dv)
    out = rows.new_full((*rows.shape[:-2], Nq, rows.shape[-1]), float("nan"))  # (..., Nq, dv)
    return out.index_copy_(-2, idx, rows)


#: The calls `_Mode` looks at (the attention module's other calls, projections, reshapes, norms, pass through)
_WATCHED = frozenset((F.scaled_dot_product_attention, _TORCH_SDPA, F.multi_head_attention_forward, *_SOFTMAXES,
                      *_PRODUCTS))


class _Mode(TorchFunctionMode):
    """Sees every torch call made while a selected attention module runs; passes each through unchanged."""

    def __init__(self, engine: _Engine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func not in _WATCHED and func is not F.scaled_dot_product_attention \
                and func is not F.multi_head_attention_forward:  # the module's other calls: passed straight on
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        layer = self.engine.current
        sub = None
        kernel = self.engine.kernel_for(layer)
        if kernel is None and func is _TORCH_SDPA and layer is not None and self.engine.ends_at(layer):
            rows = sampled_sdpa(args, kwargs, self.engine.asked)
            if rows is not None:  # the last call the pass needs: its verified rows only, then the pass ends
                self.engine.report(_sdpa_call(layer, args, kwargs, rows, self.engine.fold(layer, args, kwargs)))
                raise StopForward
        if kernel is not None and func is _TORCH_SDPA:
            sub = substitute_sdpa(kernel, args, kwargs)
        out, extra = sub if sub is not None else (func(*args, **kwargs), None)
        if layer is None:
            return out
        if func is F.scaled_dot_product_attention:
            sdpa = _sdpa_call(layer, args, kwargs, out, self.engine.fold(layer, args, kwargs))
            if extra is not None:  # what the substituted kernel handed back (`substitute_sdpa`)
                if kernel == "lse":
                    sdpa.lse = extra
                elif kernel == "mean":
                    sdpa.mean_probs = extra
                else:
                    sdpa.probs = extra
            self.engine.report(sdpa)
        elif func in _SOFTMAXES:
            call = _softmax_call(layer, args, kwargs, out, self.engine.fold(layer, args, kwargs))
            if call is not None:
                self.engine.softmax(call)
        elif func in _PRODUCTS:
            if layer in self.engine.pending:
                self.engine.product(layer, func, args, out)
        elif func is F.multi_head_attention_forward:
            raise CaptureError(
                "model", f"layer {layer}: an nn.MultiheadAttention runs inside the declared attention module",
                "declare the nn.MultiheadAttention itself as the layer's attention module",
            )
        return out


# ------------------------------------------------------------------------------------------------ MHA
def _mha_qkv(m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None
]:
    """q, k, v ``(B, H, N, d)`` and the additive bias, as ``F.multi_head_attention_forward`` computes them."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    query, key, value = bound["query"], bound["key"], bound["value"]
    if m.bias_k is not None or m.add_zero_attn:
        raise CaptureError("model", "nn.MultiheadAttention with bias_k/add_zero_attn", "vitscope cannot read it")
    if query.dim() != 3:
        raise CaptureError("model", "unbatched nn.MultiheadAttention input", "pass batched tokens")
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (B, N, E)
    E, H = m.embed_dim, m.num_heads
    d = E // H
    if m._qkv_same_embed_dim:
        assert m.in_proj_weight is not None
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq = bk = bv = None
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.chunk(3)
    B, Nq, _ = query.shape
    Nk = key.shape[1]
    q = F.linear(query, wq, bq).view(B, Nq, H, d).transpose(1, 2)  # (B, H, Nq, d)
    k = F.linear(key, wk, bk).view(B, Nk, H, d).transpose(1, 2)
    v = F.linear(value, wv, bv).view(B, Nk, H, d).transpose(1, 2)
    bias = None
    attn_mask = bound.get("attn_mask")
    if attn_mask is not None:  # MHA: bool True = NOT allowed; float = additive; (N, S) or (B*H, N, S)
        a = torch.zeros(attn_mask.shape, device=q.device).masked_fill_(attn_mask, float("-inf")) \
            if attn_mask.dtype == torch.bool else attn_mask.float()
        bias = a.view(B, H, Nq, Nk) if a.dim() == 3 else a
    kpm = bound.get("key_padding_mask")
    if kpm is not None:
        p = torch.zeros(kpm.shape, device=q.device).masked_fill_(kpm, float("-inf")) \
            if kpm.dtype == torch.bool else kpm.float()
        p = p.view(B, 1, 1, Nk)
        bias = p if bias is None else bias + p
    if bound.get("is_causal") and attn_mask is None:
        bias = _additive(None, True, Nq, Nk, q.device)
    return q, k, v, bias


def _mha_out_to_heads(m: nn.MultiheadAttention) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gradient of the MHA output ``y = O W_o^T + b_o`` -> ``dL/dO`` per head ``(B, H, N, d)``."""

    def to_heads(g: torch.Tensor) -> torch.Tensor:
        if not m.batch_first:
            g = g.transpose(0, 1)
        B, N, E = g.shape
        d_o = g @ m.out_proj.weight.to(g.dtype)  # (B, N, E): y is linear in O
        return d_o.view(B, N, m.num_heads, E // m.num_heads).transpose(1, 2)

    return to_heads


# ------------------------------------------------------------------------------------------------ engine
def attention_module(site: AttentionSite) -> nn.Module:
    """The module within which ``site``'s attention is computed (an inner ``nn.MultiheadAttention`` if any)."""
    if isinstance(site.attn, nn.MultiheadAttention):
        return site.attn
    inner = [m for m in site.attn.modules() if isinstance(m, nn.MultiheadAttention)]
    return inner[0] if len(inner) == 1 else site.attn


class _Engine:
    def __init__(self, sites: Sequence[AttentionSite], on_call: Callable[[AttentionCall], None], graph: bool,
                 batch: int | None = None, rows: Sequence[int] | None = None, tokens: int | None = None) -> None:
        self.sites = list(sites)
        self.on_call = on_call
        self.graph = graph
        self.batch = batch
        self.tokens = tokens
        self.asked = None if rows is None else list(rows)
        self.every_row = False  # the caller reads every row: verification computes them all once (`verify_call`)
        #: `substitute_sdpa`'s kernel for plain SDPA calls ("lse", "probs", "mean"), if any: one for every layer,
        #: or per layer (a layer missing from the mapping runs as it is)
        self.kernel: str | Mapping[int, str | None] | None = None
        self.heads = {s.layer: s.num_heads for s in self.sites}
        self.modules = {s.layer: attention_module(s) for s in self.sites}
        self.mode = _Mode(self)
        self.stack: list[int] = []
        self.counts: dict[int, int] = {s.layer: 0 for s in self.sites}
        self.ran: dict[int, int] = {s.layer: 0 for s in self.sites}
        self.pending: dict[int, AttentionCall] = {}  # explicit softmax seen, its product with V not yet
        self.entered = 0
        self.proving = False  # `prove_batch_axis`'s own runs: a fold whose order is not yet proven is read
        self.folded: set[int] = set()  # layers whose call in this pass folded heads into the batch
        self.delivered: set[int] = set()  # layers whose call reached ``on_call``
        self.until_captured = False  # the pass ends once every site was delivered (`observe_attention`)

    def kernel_for(self, layer: int | None) -> str | None:
        """`substitute_sdpa`'s kernel for ``layer``'s SDPA call (``None``: the call runs as it is)."""
        if layer is None or self.kernel is None:
            return None
        return self.kernel if isinstance(self.kernel, str) else self.kernel.get(layer)

    def fold(self, layer: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
        """``(B, H)`` when the call's first tensor is 3-d with a leading axis of exactly images x the layer's
        heads (heads folded into the batch, read batch-major), else ``None`` (the call is read as it is, and a
        3-d one refused). A batched fold is read only once its order was proven on this module."""
        x = args[0] if args else next(iter(kwargs.values()), None)
        if self.batch is None or not isinstance(x, torch.Tensor) or x.dim() != 3:
            return None
        H = self.heads[layer]
        if x.shape[0] != self.batch * H:
            return None  # another fold (windows x images, copies of the tokens): refused as it is
        m = self.modules[layer]
        _FOLDS[m] = True
        self.folded.add(layer)
        if self.batch > 1 and H > 1 and not self.proving and not _FOLD_ORDER_PROVEN.get(m):
            raise CaptureError(
                "model", f"layer {layer}: its attention folds {H} heads into the batch in an order not proven "
                "for this model (a capture of several images must be preceded by vitscope's one-image probe)",
                "capture through vitscope.capture / fused_attention / the methods, which prove it first",
            )
        return (self.batch, H)

    @property
    def current(self) -> int | None:
        return self.stack[-1] if self.stack else None

    def ends_at(self, layer: int) -> bool:
        """``layer``'s kernel call is the last one the pass needs (``until_captured``, every other site delivered)
        and a whole run of its module at this token count was seen to make one call (`_ONE_CALL`; the first
        capture at a size runs it whole): the pass may end at the call itself."""
        return (self.until_captured and not self.proving and self.counts[layer] == 0
                and len(self.delivered) == len(self.sites) - 1 and layer not in self.delivered
                and self.tokens in _ONE_CALL.get(self.modules[layer], ()))

    def _count(self, call: AttentionCall) -> None:
        """One call per module run; batch and heads as the model is described (counts from the kernel call)."""
        layer = call.layer
        self.counts[layer] += 1
        if self.counts[layer] > self.ran[layer]:
            raise CaptureError(
                "model", f"layer {layer} computed attention {self.counts[layer]} times in one pass of its module",
                "vitscope reads one softmax/attention kernel per layer; declare the module that makes one call",
            )
        n_batch, n_heads, _, _ = call.shape  # (B, H, Nq, Nk)
        if self.batch is not None and n_batch != self.batch:
            windowed = None if self.tokens is None else windowed_call_error(call, self.tokens, self.batch)
            if windowed is not None:
                raise windowed
            raise CaptureError(
                "model", f"layer {layer}: the attention kernel's batch axis has {n_batch} entries for {self.batch} "
                "image(s) (patches or heads folded into the batch: an unfold, a heads-first layout?)",
                "vitscope reads attention laid out as (batch, heads, tokens, tokens) with one batch entry per image",
            )
        declared = self.heads[layer]
        if n_heads != declared:
            loop = " (one kernel call per head?)" if n_heads == 1 else ""
            raise CaptureError(
                "model", f"layer {layer}: the attention kernel computes {n_heads} head(s) per call{loop}, the model is "
                f"described with num_heads={declared}",
                f"vitscope takes the head count from the kernel: pass num_heads={n_heads} to vitscope.wrap"
                if n_heads != 1 else "a loop of one-head attention calls cannot be captured; compute all heads in one call",
            )
        if self.batch is not None and layer not in self.folded:
            _FOLDS.setdefault(self.modules[layer], False)
        if self.batch is not None and n_batch != n_heads:  # the batch axis could not be the heads': proven
            _BATCH_AXIS_PROVEN[self.modules[layer]] = True

    def _deliver(self, call: AttentionCall) -> None:
        if not self.graph:
            for name in ("q", "k", "v", "probs"):
                t = getattr(call, name)
                if t is not None and t.requires_grad:  # (without a graph there is nothing to detach)
                    setattr(call, name, t.detach())
        self.on_call(call)
        self.delivered.add(call.layer)

    def report(self, call: AttentionCall, mha: nn.MultiheadAttention | None = None) -> None:
        """A q/k call (SDPA, nn.MultiheadAttention): counted, verified, delivered."""
        self._count(call)
        if _VERIFY:
            verify_call(call, self.asked, mha, every_row=self.every_row)
        self._deliver(call)

    def softmax(self, call: AttentionCall) -> None:
        """An explicit softmax: held until the module multiplies it with V (`product`)."""
        self._count(call)
        self.pending[call.layer] = call

    def product(self, layer: int, func: Any, args: tuple[Any, ...], out: Any) -> None:
        """A product call after layer's softmax: if it multiplies (B, H, Nq, Nk) weights with V, the weights
        must be the softmax output; then the call is verified and delivered."""
        call = self.pending[layer]
        probs = call.probs
        ops = _product_operands(func, args)
        if probs is None or ops is None or not isinstance(out, torch.Tensor):
            return
        B, H, Nq, Nk = call.shape
        forms = []  # (weights, v, weights written first)
        for w, other, first in ((ops[0], ops[1], True), (ops[1], ops[0], False)):
            if not isinstance(w, torch.Tensor) or not isinstance(other, torch.Tensor):
                continue
            if w.numel() != probs.numel() or other.numel() % (B * H * Nk):
                continue
            if out.numel() != B * H * Nq * (other.numel() // (B * H * Nk)):
                continue  # not (weights) x (values): some other product
            forms.append((w, other, first))
        if not forms:
            return
        found = next((f for f in forms if _is_softmax_output(f[0], probs)), None)
        if found is None:
            raise CaptureError(
                "model", f"layer {layer}: the weights multiplied with V are not the softmax output (a step after "
                "the softmax: talking heads, a mask or a renormalisation)",
                "vitscope captures only the weights the model applies to V; this layer's attention cannot be "
                "captured exactly",
            )
        w, other, first = found
        del self.pending[layer]
        plain = func not in (torch.einsum, torch.baddbmm, torch.Tensor.baddbmm) and first
        if plain and tuple(w.shape[-2:]) == (Nq, Nk) and other.dim() >= 2 and other.shape[-2] == Nk:
            dv = int(other.shape[-1])
            call.v = other.reshape(B, H, Nk, dv)  # (B, H, Nk, dv)
            if _VERIFY:
                ids = sample_rows(Nq, self.asked)
                with torch.no_grad():
                    dt = torch.float64 if probs.dtype == torch.float64 else torch.float32
                    check_product(layer, probs[:, :, ids].detach().to(dt), call.v.detach(),
                                  out.detach().reshape(B, H, Nq, dv)[:, :, ids], eps_in=_input_eps(out),
                                  logit_bound=0.0, step="the product of the softmax output with V")
        self._deliver(call)

    # ---- module hooks
    def enter(self, layer: int) -> None:
        self.stack.append(layer)
        self.ran[layer] += 1
        self.mode.__enter__()
        self.entered += 1

    def leave(self, layer: int) -> None:
        if self.entered:
            self.mode.__exit__(None, None, None)
            self.entered -= 1
        if self.stack and self.stack[-1] == layer:
            self.stack.pop()
        if self.pending.pop(layer, None) is not None:
            raise CaptureError(
                "model", f"layer {layer}: vitscope cannot see what multiplies V after the softmax (no matmul, @, "
                "bmm or einsum with the softmax output in the attention module)",
                "compute attn @ v with torch.matmul or @ inside the attention module, or use the model's "
                "scaled_dot_product_attention path",
            )
        if self.counts[layer] < self.ran[layer]:
            raise CaptureError(
                "model", f"layer {layer}: its attention module ran but made no attention call vitscope can see "
                "(no scaled_dot_product_attention, no softmax over (B, H, N, N))",
                "vitscope reads token softmax attention only: linear or sigmoid attention, custom kernels, flash/flex "
                "attention and torch.compile'd modules cannot be captured; use attn_implementation='sdpa' or 'eager'",
            )
        if self.tokens is not None:  # one call per run (a second was refused in `_count`, none just above)
            _ONE_CALL.setdefault(self.modules[layer], set()).add(self.tokens)

    def close(self) -> None:
        while self.entered:
            self.mode.__exit__(None, None, None)
            self.entered -= 1
        self.stack.clear()
        self.pending.clear()

    def mha_call(self, layer: int, m: nn.MultiheadAttention, args: Any, kwargs: Any, output: Any) -> None:
        self.ran[layer] += 1
        with torch.no_grad():
            q, k, v, bias = _mha_qkv(m, tuple(args), dict(kwargs))
        y = output[0] if isinstance(output, tuple) else output
        self.report(AttentionCall(
            layer=layer, scale=1.0 / math.sqrt(q.shape[-1]), q=q, k=k, v=v, bias=bias, out=y,
            out_to_heads=_mha_out_to_heads(m), source="multihead",
        ), mha=m)

    def check_complete(self) -> None:
        for layer, n in self.counts.items():
            if n != 1:
                raise CaptureError(
                    "model", f"layer {layer} reported attention {n} times in one forward pass (expected once)",
                    "each selected layer's attention module must run exactly once per forward",
                )


@contextmanager
def observe_attention(
    sites: Sequence[AttentionSite], on_call: Callable[[AttentionCall], None], *, graph: bool = False,
    batch: int | None = None, rows: Sequence[int] | None = None, tokens: int | None = None, proving: bool = False,
    every_row: bool = False, kernel: str | Mapping[int, str | None] | None = None, until_captured: bool = False,
) -> Iterator[Callable[[], None]]:
    """Report each of ``sites``' attention computations to ``on_call`` while the block runs.

    Yields ``check()``: call it after the forward pass to enforce that every selected layer reported exactly
    once. ``graph=True`` keeps q/k/v/probs in the autograd graph (gradient methods). ``batch``: the number of
    images, which every call's batch axis must equal; ``rows``: the query rows the caller reads (verified too
    when few); ``tokens``: the image's token count, so that a call whose batch is the images times some windows
    is refused as windowed attention (`vitscope.capture.windows`). Every call is verified before ``on_call`` sees it (module docstring). All hooks are removed and
    every mode popped on exit, also after an exception. ``every_row``: the caller reads every query row of every
    call (a small input's dense strategy): the verification then computes all rows once, checks the sampled ones
    against the kernel's output, and leaves them on the call (`AttentionCall.verified`) for the caller to reuse.
    ``kernel`` (``"lse"``, ``"probs"`` or ``"mean"``, no graph; or a mapping from layer to one of them or
    ``None``): plain SDPA calls run through `substitute_sdpa`, which leaves the rows' log-sum-exp
    (``AttentionCall.lse``), the probabilities (``AttentionCall.probs``, beside q and k) or their mean over
    heads (``AttentionCall.mean_probs``) on the call; calls it does not take run as they are. The verification
    is the same either way (the sampled rows times V reproduce the substituted kernel's output).
    ``until_captured``: once every site's call was delivered, a forward hook on its attention module (run after
    the engine's own, so a second kernel call in that module is still refused) raises
    `vitscope.capture.hooks.StopForward`: the rest of the model does not run; the caller catches it around the
    forward pass (for callers that need no model output). The pass ends at the last site's kernel call itself
    when a whole run of its module at this token count was seen to make that one call only (`_Engine.ends_at`):
    a plain SDPA call (no causal flag; a mask is sliced to the rows) with no substituted kernel then computes
    the rows the verification reads and no others (`sampled_sdpa`), and neither the rest of that kernel nor
    the module's projection runs.
    """
    kinds = set(kernel.values()) if isinstance(kernel, Mapping) else {kernel}
    if not kinds <= {None, "lse", "probs", "mean"} or (kinds != {None} and graph):
        raise ValueError(f"kernel={kernel!r} (graph={graph}): expected None, 'lse', 'probs' or 'mean' "
                         "(or a mapping from layer to one of them) without a graph")
    engine = _Engine(sites, on_call, graph, batch, rows, tokens)
    engine.every_row = every_row
    engine.kernel = kernel
    engine.proving = proving  # (private: `prove_batch_axis`'s runs)
    engine.until_captured = until_captured
    handles: list[Any] = []
    try:
        for site in sites:
            m = engine.modules[site.layer]  # (found once, by the engine)
            layer = site.layer
            if isinstance(m, nn.MultiheadAttention):

                def mha_hook(mod: nn.Module, args: Any, kwargs: Any, output: Any, layer: int = layer) -> None:
                    assert isinstance(mod, nn.MultiheadAttention)
                    engine.mha_call(layer, mod, args, kwargs, output)

                handles.append(m.register_forward_hook(this_thread_only(mha_hook), with_kwargs=True))
            else:

                def pre(_m: nn.Module, _args: Any, layer: int = layer) -> None:
                    engine.enter(layer)

                def post(_m: nn.Module, _args: Any, _out: Any, layer: int = layer) -> None:
                    engine.leave(layer)

                handles.append(m.register_forward_pre_hook(this_thread_only(pre)))
                handles.append(m.register_forward_hook(this_thread_only(post)))
        if until_captured:

            def stop(_m: nn.Module, _args: Any, _out: Any) -> None:
                if len(engine.delivered) == len(engine.sites):
                    raise StopForward

            for m in {id(m): m for m in engine.modules.values()}.values():  # after every engine hook on it
                handles.append(m.register_forward_hook(this_thread_only(stop)))
        yield engine.check_complete
    finally:
        engine.close()
        for h in handles:
            h.remove()


def prove_batch_axis(vit: VitModel, pixels: torch.Tensor, sites: Sequence[AttentionSite],
                     tokens: int | None = None) -> None:
    """Prove, once per attention module, how a batch of several images is laid out in its kernel call.

    - Batch == heads: a kernel fed ``(heads, batch, N, d)`` passes every count check and would swap the two axes
      silently. Unless each selected layer's batch axis was already seen to be the images' (a capture with
      batch != heads), the first image runs alone once: a heads-first layer then reports ``heads`` entries for
      1 image and is refused (`_Engine._count`).
    - Heads folded into the batch (``(B*H, N, d)``, SAM/ViTDet): both the batch-major and the heads-major reading
      pass the row-by-row verification, so the first image alone (``(H, N, d)``: no order to get wrong) is
      compared with the first two images as one batch: the batch-major reading of image 0 must equal it; a
      heads-major fold is refused. A module never seen is run on the first image alone to find out.

    ``tokens``: the image's token count (`observe_attention`'s). No grad; nothing is kept but the verdicts (per
    module, weakly).
    """
    n_images = int(pixels.shape[0])
    if n_images <= 1:
        return
    mods = {s.layer: attention_module(s) for s in sites}
    heads_first = n_images == vit.info.num_heads and not all(_BATCH_AXIS_PROVEN.get(m) for m in mods.values())
    unseen = any(m not in _FOLDS for m in mods.values())
    if not (heads_first or unseen or any(_FOLDS.get(m) and not _FOLD_ORDER_PROVEN.get(m) for m in mods.values())):
        return
    alone: dict[int, torch.Tensor] = {}
    _probe_run(vit, pixels[:1], sites, alone, tokens)
    to_prove = [s for s in sites if _FOLDS.get(mods[s.layer]) and not _FOLD_ORDER_PROVEN.get(mods[s.layer])]
    if not to_prove:
        return
    pair: dict[int, torch.Tensor] = {}
    _probe_run(vit, pixels[:2], to_prove, pair, tokens)
    for s in to_prove:
        ref, got = alone[s.layer][0], pair[s.layer]  # (H, N, x), (2, H, N, x) read batch-major
        H = got.shape[1]
        heads_major = got.reshape(2 * H, *got.shape[2:]).reshape(H, 2, *got.shape[2:])[:, 0]  # (H, N, x)
        tol = 1e-3 if ref.dtype in (torch.float32, torch.float64) else 3e-2
        scale = float(ref.abs().amax()) + 1e-12
        err_b = float((got[0] - ref).abs().amax()) / scale
        err_h = float((heads_major - ref).abs().amax()) / scale
        if not err_b <= tol:
            order = "heads-major ((H, B, N, d) folded)" if err_h <= tol else "neither batch-major nor heads-major"
            raise CaptureError(
                "model", f"layer {s.layer}: its attention folds heads into the batch {order}: image 0 alone differs "
                f"from its batch-major reading in a batch of two by {err_b:.3g} (relative)",
                "vitscope reads a fold laid out (B, H, N, d).reshape(B*H, N, d) only; capture one image at a time",
            )
        _FOLD_ORDER_PROVEN[mods[s.layer]] = True


def _probe_run(vit: VitModel, pixels: torch.Tensor, sites: Sequence[AttentionSite],
               sink: dict[int, torch.Tensor], tokens: int | None) -> None:
    """Run ``pixels`` with ``sites`` observed (no grad; folds read batch-major, unproven): each layer's q (or
    its softmax output) ``(B, H, N, x)`` into ``sink``."""

    def keep(call: AttentionCall) -> None:
        t = call.q if call.q is not None else call.probs
        assert t is not None
        sink[call.layer] = t.detach().float()

    with torch.no_grad(), observe_attention(sites, keep, batch=int(pixels.shape[0]), tokens=tokens, proving=True) as check:
        vit(pixels)
        check()
