import math

import numpy as np
import pytest
import torch

from tests.methods.helpers import attentions_from
from vitscope.errors import VitscopeError
from vitscope.methods import token_norms
from vitscope.methods.artifacts import GaussianMixture1D, fit_gmm_1d, gmm_threshold


def _with_norms(norms: torch.Tensor, prefix, grid):
    """Attentions whose only content that matters is token_norms (L, B, N)."""
    L, B, N = norms.shape
    a = attentions_from(torch.full((L, B, 1, N, N), 1.0 / N), prefix, grid)
    a.token_norms = norms
    return a


def test_fixed_threshold_hand_example():
    norms = torch.tensor([[[100.0, 1.0, 200.0, 3.0]]])  # [CLS] is large but is not a patch
    rep = token_norms(_with_norms(norms, ("cls",), (1, 3)), threshold=50.0)
    assert rep.outliers.tolist() == [[[[False, True, False]]]]
    assert rep.share.tolist() == pytest.approx([1 / 3])
    assert rep.threshold.tolist() == [50.0]
    assert rep.mixtures is None


def test_gmm_recovers_two_well_separated_populations():
    g = torch.Generator().manual_seed(0)
    low = 10 + torch.randn(400, generator=g, dtype=torch.float64)
    high = 60 + 3 * torch.randn(16, generator=g, dtype=torch.float64)
    gmm = fit_gmm_1d(torch.cat([low, high])[torch.randperm(416, generator=g)])
    # with responsibilities ~0/1 the maximum-likelihood parameters are each cluster's own mean and std (ddof 0)
    np.testing.assert_allclose(gmm.means.numpy(), [low.mean(), high.mean()], rtol=1e-6)
    np.testing.assert_allclose(gmm.stds.numpy(), [low.std(unbiased=False), high.std(unbiased=False)], rtol=1e-5)
    np.testing.assert_allclose(gmm.weights.numpy(), [400 / 416, 16 / 416], rtol=1e-6)


def test_token_norms_flags_the_high_population_per_layer():
    g = torch.Generator().manual_seed(1)
    rows, cols, B = 4, 5, 8
    layer0 = 10 + torch.randn(B, rows * cols, generator=g)  # unimodal: no artifacts
    layer1 = 10 + torch.randn(B, rows * cols, generator=g)
    hot = torch.zeros(B, rows * cols, dtype=torch.bool)
    hot[torch.arange(B), torch.arange(B) * 2] = True  # one artifact per image
    layer1[hot] = 80 + torch.randn(int(hot.sum()), generator=g)
    norms = torch.stack([layer0, layer1])  # (L, B, P)
    prefix_norms = torch.full((2, B, 2), 500.0)  # [CLS] + register, excluded from the fit
    a = _with_norms(torch.cat([prefix_norms, norms], dim=-1), ("cls", "register"), (rows, cols))
    rep = token_norms(a)
    assert math.isinf(float(rep.threshold[0])) and not rep.outliers[0].any()
    assert torch.equal(rep.outliers[1], hot.reshape(B, rows, cols))
    assert rep.share.tolist() == pytest.approx([0.0, B / (B * rows * cols)])
    assert 15 < float(rep.threshold[1]) < 75


def test_threshold_closed_form_for_equal_stds():
    gmm = GaussianMixture1D(torch.tensor([0.8, 0.2], dtype=torch.float64), torch.tensor([0.0, 10.0], dtype=torch.float64),
                            torch.tensor([2.0, 2.0], dtype=torch.float64))
    # 0.8 N(x; 0, 2) = 0.2 N(x; 10, 2)  <=>  x = 5 + 4 ln(4) / 10
    assert gmm_threshold(gmm, 100.0) == pytest.approx(5 + 4 * math.log(4) / 10, abs=1e-9)
    assert gmm.separation == pytest.approx(math.sqrt(2) * 10 / math.sqrt(8))
    assert math.isinf(gmm_threshold(gmm, 5.0))  # the high component never wins below 5


def test_needs_captured_norms():
    a = attentions_from(torch.full((1, 1, 1, 2, 2), 0.5), ("cls",), (1, 1))
    with pytest.raises(VitscopeError, match="token_norms=True"):
        token_norms(a)


def test_with_a_real_capture(tiny_vit_reg):
    import vitscope

    a = vitscope.capture(tiny_vit_reg, torch.randn(2, 3, 32, 32), token_norms=True)
    rep = token_norms(a, threshold=0.0)
    assert rep.outliers.shape == (2, 2, 4, 4) and bool(rep.outliers.all())
    torch.testing.assert_close(rep.patch_norms, a.token_norms[:, :, 5:].reshape(2, 2, 4, 4))


def test_outlier_threshold_is_tukeys_far_fence_by_hand():
    from vitscope.methods.artifacts import outlier_threshold

    x = np.arange(101, dtype=np.float64)  # q25 = 25, q75 = 75, IQR = 50
    assert outlier_threshold(x) == 75 + 3 * 50
    assert outlier_threshold(x, k=1.5) == 75 + 1.5 * 50
