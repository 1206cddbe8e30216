import pytest
import torch

from tests.methods.helpers import attentions_from, random_attentions
from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.methods import cls_map, upsample


def _hand() -> Attentions:
    # 1 layer, [CLS] + a 1x2 grid, 2 heads; only the [CLS] rows matter below
    w = torch.tensor([
        [[0.5, 0.3, 0.2], [0.2, 0.4, 0.4], [0.1, 0.1, 0.8]],
        [[0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.6, 0.2, 0.2]],
    ])[None, None]  # (1, 1, 2, 3, 3)
    return attentions_from(w, ("cls",), (1, 2))


def test_hand_worked_fusions():
    a = _hand()
    torch.testing.assert_close(cls_map(a), torch.tensor([[[0.45, 0.25]]]))
    torch.testing.assert_close(cls_map(a, head="max"), torch.tensor([[[0.6, 0.3]]]))
    torch.testing.assert_close(cls_map(a, head="min"), torch.tensor([[[0.3, 0.2]]]))
    torch.testing.assert_close(cls_map(a, head=1), torch.tensor([[[0.6, 0.3]]]))
    torch.testing.assert_close(cls_map(a, head=-2), torch.tensor([[[0.3, 0.2]]]))
    torch.testing.assert_close(cls_map(a, renormalize=True), torch.tensor([[[0.45 / 0.7, 0.25 / 0.7]]]))
    # query = the patch at (0, 1), token 2: patch columns [0.1, 0.8] (head 0) and [0.2, 0.2] (head 1)
    torch.testing.assert_close(cls_map(a, query=(0, 1)), torch.tensor([[[0.15, 0.5]]]))
    all_heads = cls_map(a, head="all")
    torch.testing.assert_close(all_heads, torch.tensor([[[[0.3, 0.2]], [[0.6, 0.3]]]]))


def test_no_cls_model_defaults_to_mean_over_patch_rows():
    w = torch.tensor([[0.7, 0.3], [0.4, 0.6]])[None, None, None]  # SigLIP-like: no prefix, 1x2 grid
    a = attentions_from(w, (), (1, 2))
    torch.testing.assert_close(cls_map(a), torch.tensor([[[0.55, 0.45]]]))
    with pytest.raises(VitscopeError, match="query"):
        cls_map(a, query="cls")


def test_matches_loop_reference_with_registers_and_non_square_grid():
    a = random_attentions(grid=(3, 5), layers=2, batch=2, heads=4, seed=3)
    rows, cols = a.grid
    for query in ("cls", "register:2", (2, 4), "mean"):
        for fusion in ("mean", "max", "min"):
            got = cls_map(a, layer=-1, head=fusion, query=query, renormalize=True)
            ref = torch.zeros(2, rows, cols, dtype=torch.float64)
            if query == "mean":
                qs = list(range(5, 5 + rows * cols))
            else:
                qs = [{"cls": 0, "register:2": 3}.get(query, 5 + 2 * cols + 4)]  # type: ignore[call-overload]
            for b in range(2):
                for r in range(rows):
                    for c in range(cols):
                        acc = 0.0
                        for q in qs:
                            vals = [float(a.weights[1, b, h, q, 5 + r * cols + c]) for h in range(4)]
                            acc += {"mean": sum(vals) / 4, "max": max(vals), "min": min(vals)}[fusion]
                        ref[b, r, c] = acc / len(qs)
                ref[b] /= ref[b].sum()
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_without_renormalisation_the_map_sums_to_the_patch_share():
    a = random_attentions(seed=1)
    m = cls_map(a, layer=0)
    share = 1.0 - a.weights[0, :, :, 0, :5].sum(-1).mean(-1)  # mass not on prefix keys, head-mean
    torch.testing.assert_close(m.sum((-2, -1)), share, rtol=1e-5, atol=1e-6)


def test_upsampled_equals_upsample_of_grid_map():
    a = random_attentions(seed=2)
    m = cls_map(a, upsample_mode="nearest")
    assert m.shape == (2, 24, 40)
    torch.testing.assert_close(m, upsample(cls_map(a), a.image_size, "nearest"))


def test_partial_capture_and_errors():
    a = random_attentions(seed=4)
    only_cls = Attentions(
        weights=a.weights[:, :, :, :1], prefix=a.prefix, grid=a.grid, patch_size=a.patch_size,
        image_size=a.image_size, layers=a.layers, heads=a.heads, queries=(0,), num_layers=3, num_heads=4,
    )
    torch.testing.assert_close(cls_map(only_cls), cls_map(a))
    with pytest.raises(VitscopeError, match="query"):
        cls_map(only_cls, query=(0, 0))
    with pytest.raises(VitscopeError, match="layer"):
        cls_map(a, layer=7)
    fused = Attentions(
        weights=a.weights.mean(2, keepdim=True), prefix=a.prefix, grid=a.grid, patch_size=a.patch_size,
        image_size=a.image_size, layers=a.layers, heads="mean", queries=None, num_layers=3, num_heads=4,
    )
    with pytest.raises(VitscopeError, match="head"):
        cls_map(fused, head=0)
    with pytest.raises(VitscopeError, match="head_fusion"):
        cls_map(fused, head="max")
    torch.testing.assert_close(cls_map(fused), cls_map(a), rtol=1e-5, atol=1e-6)
