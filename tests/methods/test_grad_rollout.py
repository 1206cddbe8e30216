import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_vit
from tests.methods.gradref import assert_unchanged, reference_grads, snapshot
from vitscope.errors import VitscopeError
from vitscope.methods import grad_rollout


def _loop_reference(attns, grads, discard, residual, relu, n_prefix):
    """vit-explain's recipe written out with loops (discard never in the [CLS] column)."""
    B, H, N, _ = attns[0].shape
    out = []
    for b in range(B):
        R = np.eye(N)
        for a, g in zip(attns, grads, strict=True):
            a, g = a[b].double().numpy(), g[b].double().numpy()
            F = np.zeros((N, N))
            for i in range(N):
                for j in range(N):
                    if relu == "fused":
                        F[i, j] = max(0.0, np.mean([a[h, i, j] * g[h, i, j] for h in range(H)]))
                    else:
                        F[i, j] = np.mean([a[h, i, j] * max(0.0, g[h, i, j]) for h in range(H)])
            cand = sorted((F[i, j], i, j) for i in range(N) for j in range(1, N))
            for _, i, j in cand[: int(len(cand) * discard)]:
                F[i, j] = 0.0
            M = (1 - residual) * F + residual * np.eye(N)
            M /= M.sum(1, keepdims=True)
            R = M @ R
        out.append(R[0, n_prefix:])
    return np.stack(out)


@pytest.mark.parametrize(("discard", "relu"), [(0.9, "fused"), (0.0, "grad"), (0.5, "fused")])
def test_matches_reference_with_registers_non_square(discard, relu):
    model = make_tiny_vit(num_registers=4, image_size=(24, 40), seed=5)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    before = snapshot(model)
    got = grad_rollout(model, x, target=[0, 3], discard_ratio=discard, relu=relu)
    assert got.shape == (2, 3, 5)
    attns, grads = reference_grads(model, x, torch.tensor([0, 3]))
    ref = _loop_reference(attns, grads, discard, 0.5, relu, 5)
    np.testing.assert_allclose(got.reshape(2, -1).numpy(), ref, rtol=2e-3, atol=1e-6)
    assert_unchanged(model, before)


def test_default_target_is_the_prediction():
    model = make_tiny_vit(seed=6)
    x = torch.randn(2, 3, 32, 32)
    pred = model(x).argmax(-1)
    torch.testing.assert_close(grad_rollout(model, x), grad_rollout(model, x, target=pred))


def test_errors_leave_the_model_clean():
    model = make_tiny_vit(seed=7)
    before = snapshot(model)
    with pytest.raises(VitscopeError, match="relu"):
        grad_rollout(model, torch.randn(1, 3, 32, 32), relu="both")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="boom"):

        def bad(out):
            raise RuntimeError("boom")

        grad_rollout(model, torch.randn(1, 3, 32, 32), target=bad)
    assert_unchanged(model, before)
