import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_vit
from vitscope.errors import VitscopeError
from vitscope.methods import mask_jaccard, perturbation_auc, pointing_game


def _maps_and_gt():
    maps = torch.tensor([[[[0.7, 0.1], [0.1, 0.1]], [[0.1, 0.1], [0.4, 0.4]]]])  # (1, 2 heads, 2, 2)
    gt = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    gt[0, 0, 2:, :] = True  # object 0: bottom half
    gt[0, 1, :2, :2] = True  # object 1: top-left quadrant
    gt[0, 2, :, 0] = True  # object 2: left column
    return maps, gt


def test_mask_jaccard_hand_worked():
    maps, gt = _maps_and_gt()
    # tau 0.6 masks: head 0 keeps (0,0); head 1 keeps (1,0) and (1,1)
    res = mask_jaccard(maps, gt)
    # object 2 vs head 0: 2 common pixels, union 4 + 4 - 2 = 6; vs head 1: 2 common, union 8 + 4 - 2 = 10
    expected = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1 / 3, 0.2]]], dtype=torch.float64)
    torch.testing.assert_close(res.per_head, expected)
    torch.testing.assert_close(res.best, torch.tensor([[1.0, 1.0, 1 / 3]], dtype=torch.float64))
    assert res.best_head.tolist() == [[1, 0, 0]]
    grid = mask_jaccard(maps, gt, at="grid")  # left column covers half of each left patch -> in the object
    torch.testing.assert_close(grid.per_head[0, 2], torch.tensor([0.5, 1 / 3], dtype=torch.float64))
    single = mask_jaccard(maps[:, 1], gt[:, 0])  # (B, rows, cols) maps and (B, H, W) masks
    torch.testing.assert_close(single.best, torch.tensor([[1.0]], dtype=torch.float64))


def test_pointing_game_hand_worked():
    maps = torch.tensor([[[0.1, 0.2], [0.9, 0.3]]])  # argmax (1, 0): point (3, 1) on a 4x4 image
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, 3, 1] = True
    assert pointing_game(maps, gt).tolist() == [True]
    far = torch.zeros(1, 4, 4, dtype=torch.bool)
    far[0, 0, 3] = True  # centre (0.5, 3.5): sqrt(2.5^2 + 2.5^2) = 3.54 px away
    assert pointing_game(maps, far).tolist() == [False]
    assert pointing_game(maps, far, tolerance=3.0).tolist() == [False]
    assert pointing_game(maps, far, tolerance=3.6).tolist() == [True]
    with pytest.raises(VitscopeError, match="masks"):
        pointing_game(maps, torch.zeros(2, 4, 4, dtype=torch.bool))


def _reference_curve(model, x, m, cls, steps, mode, baseline=0.0):
    B = x.shape[0]
    rows, cols = m.shape[-2:]
    P, p = rows * cols, 8
    out = np.zeros((B, steps + 1))
    for b in range(B):
        order = sorted(range(P), key=lambda i: (-float(m[b].flatten()[i]), i))
        for s in range(steps + 1):
            k = round(s / steps * P)
            img = x[b].clone() if mode == "deletion" else torch.full_like(x[b], baseline)
            for idx in order[:k]:
                r, c = divmod(idx, cols)
                src = torch.full_like(x[b], baseline) if mode == "deletion" else x[b]
                img[:, r * p : (r + 1) * p, c * p : (c + 1) * p] = src[:, r * p : (r + 1) * p, c * p : (c + 1) * p]
            with torch.no_grad():
                out[b, s] = float(model(img[None]).double().softmax(-1)[0, cls[b]])
    return out


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_perturbation_curves_match_loop_reference(mode):
    model = make_tiny_vit(image_size=(24, 40), seed=12)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(5))
    m = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(6))
    res = perturbation_auc(model, x, m, mode=mode, steps=5, batch_size=5)
    pred = model(x).argmax(-1)
    assert res.target is not None and res.target.tolist() == pred.tolist()
    ref = _reference_curve(model, x, m, pred.tolist(), 5, mode)
    np.testing.assert_allclose(res.scores.numpy(), ref, rtol=1e-5, atol=1e-7)
    fractions = np.array([round(s / 5 * 15) / 15 for s in range(6)])
    np.testing.assert_allclose(res.fractions.numpy(), fractions)
    areas = [sum((fractions[i + 1] - fractions[i]) * (ref[b, i] + ref[b, i + 1]) / 2 for i in range(5)) for b in range(2)]
    np.testing.assert_allclose(res.auc.numpy(), areas, rtol=1e-5)


def test_perturbation_callable_target_and_errors():
    model = make_tiny_vit(seed=13)
    x = torch.randn(1, 3, 32, 32)
    m = torch.rand(1, 4, 4)
    res = perturbation_auc(model, x, m, target=lambda out: out[:, 0], steps=2)
    with torch.no_grad():
        assert float(res.scores[0, 0]) == pytest.approx(float(model(x)[0, 0]), rel=1e-5)
        assert float(res.scores[0, 2]) == pytest.approx(float(model(torch.zeros_like(x))[0, 0]), rel=1e-5)
    assert res.target is None
    with pytest.raises(VitscopeError, match="maps"):
        perturbation_auc(model, x, torch.rand(1, 3, 4))
    with pytest.raises(VitscopeError, match="mode"):
        perturbation_auc(model, x, m, mode="both")  # type: ignore[arg-type]
