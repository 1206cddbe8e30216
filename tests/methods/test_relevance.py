import numpy as np
import torch

from tests.conftest import make_tiny_vit
from tests.methods.gradref import assert_unchanged, reference_grads, snapshot
from vitscope.methods import chefer_relevance
from vitscope.methods.relevance import relevance_update


def test_update_rule_hand_worked():
    # one head, 2 tokens: A = [[.5, .5], [.2, .8]], grad = [[1, -1], [2, 1]] -> (grad*A)^+ = [[.5, 0], [.4, .8]]
    a = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]]]], dtype=torch.float64)
    g = torch.tensor([[[[1.0, -1.0], [2.0, 1.0]]]], dtype=torch.float64)
    r = relevance_update(torch.eye(2, dtype=torch.float64)[None], a, g)
    # R = I + Ā I = [[1.5, 0], [0.4, 1.8]]
    torch.testing.assert_close(r, torch.tensor([[[1.5, 0.0], [0.4, 1.8]]], dtype=torch.float64))
    # the ReLU is per head, before the head mean: heads (+1, -1) on one entry give 0.5, not 0
    a2 = torch.full((1, 2, 1, 1), 1.0, dtype=torch.float64)
    g2 = torch.tensor([1.0, -1.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    torch.testing.assert_close(relevance_update(torch.ones(1, 1, 1, dtype=torch.float64), a2, g2),
                               torch.tensor([[[1.5]]], dtype=torch.float64))


def test_matches_loop_reference_with_registers_non_square():
    model = make_tiny_vit(num_registers=4, image_size=(24, 40), seed=8)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    before = snapshot(model)
    got = chefer_relevance(model, x, target=4)
    attns, grads = reference_grads(model, x, torch.tensor([4, 4]))
    N = attns[0].shape[-1]
    for b in range(2):
        R = np.eye(N)
        for a, g in zip(attns, grads, strict=True):
            a, g = a[b].double().numpy(), g[b].double().numpy()
            bar = np.mean([np.maximum(g[h] * a[h], 0.0) for h in range(a.shape[0])], axis=0)
            R = R + bar @ R
        np.testing.assert_allclose(got[b].flatten().numpy(), R[0, 5:], rtol=2e-3, atol=1e-6)
    assert_unchanged(model, before)


def test_start_layer_skips_early_layers():
    model = make_tiny_vit(seed=9)
    x = torch.randn(1, 3, 32, 32)
    attns, grads = reference_grads(model, x, model(x).argmax(-1))
    a, g = attns[1][0].double(), grads[1][0].double()
    bar = (g * a).clamp_min(0).mean(0)  # R = I + Ā (one layer)
    ref = (torch.eye(a.shape[-1], dtype=torch.float64) + bar)[0, 1:].reshape(4, 4)
    torch.testing.assert_close(chefer_relevance(model, x, start_layer=-1)[0].double(), ref, rtol=2e-3, atol=1e-6)
