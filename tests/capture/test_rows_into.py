"""`vitscope.capture.intercept.prob_chunks` with an ``out=`` destination: the every-row capture path (a
[CLS]-free model's default query) that writes the softmax straight into the result. It must equal the chunked
path through its reused buffer row for row (several images, heads and chunks, with each shape of additive bias),
`AttentionCall.rows` must take it and check every chunk (its row-sum guard fires), and a destination it cannot
write into is refused."""

from __future__ import annotations

import pytest
import torch

from vitscope.capture import intercept
from vitscope.errors import CaptureError

B, H, Q, D = 2, 3, 37, 8


def _reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The buffered path, one query row at a time (a chunking independent of the one under test)."""
    out = torch.empty(B, H, Q, Q)
    for s, e, probs in intercept.prob_chunks(q, k, D**-0.5, 1, torch.float32, None, bias):
        out[:, :, s:e] = probs
    return out


def _inputs(bias_shape: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, Q, D, generator=g) * 3, torch.randn(B, H, Q, D, generator=g) * 3  # peaked rows
    return q, k, None if bias_shape is None else torch.randn(*bias_shape, generator=g)


@pytest.mark.parametrize("bias_shape", [None, (1, 1, 1, Q), (B, 1, Q, Q), (1, H, Q, Q), (B, H, Q, Q)])
def test_prob_chunks_out_equals_buffered(bias_shape: tuple[int, ...] | None) -> None:
    q, k, bias = _inputs(bias_shape)
    want = _reference(q, k, bias)
    assert want.max(dim=-1).values.mean() > 0.2  # not near-uniform: a wrong row would show
    out = torch.full((B, H, Q, Q), float("nan"))
    seen = []
    for s, e, probs in intercept.prob_chunks(q, k, D**-0.5, 10, torch.float32, None, bias, out=out):  # 4 chunks
        assert probs.data_ptr() == out[:, :, s:e].data_ptr()  # written in place, not copied afterwards
        seen.append((s, e))
    assert seen == [(0, 10), (10, 20), (20, 30), (30, 37)]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_rows_write_into_the_result_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """`AttentionCall.rows` with every head kept goes through ``out=`` (cache-sized chunks) and gives the same
    rows as with heads fused afterwards from a reference."""
    q, k, bias = _inputs((1, H, Q, Q))
    monkeypatch.setattr(intercept, "ROWS_CHUNK_BYTES", B * H * Q * 4 * 10)  # 10 rows a chunk
    calls = []
    real = intercept.prob_chunks

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls.append(kwargs.get("out") is not None)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(intercept, "prob_chunks", spy)
    got = intercept.AttentionCall(layer=0, scale=D**-0.5, q=q, k=k, bias=bias).rows(None, None, False)
    assert calls == [True]
    torch.testing.assert_close(got, _reference(q, k, bias), atol=1e-6, rtol=0)


def test_rows_check_each_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intercept, "ROWS_CHUNK_BYTES", Q * 4 * 10)  # 10 rows a chunk
    q, k = torch.randn(1, 1, Q, D), torch.randn(1, 1, Q, D)
    q[0, 0, 30] = float("nan")  # one row that is not a softmax, in the last chunk
    with pytest.raises(CaptureError, match="layer 4: captured attention rows do not sum to 1"):
        intercept.AttentionCall(layer=4, scale=D**-0.5, q=q, k=k).rows(None, None, False)


def test_prob_chunks_refuses_an_out_it_cannot_fill() -> None:
    q, k, _ = _inputs(None)
    for bad in (torch.empty(B, H, Q, Q, dtype=torch.float64), torch.empty(B, H, Q, Q + 1)[..., :Q],
                torch.empty(B, H, Q - 1, Q)):
        with pytest.raises(ValueError, match="out: expected"):
            next(intercept.prob_chunks(q, k, D**-0.5, 10, torch.float32, None, None, out=bad))
