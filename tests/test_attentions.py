"""`Attentions`: token bookkeeping with prefix tokens and non-square grids, selections, I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitscope.attentions import Attentions


def make(prefix=("cls", "register", "register"), grid=(2, 3), layers=(0, 1, 2), heads=(0, 1), queries=None):
    torch.manual_seed(0)
    N = len(prefix) + grid[0] * grid[1]
    Q = N if queries is None else len(queries)
    w = torch.randn(len(layers), 2, 1 if heads == "mean" else len(heads), Q, N).softmax(-1)
    return Attentions(w, prefix, grid, (4, 4), (grid[0] * 4, grid[1] * 4), layers, heads, queries, 3, 2)


def test_token_indices_follow_prefix_then_row_major_patches() -> None:
    a = make()
    assert a.num_prefix_tokens == 3 and a.num_tokens == 9
    assert a.cls_index == 0 and a.register_indices == (1, 2) and a.dist_index is None
    # patch (row 1, col 0) of a 2x3 grid is the 4th patch -> token 3 + 3
    assert a.patch_index(1, 0) == 6
    assert a.token_index((0, 2)) == 5
    assert a.token_index("register:1") == 2
    assert a.token_index(-1) == 8
    with pytest.raises(IndexError, match="outside the 2x3 grid"):
        a.patch_index(2, 0)
    with pytest.raises(ValueError, match="no dist token"):
        a.token_index("dist")


def test_to_grid_drops_prefix_and_keeps_height_before_width() -> None:
    a = make()
    row = torch.arange(9.0)
    g = a.to_grid(row)
    assert g.shape == (2, 3)
    # tokens 3..8 are the patches in row-major order
    assert g.tolist() == [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]


def test_no_cls_model_has_no_cls_index() -> None:
    a = make(prefix=(), grid=(3, 2))
    assert a.cls_index is None and a.num_tokens == 6
    with pytest.raises(ValueError, match="no cls token"):
        a.token_index("cls")


def test_select_and_layer_position_accept_negative_indices() -> None:
    a = make()
    last = a.select([-1])
    assert last.layers == (2,)
    torch.testing.assert_close(last.weights[0], a.weights[2])
    with pytest.raises(IndexError, match="not captured"):
        last.layer_position(0)


def test_fused_heads_match_hand_reductions() -> None:
    a = make()
    w = a.weights
    torch.testing.assert_close(a.fused("mean"), (w[:, :, 0] + w[:, :, 1]) / 2)
    torch.testing.assert_close(a.fused("max"), torch.maximum(w[:, :, 0], w[:, :, 1]))
    torch.testing.assert_close(a.fused("min"), torch.minimum(w[:, :, 0], w[:, :, 1]))
    with pytest.raises(ValueError, match="already averaged"):
        make(heads="mean").fused("max")


def test_query_position_and_require_full() -> None:
    a = make(queries=(0, 5))
    assert a.query_position("cls") == 0 and a.query_position((0, 2)) == 1
    with pytest.raises(ValueError, match="was not captured"):
        a.query_position(4)
    with pytest.raises(ValueError, match="rollout needs every query row"):
        a.require_full("rollout")
    make().require_full("rollout")


def test_shape_mismatch_is_rejected() -> None:
    w = torch.rand(1, 1, 1, 5, 5)
    with pytest.raises(ValueError, match="key dim is 5"):
        Attentions(w, ("cls",), (2, 3), 4, (8, 12), (0,), "mean", None, 1, 1)
    with pytest.raises(ValueError, match="unknown token kind"):
        Attentions(w, ("bos",), (2, 2), 4, (8, 8), (0,), "mean", None, 1, 1)


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    a = make(queries=(0, 4))
    a.meta["model"] = "tiny"
    path = a.save(tmp_path / "sub" / "a.npz")
    b = Attentions.load(path)
    assert torch.equal(a.weights, b.weights)
    for f in ("prefix", "grid", "patch_size", "image_size", "layers", "heads", "queries", "num_layers", "num_heads"):
        assert getattr(a, f) == getattr(b, f), f
    assert b.meta == {"model": "tiny"}
    assert not list((tmp_path / "sub").glob("*.part"))
