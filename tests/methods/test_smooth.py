"""Gaussian smoothing on the patch grid, against a hand computation and a plain loop."""

from __future__ import annotations

import math

import pytest
import torch

from vitscope.errors import VitscopeError
from vitscope.methods import smooth


def test_sigma_zero_is_identity() -> None:
    m = torch.rand(2, 3, 5)
    assert smooth(m, 0.0) is m


def test_delta_spreads_as_the_normalised_gaussian() -> None:
    # one hot patch in the middle of a 5x5 grid, sigma 0.5 -> radius 1, weights exp(-2) : 1 : exp(-2)
    m = torch.zeros(1, 5, 5, dtype=torch.float64)
    m[0, 2, 2] = 1.0
    e = math.exp(-2.0)
    w = [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)]
    s = smooth(m, 0.5)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            assert s[0, 2 + dr, 2 + dc].item() == pytest.approx(w[dr + 1] * w[dc + 1], abs=1e-12)
    assert s.sum().item() == pytest.approx(1.0)  # mass kept away from the border


def test_matches_a_loop_with_replicated_border_on_a_non_square_grid() -> None:
    torch.manual_seed(0)
    m = torch.rand(2, 3, 5, dtype=torch.float64)
    sigma = 1.0
    r = 2
    g = [math.exp(-(i * i) / (2 * sigma**2)) for i in range(-r, r + 1)]
    g = [x / sum(g) for x in g]
    ref = torch.zeros_like(m)
    for b in range(2):
        for y in range(3):
            for x in range(5):
                acc = 0.0
                for i in range(-r, r + 1):
                    for j in range(-r, r + 1):
                        yy, xx = min(max(y + i, 0), 2), min(max(x + j, 0), 4)
                        acc += g[i + r] * g[j + r] * m[b, yy, xx].item()
                ref[b, y, x] = acc
    torch.testing.assert_close(smooth(m, sigma), ref, rtol=0, atol=1e-12)


def test_peak_moves_from_a_lone_edge_patch_to_the_mass() -> None:
    m = torch.zeros(1, 6, 6)
    m[0, 0, 5] = 1.0  # single strongest patch in a corner
    m[0, 2:5, 1:4] = 0.8  # a blob holding most of the mass
    raw = divmod(int(m.flatten().argmax()), 6)
    sm = divmod(int(smooth(m, 1.0).flatten().argmax()), 6)
    assert raw == (0, 5) and sm == (3, 2)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(VitscopeError, match=r"^sigma:"):
        smooth(torch.rand(1, 2, 2), -1.0)
    with pytest.raises(VitscopeError, match=r"^maps:"):
        smooth(torch.rand(2, 2), 1.0)
