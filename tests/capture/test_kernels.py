"""`vitscope.capture.kernels.mean_sdpa`: the attention output and the head-mean probabilities against float64.

The reference is SDPA's definition written out in float64 (``softmax(q k^T * scale) V`` and its mean over heads).
Inputs are strided views of one ``(B, N, 3, H, d)`` qkv tensor, as timm and transformers pass them, and q is
scaled so attention is peaked (mean row max > 0.2, asserted): a wrong row, head or block cannot pass as a near
uniform average. Each shape runs with every head at once (the small-layer path) and in blocks of a few rows per
head (a partial last block included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from vitscope.capture import intercept, kernels


@dataclass(frozen=True)
class Shape:
    id: str
    B: int
    H: int
    Nq: int
    Nk: int
    d: int
    dv: int
    sharpen: float = 3.0  # q multiplied by this: peaked rows


SHAPES = [
    Shape("self-2x3x23", 2, 3, 23, 23, 8, 8),
    Shape("cross-1x4-9q-31k", 1, 4, 9, 31, 16, 16),
    Shape("dv-differs", 2, 2, 17, 17, 8, 12),
    Shape("one-head", 1, 1, 40, 40, 4, 4),
    Shape("huge-logits", 1, 2, 19, 19, 8, 8, sharpen=60.0),  # logits in the hundreds: no overflow, no NaN
]


def _qkv(s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    if s.Nq == s.Nk and s.d == s.dv:  # views of one fused qkv projection output, (B, H, N, d) strided
        qkv = torch.randn(s.B, s.Nq, 3, s.H, s.d, generator=g)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = torch.randn(s.B, s.Nq, s.H, s.d, generator=g).transpose(1, 2)
        k = torch.randn(s.B, s.Nk, s.H, s.d, generator=g).transpose(1, 2)
        v = torch.randn(s.B, s.Nk, s.H, s.dv, generator=g).transpose(1, 2)
    return q * s.sharpen, k, v


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)  # (B, H, Nq, Nk)
    return a @ v.double(), a


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_mean_sdpa_equals_the_float64_definition(shape: Shape, blocks: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if blocks:  # 4-row blocks per head: several whole blocks and a partial last one
        monkeypatch.setattr(kernels, "WHOLE_ELEMENTS", 0)
        monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 4 * shape.Nk)
        monkeypatch.setattr(kernels, "MIN_BLOCK_ROWS", 1)
        assert kernels.block_rows(shape.Nq, shape.Nk) == min(4, shape.Nq)
    q, k, v = _qkv(shape)
    scale = 1.0 / math.sqrt(shape.d)
    want_out, probs = _reference(q, k, v, scale)
    assert probs.amax(-1).mean() > 0.2  # peaked
    out, fused = kernels.mean_sdpa(q, k, v, scale)
    assert out.shape == (shape.B, shape.H, shape.Nq, shape.dv)
    assert fused.shape == (shape.B, shape.Nq, shape.Nk)
    assert out.transpose(1, 2).is_contiguous()  # laid out (B, Nq, H, dv), as the CPU flash kernel returns it
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fused.double(), probs.mean(1), atol=1e-6, rtol=0)
    assert torch.isfinite(out).all() and torch.isfinite(fused).all()


def test_substitute_sdpa_mean_equals_sdpa_and_refuses_what_it_does_not_compute() -> None:
    """The "mean" substitution gives SDPA's output (float32 rounding) and the head mean; masked, causal,
    dropout, float64 or graph calls are left to SDPA itself (``None``)."""
    q, k, v = _qkv(SHAPES[0])
    out, fused = intercept.substitute_sdpa("mean", (q, k, v), {})  # type: ignore[misc]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)
    _, probs = _reference(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(fused.double(), probs.mean(1), atol=1e-6, rtol=0)
    out2, _ = intercept.substitute_sdpa("mean", (q, k, v), {"scale": 0.3})  # type: ignore[misc]
    torch.testing.assert_close(out2, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=2e-6, rtol=1e-5)
    mask = torch.zeros(q.shape[2], k.shape[2])
    for kwargs in ({"attn_mask": mask}, {"is_causal": True}, {"dropout_p": 0.1}):
        assert intercept.substitute_sdpa("mean", (q, k, v), kwargs) is None
    assert intercept.substitute_sdpa("mean", (q.double(), k.double(), v.double()), {}) is None
    with torch.enable_grad():
        assert intercept.substitute_sdpa("mean", (q.requires_grad_(), k, v), {}) is None
