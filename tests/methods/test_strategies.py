"""Issue 21: methods with a small-input ("dense") and a large-input ("streaming") strategy give the same result.

One table of cases, each run with both strategies (`vitscope.capture.budget.choose_strategy` picks one per call):
the two agree within 1e-6 and both equal an independent float64 reference built from the toy blocks' own
``softmax(q k^T / sqrt(d))`` (tests/capture/test_verify.py's blocks: q/k drawn with std 0.6 so attention is
peaked, mean row max > 0.2, asserted). The kernels cover SDPA (q/k rebuilt) and an explicit softmax (the
kernel's own probabilities are fused). The per-call self-verification (``A_rows @ V == O_rows``) fires on both.

Three strategies: "dense" (each layer's fused rows kept; for plain float32 CPU SDPA calls from what the
substituted kernel returns with its output: the head-mean rows for mean fusion, built block by block by
`vitscope.capture.kernels.mean_sdpa`, else the probabilities), "fused" (SDPA's CPU kernel returns each row's
log-sum-exp; the products ``r @ P_h`` are ``r @ exp(s q k^T - lse)`` in blocks of query rows; mean fusion without
discard, other cases stream) and "streaming". ``small_blocks`` cases make both kernels' blocks 2 rows (17 tokens:
8 whole blocks and a 1-row one), so a block boundary or the partial last block is exercised. The last layer's
few query rows are computed as it runs (`FEW_ROWS`); ``few_rows=0`` cases take them from the kernel's rows too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tests.capture.test_verify import _kernel, _no_state_left, _pixels, _sigmoid_attention, _toy
from vitscope.capture import budget, intercept, kernels
from vitscope.capture.intercept import CaptureError
from vitscope.errors import VitscopeError
from vitscope.methods import streaming
from vitscope.methods.streaming import streaming_rollout

STRATEGIES = ("dense", "fused", "streaming")


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
    small_blocks: bool = False  # both kernels in 2-row blocks (`BLOCK_ELEMENTS` = 2 x 17 tokens + 1, no minimum)
    few_rows: int = streaming.FEW_ROWS  # 0: the last layer's query rows also come from the substituted kernel

    @property
    def fused(self) -> bool:
        """The fused strategy applies: q/k kernel, mean fusion, no discard (else it streams)."""
        kw = self.kwargs
        return self.kind == "sdpa" and kw.get("head_fusion", "mean") == "mean" and not kw.get("discard_ratio")

    def kernel_layers(self, strategy: str, n_layers: int) -> int:
        """Layers whose rows a substituted kernel gave: every q/k layer for dense (fused: where it applies),
        but the last one when its few query rows were computed as it ran."""
        if self.kind != "sdpa" or strategy == "streaming" or (strategy == "fused" and not self.fused):
            return 0
        queries = self.kwargs.get("queries", "auto")
        last_direct = queries is not None and not self.kwargs.get("discard_ratio") and self.few_rows > 0
        return n_layers - int(last_direct)


CASES = [
    Case("mean-cls-sdpa", "sdpa"),
    Case("mean-cls-eager", "eager"),
    Case("max-discard-sdpa", "sdpa", {"head_fusion": "max", "discard_ratio": 0.5}),
    Case("min-residual-start-eager", "eager", {"head_fusion": "min", "residual": 0.2, "start_layer": 1}),
    Case("all-rows-sdpa", "sdpa", {"queries": None}, batch=3),
    Case("patch-mean-sdpa", "sdpa", {"queries": "mean"}),
    Case("no-renormalize-max-sdpa", "sdpa", {"head_fusion": "max", "renormalize": False}, batch=1),
    Case("mean-residual-start-sdpa", "sdpa", {"residual": 0.3, "start_layer": 1}),
    Case("mean-cls-small-blocks-sdpa", "sdpa", batch=2, small_blocks=True),
    Case("all-rows-small-blocks-sdpa", "sdpa", {"queries": None}, batch=1, small_blocks=True),
    Case("mean-cls-last-from-kernel-sdpa", "sdpa", few_rows=0),
    Case("patch-mean-last-from-kernel-small-blocks-sdpa", "sdpa", {"queries": "mean"}, small_blocks=True,
         few_rows=0),
    Case("max-last-from-kernel-sdpa", "sdpa", {"head_fusion": "max", "queries": [0, 5]}, few_rows=0),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rollout_strategies_agree_with_each_other_and_the_reference(case: Case,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if case.small_blocks:
        monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 2 * 17 + 1)
        monkeypatch.setattr(kernels, "MIN_BLOCK_ROWS", 1)
        monkeypatch.setattr(kernels, "WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(streaming, "FEW_ROWS", case.few_rows)
    model, vit = _toy(case.kind)
    x = _pixels(case.batch)
    got = {s: streaming_rollout(vit, x, strategy=s, chunk_rows=3, **case.kwargs) for s in STRATEGIES}
    want_strategy = {"dense": "dense", "fused": "fused" if case.fused else "streaming", "streaming": "streaming"}
    assert {s: r.meta["strategy"] for s, r in got.items()} == want_strategy
    # the substituted kernel gave the layers' rows (q/k kernels): head-mean rows or probabilities for dense, lse
    # for fused
    n_layers = len(model.blocks) - case.kwargs.get("start_layer", 0)
    assert {s: r.meta["kernel_layers"] for s, r in got.items()} == {
        s: case.kernel_layers(s, n_layers) for s in STRATEGIES}
    for s in ("dense", "fused"):
        torch.testing.assert_close(got[s].rows, got["streaming"].rows, atol=1e-6, rtol=0)

    ref = torch.stack([blk.ref for blk in model.blocks])  # (L, B, H, N, N) float64, the blocks' own softmax
    assert ref.amax(-1).mean() > 0.2  # peaked: a wrong row or layer cannot pass by accident
    kw = case.kwargs
    R = _rollout64(ref, kw.get("residual", 0.5), kw.get("head_fusion", "mean"), kw.get("start_layer", 0),
                   kw.get("discard_ratio", 0.0), kw.get("renormalize", True))
    queries = kw.get("queries", "auto")
    want = R if queries is None else R[:, 1:].mean(1, keepdim=True) if queries == "mean" \
        else R[:, queries] if isinstance(queries, list) else R[:, :1]
    for s in STRATEGIES:
        torch.testing.assert_close(got[s].rows.double(), want, atol=1e-5, rtol=0)
    _no_state_left(model)


def test_auto_picks_dense_for_small_inputs_and_streaming_above_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    _, vit = _toy("sdpa")
    x = _pixels(2)
    assert streaming_rollout(vit, x).meta["strategy"] == "dense"
    monkeypatch.setattr(budget, "DENSE_BYTES", 0)  # mean fusion has a budget of its own (no H x N x N built)
    assert streaming_rollout(vit, x).meta["strategy"] == "dense"
    assert streaming_rollout(vit, x, head_fusion="max").meta["strategy"] == "streaming"
    monkeypatch.setattr(budget, "MEAN_DENSE_BYTES", 0)
    assert streaming_rollout(vit, x).meta["strategy"] == "fused"  # mean fusion, no discard
    assert streaming_rollout(vit, x, head_fusion="max").meta["strategy"] == "streaming"
    assert streaming_rollout(vit, x, discard_ratio=0.5).meta["strategy"] == "streaming"
    # the model: 2 layers x 2 images x 17^2 tokens x 4 bytes kept by dense
    assert budget.choose_strategy(2, 17, 2, budget_bytes=4 * 2 * 2 * 17 * 17) == "dense"
    assert budget.choose_strategy(2, 17, 2, budget_bytes=4 * 2 * 2 * 17 * 17 - 1) == "streaming"
    assert budget.choose_strategy(2, 17, 2, budget_bytes=4 * 2 * 2 * 17 * 17 - 1, fused=True) == "fused"
    assert budget.choose_strategy(2, 17, 2, budget_bytes=4 * 2 * 2 * 17 * 17, fused=True) == "dense"


def test_the_cost_model_at_the_benchmark_sizes() -> None:
    """DINOv2-S/14 + 4 registers (12 layers): 224 px (261 tokens) dense either way; 518 px (1374 tokens) dense
    for mean fusion (91 MB of head-mean rows kept, built by the substituted kernel), streaming otherwise; 1022 px
    (5334 tokens, 1.4 GB of rows) fused; two 518 px images (182 MB) still dense, eight (728 MB) fused."""
    assert budget.choose_strategy(1, 261, 12) == budget.choose_strategy(1, 261, 12, fused=True) == "dense"
    assert budget.choose_strategy(1, 1374, 12, fused=True) == "dense"
    assert budget.choose_strategy(1, 1374, 12) == "streaming"
    assert budget.choose_strategy(1, 5334, 12, fused=True) == "fused"
    assert budget.choose_strategy(2, 1374, 12, fused=True) == "dense"
    assert budget.choose_strategy(8, 1374, 12, fused=True) == "fused"


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


FALLBACKS = [  # (id, what makes the kernel substitution unavailable or the call unsupported, expected kernel layers:
    # dense's kernel is vitscope's own and still runs for the first layer; the last one's [CLS] row is computed)
    ("op-absent", lambda mp: mp.setattr(intercept, "FLASH_CPU", None), {"dense": 1, "fused": 0}),
    ("sdpa-would-not-pick-it", lambda mp: mp.setattr(torch, "_fused_sdp_choice", lambda *a, **k: 0),
     {"dense": 1, "fused": 0}),
    ("float64-model", None, {"dense": 0, "fused": 0}),
]


@pytest.mark.parametrize(("name", "patch", "layers"), FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_kernel_substitution_falls_back_where_it_cannot_run_exactly(
        name: str, patch: Any, layers: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the CPU kernel, where SDPA itself would not run it, or for inputs it does not take (float64), the
    calls run as they are: fused streams, dense rebuilds the rows, and the rollout rows are the same."""
    dtype = torch.float64 if name == "float64-model" else torch.float32
    model, vit = _toy("sdpa", dtype=dtype)
    x = _pixels(2, dtype)
    want = streaming_rollout(vit, x, strategy="streaming").rows
    if patch is not None:
        patch(monkeypatch)
    got = {s: streaming_rollout(vit, x, strategy=s) for s in ("dense", "fused")}
    assert {s: r.meta["kernel_layers"] for s, r in got.items()} == layers
    assert got["fused"].meta["strategy"] == "streaming"  # no layer had the kernel's lse
    for r in got.values():
        torch.testing.assert_close(r.rows, want, atol=1e-6, rtol=0)
    _no_state_left(model)


def test_substitution_never_replaces_a_patched_sdpa() -> None:
    """A replaced ``F.scaled_dot_product_attention`` is the model's kernel: it runs as it is (and is refused
    when it is not softmax attention), never swapped for torch's own."""
    call = (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    out, lse = intercept.substitute_sdpa("lse", call, {})  # type: ignore[misc]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(*call), atol=0, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(call[0] @ call[1].transpose(-2, -1) / 2, dim=-1))
    assert intercept.substitute_sdpa("lse", call, {"attn_mask": torch.zeros(5, 5)}) is None
    assert intercept.substitute_sdpa("probs", call, {"is_causal": True}) is None
    _, vit = _toy("sdpa")
    with _kernel(_sigmoid_attention), pytest.raises(CaptureError, match=r"the kernel's output is not softmax"):
        streaming_rollout(vit, _pixels(2), strategy="fused")
