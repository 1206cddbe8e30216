"""Low-memory paths against plain dense computations on the full ``L x H x N x N`` capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_vit
from vitscope.capture import capture
from vitscope.capture.prepare import default_device
from vitscope.capture.streaming import fused_attention
from vitscope.errors import VitscopeError
from vitscope.methods.streaming import streaming_distance, streaming_rollout


def _pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _dense_rollout(weights: torch.Tensor, residual: float, fusion: str, start: int) -> torch.Tensor:
    """The rollout product written out plainly, in float64: ``(B, N, N)``."""
    w = weights.double()  # (L, B, H, N, N)
    fused = {"mean": w.mean(2), "max": w.amax(2), "min": w.amin(2)}[fusion]  # (L, B, N, N)
    L, B, N, _ = fused.shape
    eye = torch.eye(N, dtype=torch.float64)
    joint = eye.expand(B, N, N).clone()
    for layer in range(start, L):
        a = (1 - residual) * fused[layer] + residual * eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint  # A'_l @ ... @ A'_start
    return joint


@pytest.mark.parametrize(
    ("num_registers", "size", "batch", "fusion", "residual", "start"),
    [
        (4, (32, 48), 2, "mean", 0.5, 0),  # registers, non-square grid, batch > 1
        (0, (40, 24), 3, "max", 0.3, 1),
        (4, (24, 40), 2, "min", 0.5, 0),
        (0, (32, 32), 1, "mean", 0.0, 0),  # no residual: the plain product
    ],
)
def test_rollout_equals_dense_reference(num_registers, size, batch, fusion, residual, start) -> None:
    vit = make_tiny_vit(num_registers=num_registers, depth=3, seed=3)
    x = _pixels(batch, *size)
    dense = _dense_rollout(capture(vit, x).weights, residual, fusion, start)  # (B, N, N)
    got = streaming_rollout(vit, x, residual=residual, head_fusion=fusion, start_layer=start, chunk_rows=5)
    assert got.rows.shape == (batch, 1, dense.shape[-1])
    torch.testing.assert_close(got.rows[:, 0].double(), dense[:, 0], atol=1e-5, rtol=0)
    gh, gw = size[0] // 8, size[1] // 8
    cls_map = got.map("cls")
    assert cls_map.shape == (batch, gh, gw)
    torch.testing.assert_close(cls_map.double(), dense[:, 0, 1 + num_registers :].reshape(batch, gh, gw),
                               atol=1e-5, rtol=0)


def test_rollout_all_rows_and_chosen_rows() -> None:
    vit = make_tiny_vit(num_registers=2, depth=3, seed=4)
    x = _pixels(2, 24, 32, seed=1)
    dense = _dense_rollout(capture(vit, x).weights, 0.5, "mean", 0)
    full = streaming_rollout(vit, x, queries=None, chunk_rows=4)
    torch.testing.assert_close(full.rows.double(), dense, atol=1e-5, rtol=0)
    # rows of a product of row-stochastic matrices sum to 1
    torch.testing.assert_close(full.rows.sum(-1), torch.ones(2, dense.shape[-1]), atol=1e-5, rtol=0)
    some = streaming_rollout(vit, x, queries=["cls", (1, 2), 1])
    patch = 3 + 1 * 4 + 2  # prefix (cls + 2 registers) + row 1 * 4 cols + col 2
    assert some.queries == (0, patch, 1)
    torch.testing.assert_close(some.rows.double(), dense[:, [0, patch, 1]], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"preset": "vit-explain"}, {"head_fusion": "min", "residual": 0.2, "start_layer": -2},
     {"head_fusion": "max", "renormalize": False, "discard_ratio": 0.5}, {"query": "mean"}],
)
def test_rollout_matches_library_rollout(kwargs: dict) -> None:
    from vitscope.methods.rollout import PRESETS, rollout

    vit = make_tiny_vit(num_registers=4, depth=3, seed=5)
    x = _pixels(2, 32, 48, seed=2)
    expected = rollout(capture(vit, x), **kwargs)  # (B, rows, cols)
    kw = dict(kwargs)
    if "preset" in kw:
        preset = PRESETS[kw.pop("preset")]
        kw = {"head_fusion": preset.head_fusion, "residual": preset.residual,
              "discard_ratio": preset.discard_ratio, "renormalize": preset.renormalize}
    queries = kw.pop("query", "auto")
    got = streaming_rollout(vit, x, queries=queries, chunk_rows=7, **kw).map()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_fused_attention_equals_capture(fusion: str) -> None:
    vit = make_tiny_vit(num_registers=1, depth=3, seed=6)
    x = _pixels(2, 24, 40, seed=3)
    full = capture(vit, x).weights  # (L, B, H, N, N)
    expected = {"mean": full.mean(2), "max": full.amax(2), "min": full.amin(2)}[fusion]
    got = fused_attention(vit, x, head_fusion=fusion, chunk_rows=3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    some = fused_attention(vit, x, layers=[-1, 0], queries=["cls", (0, 1)], head_fusion=fusion)
    torch.testing.assert_close(some, expected[[2, 0]][:, :, [0, 2 + 1]], atol=1e-6, rtol=0)


def test_streaming_distance_equals_hand_computation() -> None:
    vit = make_tiny_vit(num_registers=2, depth=2, seed=7)
    x = _pixels(2, 16, 24, seed=4)  # 2 x 3 grid of 8 px patches
    full = capture(vit, x).weights.double()  # (L, B, H, N, N)
    centres = [((r + 0.5) * 8, (c + 0.5) * 8) for r in range(2) for c in range(3)]
    dist = np.array([[np.hypot(a[0] - b[0], a[1] - b[1]) for b in centres] for a in centres])
    L, B, H = full.shape[:3]
    expected = np.zeros((L, B, H))
    for layer in range(L):
        for b in range(B):
            for h in range(H):
                patch = full[layer, b, h, 3:, 3:].numpy()  # queries and keys: patches only
                patch = patch / patch.sum(-1, keepdims=True)
                expected[layer, b, h] = (patch * dist).sum(-1).mean()
    got = streaming_distance(vit, x, chunk_rows=4)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_outputs_of_the_model_are_untouched_and_hooks_removed() -> None:
    vit = make_tiny_vit(depth=2, seed=8)
    x = _pixels(1, 32, 32)
    before = vit(x)
    streaming_rollout(vit, x)
    fused_attention(vit, x)
    assert all(not blk.attn.qkv._forward_hooks for blk in vit.blocks)
    torch.testing.assert_close(vit(x), before, atol=0, rtol=0)


def test_bad_arguments_name_the_argument() -> None:
    vit = make_tiny_vit()
    x = _pixels(1, 32, 32)
    with pytest.raises(VitscopeError, match="head_fusion"):
        streaming_rollout(vit, x, head_fusion="median")  # type: ignore[arg-type]
    with pytest.raises(VitscopeError, match="residual"):
        streaming_rollout(vit, x, residual=1.5)
    with pytest.raises(VitscopeError, match="discard_ratio"):
        streaming_rollout(vit, x, discard_ratio=1.0)
    with pytest.raises(VitscopeError, match="start_layer"):
        streaming_rollout(vit, x, start_layer=5)
    with pytest.raises(VitscopeError, match="compute_dtype"):
        fused_attention(vit, x, compute_dtype=torch.float16)
    with pytest.raises(VitscopeError, match="chunk_rows"):
        fused_attention(vit, x, chunk_rows=0)
    with pytest.raises(VitscopeError, match="device"):
        fused_attention(vit, x, device="nonsense")


@pytest.mark.skipif(default_device().type == "cpu", reason="needs a CUDA or MPS device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu_matches_float32(dtype: torch.dtype) -> None:
    dev = default_device()
    if dev.type == "mps" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 matmul is not supported on every MPS device")
    vit32 = make_tiny_vit(num_registers=4, depth=3, seed=9)
    x = _pixels(2, 32, 48, seed=5)
    ref = streaming_rollout(vit32, x).rows
    ref_fused = fused_attention(vit32, x)
    vit_half = make_tiny_vit(num_registers=4, depth=3, seed=9).to(dev, dtype)
    got = streaming_rollout(vit_half, x, compute_dtype=dtype, device=dev).rows.cpu()
    got_fused = fused_attention(vit_half, x, compute_dtype=dtype, device=dev).cpu()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)
    torch.testing.assert_close(got_fused, ref_fused, atol=tol, rtol=0)
    # float32 logits from half-precision q/k also work, and are at least as close
    got32 = streaming_rollout(vit_half, x, device=dev).rows.cpu()
    torch.testing.assert_close(got32, ref, atol=tol, rtol=0)
