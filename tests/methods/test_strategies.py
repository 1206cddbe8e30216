"""Issue 21: methods with a small-input ("dense") and a large-input ("streaming") strategy give the same result.

One table of cases, each run with both strategies (`vitscope.capture.budget.choose_strategy` picks one per call):
the two agree within 1e-6 and both equal an independent float64 reference built from the toy blocks' own
``softmax(q k^T / sqrt(d))`` (tests/capture/test_verify.py's blocks: q/k drawn with std 0.6 so attention is
peaked, mean row max > 0.2, asserted). The kernels cover SDPA (q/k rebuilt) and an explicit softmax (the
kernel's own probabilities are fused). The per-call self-verification (``A_rows @ V == O_rows``) fires on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tests.capture.test_verify import _kernel, _no_state_left, _pixels, _sigmoid_attention, _toy
from vitscope.capture import budget
from vitscope.capture.intercept import CaptureError
from vitscope.errors import VitscopeError
from vitscope.methods.streaming import streaming_rollout

STRATEGIES = ("dense", "streaming")


def _rollout64(ref: torch.Tensor, residual: float, fusion: str, start: int, discard: float,
               renormalize: bool) -> torch.Tensor:
    """Rollout written out plainly in float64 from ``ref`` ``(L, B, H, N, N)``: ``R`` ``(B, N, N)``; discard
    zeroes the lowest ``discard`` share of each fused matrix outside the [CLS] key column (token 0)."""
    fused = {"mean": ref.mean(2), "max": ref.amax(2), "min": ref.amin(2)}[fusion]  # (L, B, N, N)
    L, B, N, _ = fused.shape
    eye = torch.eye(N, dtype=torch.float64)
    joint = eye.expand(B, N, N).clone()
    for layer in range(start, L):
        f = fused[layer].clone()
        if discard > 0:
            for b in range(B):
                cand = f[b, :, 1:].flatten()
                k = int(cand.numel() * discard)
                low = cand.topk(k, largest=False).indices
                flat = f[b, :, 1:].clone().flatten()
                flat[low] = 0.0
                f[b, :, 1:] = flat.view(N, N - 1)
        a = (1 - residual) * f + residual * eye
        if renormalize:
            a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint  # A'_l @ ... @ A'_start
    return joint


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # the toy's attention kernel: "sdpa" (q/k rebuilt) or "eager" (its own probabilities)
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch: int = 2


CASES = [
    Case("mean-cls-sdpa", "sdpa"),
    Case("mean-cls-eager", "eager"),
    Case("max-discard-sdpa", "sdpa", {"head_fusion": "max", "discard_ratio": 0.5}),
    Case("min-residual-start-eager", "eager", {"head_fusion": "min", "residual": 0.2, "start_layer": 1}),
    Case("all-rows-sdpa", "sdpa", {"queries": None}, batch=3),
    Case("patch-mean-sdpa", "sdpa", {"queries": "mean"}),
    Case("no-renormalize-max-sdpa", "sdpa", {"head_fusion": "max", "renormalize": False}, batch=1),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rollout_strategies_agree_with_each_other_and_the_reference(case: Case) -> None:
    model, vit = _toy(case.kind)
    x = _pixels(case.batch)
    got = {s: streaming_rollout(vit, x, strategy=s, chunk_rows=3, **case.kwargs) for s in STRATEGIES}
    assert {s: r.meta["strategy"] for s, r in got.items()} == {s: s for s in STRATEGIES}
    torch.testing.assert_close(got["dense"].rows, got["streaming"].rows, atol=1e-6, rtol=0)

    ref = torch.stack([blk.ref for blk in model.blocks])  # (L, B, H, N, N) float64, the blocks' own softmax
    assert ref.amax(-1).mean() > 0.2  # peaked: a wrong row or layer cannot pass by accident
    kw = case.kwargs
    R = _rollout64(ref, kw.get("residual", 0.5), kw.get("head_fusion", "mean"), kw.get("start_layer", 0),
                   kw.get("discard_ratio", 0.0), kw.get("renormalize", True))
    queries = kw.get("queries", "auto")
    want = R if queries is None else R[:, 1:].mean(1, keepdim=True) if queries == "mean" else R[:, :1]
    for s in STRATEGIES:
        torch.testing.assert_close(got[s].rows.double(), want, atol=1e-5, rtol=0)
    _no_state_left(model)


def test_auto_picks_dense_for_small_inputs_and_streaming_above_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    _, vit = _toy("sdpa")
    x = _pixels(2)
    assert streaming_rollout(vit, x).meta["strategy"] == "dense"
    monkeypatch.setattr(budget, "DENSE_BYTES", 0)
    assert streaming_rollout(vit, x).meta["strategy"] == "streaming"
    # the model: 2 layers x 2 images x 17^2 tokens x 4 bytes kept by dense
    assert budget.choose_strategy(2, 17, 2, budget_bytes=4 * 2 * 2 * 17 * 17) == "dense"
    assert budget.choose_strategy(2, 17, 2, budget_bytes=4 * 2 * 2 * 17 * 17 - 1) == "streaming"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_verification_fires_on_both_strategies(strategy: str) -> None:
    """A kernel whose output is not softmax(q k^T) V is refused whichever strategy builds the rows."""
    model, vit = _toy("sdpa")
    with _kernel(_sigmoid_attention), pytest.raises(CaptureError, match=r"the kernel's output is not softmax"):
        streaming_rollout(vit, _pixels(2), strategy=strategy)  # type: ignore[arg-type]
    _no_state_left(model)


def test_unknown_strategy_and_bad_sizes_are_one_line_errors() -> None:
    _, vit = _toy("sdpa")
    with pytest.raises(VitscopeError, match=r"^strategy: unknown strategy 'fast'") as err:
        streaming_rollout(vit, _pixels(1), strategy="fast")  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
    with pytest.raises(VitscopeError, match=r"^tokens: must be positive, got 0"):
        budget.choose_strategy(1, 0, 12)
