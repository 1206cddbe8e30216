"""Packing for the viewer: quantisation bounds, rollout rows, the size budget, and the ViT-S/16 page size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.viewer.pack import (
    _bytes_per,
    decode_array,
    encode_array,
    pack,
    quantize_rows,
    rollout_all_rows,
)


def test_quantize_rows_error_is_at_most_half_a_step():
    x = np.random.default_rng(0).dirichlet(np.ones(50), size=(3, 7)).astype(np.float32)  # rows sum to 1
    x[0, 0] = 0.0  # an all-zero row
    q, scale = quantize_rows(x)
    assert q.dtype == np.uint8 and scale.shape == (3, 7)
    back = decode_array(encode_array(x, "uint8"))
    assert np.all(np.abs(back - x) <= scale[..., None] / 510 + 1e-7)
    np.testing.assert_array_equal(back[0, 0], 0.0)
    assert back.max(axis=-1)[1:] == pytest.approx(x.max(axis=-1)[1:])  # each row's maximum is exact


def test_float16_encoding_roundtrip():
    x = np.random.default_rng(1).random((2, 5, 9)).astype(np.float32)
    np.testing.assert_allclose(decode_array(encode_array(x, "float16")), x, rtol=1e-3)
    with pytest.raises(VitscopeError, match="dtype"):
        encode_array(x, "int4")  # type: ignore[arg-type]


def _attn(weights: torch.Tensor, prefix=("cls",), grid=(1, 2), queries=None) -> Attentions:
    L, _B, H, _Q, _N = weights.shape
    return Attentions(weights=weights, prefix=prefix, grid=grid, patch_size=(4, 4),
                      image_size=(4 * grid[0], 4 * grid[1]), layers=tuple(range(L)), heads=tuple(range(H)),
                      queries=queries, num_layers=L, num_heads=H)


def test_rollout_all_rows_hand_example():
    # 3 tokens. Layer 0: both heads are the permutation P (0->1, 1->2, 2->0); layer 1: uniform 1/3.
    P = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])
    U = torch.full((3, 3), 1 / 3)
    w = torch.stack([torch.stack([P, P]), torch.stack([U, U])])[:, None]  # (layer, batch, head, q, k)
    R = rollout_all_rows(_attn(w), residual=0.5)
    # R_0 = 0.5 I + 0.5 P; R_1 = (0.5 I + J/6) R_0 = 0.25 I + 0.25 P + J/6 (columns of R_0 sum to 1)
    np.testing.assert_allclose(R[0].numpy(), [[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]], atol=1e-7)
    third = 1 / 6
    np.testing.assert_allclose(
        R[1].numpy(),
        [[0.25 + third, 0.25 + third, third], [third, 0.25 + third, 0.25 + third], [0.25 + third, third, 0.25 + third]],
        atol=1e-7,
    )
    with pytest.raises(VitscopeError, match="residual"):
        rollout_all_rows(_attn(w), residual=1.5)


def test_rollout_last_layer_matches_methods_rollout_matrix(small_page):
    from vitscope.methods import rollout_matrix

    attn = small_page.attn
    ours = rollout_all_rows(attn)[-1]
    ref = rollout_matrix(attn, head_fusion="mean", residual=0.5, discard_ratio=0.0)[0]
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-6)


def test_pack_stores_every_row_within_the_quantisation_bound(small_page):
    p, attn = small_page.viewer.payload, small_page.attn
    w = attn.weights[:, 0].numpy()  # (layer, head, query, key)
    got = decode_array(p["attention"])
    assert got.shape == w.shape == (2, 4, 27, 27)
    assert np.all(np.abs(got - w) <= w.max(axis=-1, keepdims=True) / 510 + 1e-7)
    assert p["layers"] == [0, 1] and p["heads"] == [0, 1, 2, 3] and p["queries"] == list(range(27))
    assert p["prefix"] == ["cls", "register", "register"] and p["grid"] == [4, 6]
    roll = decode_array(p["rollout"])
    ref = rollout_all_rows(attn).numpy()
    assert np.all(np.abs(roll - ref) <= ref.max(axis=-1, keepdims=True) / 510 + 1e-7)
    assert p["notes"] == []
    assert p["image"]["src"].startswith("data:image/jpeg;base64,")
    assert (p["image"]["height"], p["image"]["width"]) == (60, 90)  # the photo keeps its aspect


def test_budget_degrades_layers_then_heads_then_rows(small_page):
    attn = small_page.attn  # 2 layers x 4 heads, N = 3 + 4 * 6
    N, per = 27, _bytes_per("uint8")
    full = 2 * (4 + 1) * N * N * per
    p = pack(attn, np.zeros((8, 12, 3)), budget_bytes=int(full) + 1)
    assert p["layers"] == [0, 1] and p["notes"] == []
    p = pack(attn, np.zeros((8, 12, 3)), budget_bytes=int(full) - 1)
    assert p["layers"] == [1] and p["heads"] == [0, 1, 2, 3]  # the last layer is kept
    assert "stored 1 of 2" in p["notes"][0]
    p = pack(attn, np.zeros((8, 12, 3)), budget_bytes=int((4 + 1) * N * N * per) - 1)
    assert p["heads"] == ["mean"] and p["layers"] == [0, 1]
    mean = decode_array(p["attention"])[:, 0]
    np.testing.assert_allclose(mean, attn.weights[:, 0].mean(dim=1).numpy(), atol=1 / 255)
    p = pack(attn, np.zeros((8, 12, 3)), budget_bytes=int(2 * N * N * per) - 1)
    assert p["queries"] == [0, 1, 2]  # prefix rows only: [CLS] and the registers
    assert decode_array(p["attention"]).shape[2] == 3
    assert any("prefix-token queries" in n for n in p["notes"])
    with pytest.raises(VitscopeError, match="batch"):
        pack(attn, np.zeros((8, 12, 3)), batch=3)


def test_pack_without_every_query_row_has_no_rollout(small_page):
    attn = small_page.attn
    cls_only = Attentions(**{**attn.__dict__, "weights": attn.weights[:, :, :, :1], "queries": (0,)})
    p = pack(cls_only, np.zeros((8, 12, 3)))
    assert p["rollout"] is None and p["queries"] == [0]
    assert any("rollout needs every query row" in n for n in p["notes"])


def test_vits16_page_with_every_layer_and_head_stays_under_10_mb(vits_page):
    p = vits_page.viewer.payload
    assert p["layers"] == list(range(12)) and p["heads"] == list(range(6)) and len(p["queries"]) == 197
    assert p["rollout"] is not None and p["notes"] == []
    size = vits_page.path.stat().st_size
    print(f"\nViT-S/16 224px viewer page, all 12 layers x 6 heads x 197 x 197: {size / 1e6:.2f} MB")
    assert size < 10e6



def test_pack_model_without_prefix_tokens(no_cls_attn):
    attn = no_cls_attn
    p = pack(attn, np.zeros((8, 12, 3)))
    assert p["prefix"] == [] and p["queries"] == list(range(6))
    np.testing.assert_allclose(decode_array(p["rollout"]), rollout_all_rows(attn).numpy(), atol=1 / 255)
