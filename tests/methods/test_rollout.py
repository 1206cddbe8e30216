import numpy as np
import pytest
import torch

from tests.methods.helpers import PREFIX_REG, attentions_from, random_attentions
from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.methods import rollout, rollout_matrix


def _identity_attn(prefix=PREFIX_REG, grid=(3, 5), layers=3) -> Attentions:
    N = len(prefix) + grid[0] * grid[1]
    w = torch.eye(N).expand(layers, 2, 4, N, N).clone()
    return attentions_from(w, prefix, grid)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", [0.0, 0.5, 0.9])
def test_rollout_of_identity_is_identity(fusion, residual):
    a = _identity_attn()
    r = rollout_matrix(a, head_fusion=fusion, residual=residual)
    torch.testing.assert_close(r, torch.eye(a.num_tokens, dtype=torch.float64).expand(2, -1, -1))
    assert float(rollout(a, head_fusion=fusion).abs().max()) == 0.0  # [CLS] row holds nothing on patches


def test_hand_worked_two_layers():
    a1 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a = attentions_from(torch.stack([a1, a2])[:, None, None], ("cls",), (1, 2))
    # Â1 = [[.75, .25, 0], I...], Â2 = [[.5, 0, .5], ...]; R[0] = .5 * [.75, .25, 0] + .5 * [0, 0, 1]
    torch.testing.assert_close(rollout(a), torch.tensor([[[0.125, 0.5]]]))
    torch.testing.assert_close(rollout_matrix(a)[0, 0], torch.tensor([0.375, 0.125, 0.5], dtype=torch.float64))
    # one layer only (start_layer=1): the map is Â2's [CLS] row over patches
    torch.testing.assert_close(rollout(a, start_layer=1), torch.tensor([[[0.0, 0.5]]]))
    torch.testing.assert_close(rollout(a, start_layer=-1), torch.tensor([[[0.0, 0.5]]]))


def test_rows_sum_to_one_with_mean_fusion():
    a = random_attentions(seed=7)
    r = rollout_matrix(a)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, a.num_tokens, dtype=torch.float64))


def _reference(a: Attentions, fusion: str, residual: float, discard: float, start: int, query_rows) -> np.ndarray:
    """Straightforward loops: fuse, discard (never the [CLS] column), residual, row-normalise, multiply."""
    w = a.weights.double().numpy()
    L, B, H, N, _ = w.shape
    cls = a.cls_index
    out = []
    for b in range(B):
        R = np.eye(N)
        for layer in range(start, L):
            F = np.zeros((N, N))
            for i in range(N):
                for j in range(N):
                    vals = [w[layer, b, h, i, j] for h in range(H)]
                    F[i, j] = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](vals)
            cand = sorted((F[i, j], i, j) for i in range(N) for j in range(N) if j != cls)
            for _, i, j in cand[: int(len(cand) * discard)]:
                F[i, j] = 0.0
            Ahat = (1 - residual) * F + residual * np.eye(N)
            for i in range(N):
                Ahat[i] /= Ahat[i].sum()
            R = Ahat @ R
        row = np.mean([R[q] for q in query_rows], axis=0)
        out.append(row[len(a.prefix):].reshape(a.grid))
    return np.stack(out)


@pytest.mark.parametrize(
    ("fusion", "residual", "discard", "start"),
    [("mean", 0.5, 0.0, 0), ("max", 0.5, 0.9, 0), ("min", 0.3, 0.5, 1), ("mean", 0.7, 0.2, 2)],
)
def test_matches_loop_reference_with_registers_on_3x5(fusion, residual, discard, start):
    a = random_attentions(grid=(3, 5), seed=11)
    got = rollout(a, head_fusion=fusion, residual=residual, discard_ratio=discard, start_layer=start)
    ref = _reference(a, fusion, residual, discard, start, [0])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-7)


def test_no_cls_model_uses_mean_of_patch_rows_and_discards_anything():
    a = random_attentions(prefix=(), grid=(2, 3), seed=12)
    got = rollout(a, discard_ratio=0.3)
    ref = _reference(a, "mean", 0.5, 0.3, 0, list(range(6)))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-7)


def test_presets():
    a = random_attentions(seed=13)
    torch.testing.assert_close(rollout(a, preset="vit-explain"), rollout(a, head_fusion="max", discard_ratio=0.9))
    torch.testing.assert_close(rollout(a, preset="abnar"), rollout(a))
    # Chefer's baseline: (A + I) with rows normalised, heads averaged
    w = a.weights.double().mean(2)  # (L, B, N, N)
    eye = torch.eye(a.num_tokens, dtype=torch.float64)
    R = eye.expand(2, -1, -1)
    for layer in range(3):
        m = w[layer] + eye
        R = (m / m.sum(-1, keepdim=True)) @ R
    torch.testing.assert_close(rollout(a, preset="chefer"), R[:, 0, 5:].reshape(2, 3, 5).float())
    # explicit arguments override the preset
    torch.testing.assert_close(rollout(a, preset="vit-explain", discard_ratio=0.0), rollout(a, head_fusion="max"))
    with pytest.raises(VitscopeError, match="preset"):
        rollout(a, preset="nope")


def test_needs_full_consecutive_layers():
    a = random_attentions(seed=14)
    partial = Attentions(
        weights=a.weights[:, :, :, :1], prefix=a.prefix, grid=a.grid, patch_size=a.patch_size,
        image_size=a.image_size, layers=a.layers, heads=a.heads, queries=(0,), num_layers=3, num_heads=4,
    )
    with pytest.raises(VitscopeError, match="every query row"):
        rollout(partial)
    with pytest.raises(VitscopeError, match="consecutive"):
        rollout(a.select([0, 2]))
    with pytest.raises(VitscopeError, match="discard_ratio"):
        rollout(a, discard_ratio=1.0)
