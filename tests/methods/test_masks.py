import itertools

import pytest
import torch

from tests.methods.helpers import random_attentions
from vitscope.errors import VitscopeError
from vitscope.methods import cls_map, dino_mask
from vitscope.methods.masks import mass_mask


def test_hand_worked_masks():
    m = torch.tensor([[[0.5, 0.3], [0.15, 0.05]]])  # float32: sums to 1 only up to rounding
    assert mass_mask(m, 0.6).tolist() == [[[True, True], [False, False]]]
    assert mass_mask(m, 0.5).tolist() == [[[True, False], [False, False]]]
    assert mass_mask(m, 0.8).tolist() == [[[True, True], [False, False]]]  # 0.5 + 0.3 reaches 0.8 exactly
    assert mass_mask(m, 0.81).tolist() == [[[True, True], [True, False]]]
    assert mass_mask(m, 1.0).all()
    # unnormalised maps are normalised first: same masks for 10x the values
    assert torch.equal(mass_mask(m * 10, 0.6), mass_mask(m, 0.6))


def _brute_force_minimal(values: list[float], tau: float) -> int:
    """Size of the smallest subset holding >= tau of the mass (by trying all subsets)."""
    total = sum(values)
    for k in range(len(values) + 1):
        for subset in itertools.combinations(values, k):
            if sum(subset) >= tau * total - 1e-6:
                return k
    return len(values)


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.9])
def test_mask_holds_tau_and_is_minimal(tau):
    a = random_attentions(grid=(3, 5), seed=5)
    masks = dino_mask(a, tau)  # (B, H, 3, 5)
    maps = cls_map(a, head="all", renormalize=True).double()
    assert masks.shape == (2, 4, 3, 5)
    for b in range(2):
        for h in range(4):
            mp, mk = maps[b, h], masks[b, h]
            assert float(mp[mk].sum()) >= tau - 1e-6
            assert int(mk.sum()) == _brute_force_minimal(mp.flatten().tolist(), tau)
            # the kept patches are the largest ones
            assert float(mp[mk].min()) >= float(mp[~mk].max()) if (~mk).any() else True


def test_dino_normalises_over_patches_only():
    a = random_attentions(seed=6)
    raw = cls_map(a, head="all")  # not renormalised: prefix mass missing
    assert torch.equal(dino_mask(a, 0.6), mass_mask(raw, 0.6))


def test_bad_inputs():
    with pytest.raises(VitscopeError, match="tau"):
        mass_mask(torch.ones(1, 2, 2), 1.5)
    with pytest.raises(VitscopeError, match="negative"):
        mass_mask(-torch.ones(1, 2, 2), 0.5)
