"""`vitscope.capture.intercept._rows_into`: the every-row capture path (a [CLS]-free model's default query) that
writes the softmax straight into the result. It must equal the chunked `prob_chunks` path row for row (several
images, heads and chunks, with each shape of additive bias; float32 rounding apart), and its per-chunk row-sum
check must fire."""

from __future__ import annotations

import pytest
import torch

from vitscope.capture import intercept
from vitscope.errors import CaptureError

B, H, Q, D = 2, 3, 37, 8


def _reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty(B, H, Q, Q)
    for s, e, probs in intercept.prob_chunks(q, k, D**-0.5, 5, torch.float32, None, bias):
        out[:, :, s:e] = probs
    return out


@pytest.mark.parametrize("bias_shape", [None, (1, 1, 1, Q), (B, 1, Q, Q), (1, H, Q, Q), (B, H, Q, Q)])
def test_rows_into_equals_prob_chunks(bias_shape: tuple[int, ...] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intercept, "_ROWS_CHUNK_BYTES", 10 * Q * 4)  # 10 rows a chunk: 4 chunks per head
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, Q, D, generator=g) * 3, torch.randn(B, H, Q, D, generator=g) * 3  # peaked rows
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=g)
    out = torch.full((B, H, Q, Q), float("nan"))
    intercept._rows_into(out, q, k, D**-0.5, bias, layer=0)
    want = _reference(q, k, bias)
    assert want.max(dim=-1).values.mean() > 0.2  # not near-uniform: a wrong row would show
    # the same math per row; a 2-d matmul per head rounds apart from the batched one by float32 ulps only
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_rows_into_checks_each_chunk() -> None:
    q, k = torch.randn(1, 1, Q, D), torch.randn(1, 1, Q, D)
    q[0, 0, 30] = float("nan")  # one row that is not a softmax
    with pytest.raises(CaptureError, match="layer 4: captured attention rows do not sum to 1"):
        intercept._rows_into(torch.empty(1, 1, Q, Q), q, k, D**-0.5, None, layer=4)
