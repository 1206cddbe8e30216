import numpy as np
import pytest
import torch

from tests.methods.helpers import attentions_from, random_attentions
from vitscope.errors import VitscopeError
from vitscope.methods import attention_flow, rollout
from vitscope.methods.flow import max_flows

ATOL = 1e-5  # capacities are rounded to multiples of 2**-20


def _ahat(w: torch.Tensor, residual: float = 0.5) -> np.ndarray:
    """Residual-augmented, row-normalised mean-fused attention of one layer/image (H, N, N) -> (N, N)."""
    f = w.double().mean(0).numpy()
    m = (1 - residual) * f + residual * np.eye(f.shape[0])
    return m / m.sum(1, keepdims=True)


def test_one_layer_flow_is_the_cls_row():
    w = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])[None, None, None]
    a = attentions_from(w, ("cls",), (1, 2))
    # Â[cls] = 0.5 * [0.2, 0.5, 0.3] + 0.5 * [1, 0, 0] = [0.6, 0.25, 0.15]; one edge per patch
    torch.testing.assert_close(attention_flow(a), torch.tensor([[[0.25, 0.15]]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(attention_flow(a), rollout(a), atol=ATOL, rtol=0)


def test_two_layers_hand_worked():
    # tokens [cls, p1, p2]; with residual 0 the capacities are the attention itself
    a1 = torch.tensor([[0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    a2 = torch.tensor([[0.3, 0.3, 0.4], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4]])
    a = attentions_from(torch.stack([a1, a2])[:, None, None], ("cls",), (1, 2))
    # paths p -> i -> cls are edge-disjoint, so flow(p) = sum_i min(a1[i, p], a2[cls, i]):
    # p1: min(.6, .3) + min(.1, .3) + min(.4, .4) = 0.8;  p2: min(.2, .3) + min(.8, .3) + min(.1, .4) = 0.6
    got = attention_flow(a, residual=0.0)
    torch.testing.assert_close(got, torch.tensor([[[0.8, 0.6]]]), atol=ATOL, rtol=0)


def test_two_layers_random_closed_form_with_registers():
    a = random_attentions(grid=(3, 5), layers=2, seed=21)
    got = attention_flow(a)
    for b in range(2):
        f1, f2 = _ahat(a.weights[0, b]), _ahat(a.weights[1, b])
        ref = [sum(min(f1[i, p], f2[0, i]) for i in range(a.num_tokens)) for p in range(5, a.num_tokens)]
        np.testing.assert_allclose(got[b].flatten().numpy(), ref, atol=ATOL)


def _lp_max_flow(factors: list[np.ndarray], sink_row: np.ndarray, source: int) -> float:
    """Max flow by linear programming (scipy's HiGHS), an algorithm independent of the max-flow code."""
    from scipy.optimize import linprog

    N = sink_row.shape[0]
    depth = len(factors) + 1
    edges, caps = [], []
    for m, f in enumerate(factors):
        for i in range(N):
            for j in range(N):
                edges.append((m * N + j, (m + 1) * N + i))
                caps.append(f[i, j])
    sink = depth * N
    for j in range(N):
        edges.append(((depth - 1) * N + j, sink))
        caps.append(sink_row[j])
    n_nodes = sink + 1
    c = np.zeros(len(edges))
    for e, (_, v) in enumerate(edges):
        if v == sink:
            c[e] = -1.0  # maximise the flow into the sink
    A_eq, b_eq = [], []
    for node in range(n_nodes):
        if node in (source, sink):
            continue
        row = np.zeros(len(edges))
        for e, (u, v) in enumerate(edges):
            row[e] += (v == node) - (u == node)
        if row.any():
            A_eq.append(row)
            b_eq.append(0.0)
    # only the source may emit: edges leaving other depth-0 nodes carry nothing (they have no inflow anyway)
    res = linprog(c, A_eq=np.array(A_eq), b_eq=b_eq, bounds=list(zip([0] * len(caps), caps, strict=True)),
                  method="highs")
    assert res.status == 0
    return -res.fun


def test_three_layers_match_linear_programming():
    a = random_attentions(prefix=("cls", "register"), grid=(2, 2), layers=3, batch=1, seed=22)
    got = attention_flow(a)[0].flatten().numpy()
    fs = [_ahat(a.weights[layer, 0]) for layer in range(3)]
    ref = [_lp_max_flow(fs[:2], fs[2][0], p) for p in range(2, 6)]
    np.testing.assert_allclose(got, ref, atol=ATOL)
    assert (got <= 1 + ATOL).all()


def test_max_flows_simple_graph():
    # depth 0 -> depth 1 by identity capacities, sink row [0, 0.4, 1]: flow from token j is its sink capacity
    f = [np.eye(3)]
    np.testing.assert_allclose(max_flows(f, np.array([0.0, 0.4, 1.0]), [0, 1, 2]), [0.0, 0.4, 1.0], atol=ATOL)


def test_token_limit_and_approximation():
    a = random_attentions(grid=(3, 5), layers=2, seed=23)  # 20 tokens
    with pytest.raises(VitscopeError, match="approximate=True"):
        attention_flow(a, max_tokens=12)
    approx = attention_flow(a, max_tokens=12, approximate=True, residual=0.0)
    assert approx.shape == (2, 3, 5)
    # reference: pool by hand into 2x2 cells (edge cells smaller) -> 2x3 coarse grid, exact flow, spread back
    cell = lambda r, c: (r // 2) * 3 + (c // 2)  # noqa: E731
    sizes = np.zeros(6)
    for r in range(3):
        for c in range(5):
            sizes[cell(r, c)] += 1
    n_c = 5 + 6
    pooled = torch.zeros(2, 2, 1, n_c, n_c, dtype=torch.float64)
    for layer in range(2):
        for b in range(2):
            w = a.weights[layer, b].double().mean(0)  # (N, N)
            to_c = lambda t: t if t < 5 else 5 + cell((t - 5) // 5, (t - 5) % 5)  # noqa: E731
            for i in range(20):
                for j in range(20):
                    ci, cj = to_c(i), to_c(j)
                    pooled[layer, b, 0, ci, cj] += w[i, j] / (1 if ci < 5 else sizes[ci - 5])
    coarse = attention_flow(attentions_from(pooled.float(), a.prefix, (2, 3)), residual=0.0)
    ref = torch.zeros(2, 3, 5)
    for r in range(3):
        for c in range(5):
            ref[:, r, c] = coarse[:, r // 2, c // 2] / sizes[cell(r, c)]
    torch.testing.assert_close(approx, ref, atol=ATOL, rtol=0)
