"""`vitscope.capture.intercept._check_rows_and_product`, the proof of every float32 SDPA call, first checks the
kernel's output rows against a bound taken from what it computed anyway (``max_i |(a v)_ic|``, never above
`check_product`'s ``max_j |v_jc|``) and reads all of v only when that does not settle it. It must accept exactly
what `check_product` accepts on the cases the first bound cannot settle (a column the sampled rows average to
about 0), refuse a wrong output either way, and keep the rows' error first."""

from __future__ import annotations

import pytest
import torch

from vitscope.capture import intercept
from vitscope.errors import CaptureError

B, H, S, N, DV = 1, 2, 3, 40, 8
EPS = 2.0**-23  # float32 kernel


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(torch.randn(B, H, S, N, generator=g) * 4, dim=-1)  # peaked rows
    assert a.max(dim=-1).values.mean() > 0.2
    return a, torch.randn(B, H, N, DV, generator=g)


def _reference_accepts(a: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> bool:
    try:
        intercept.check_product(0, a, v, o, eps_in=EPS, logit_bound=intercept._FULL_PRECISION_LOGITS, step="x")
    except CaptureError:
        return False
    return True


def test_right_output_passes_and_wrong_one_fails() -> None:
    a, v = _case()
    o = a @ v
    intercept._check_rows_and_product(0, a, v, o.clone(), EPS)
    wrong = o.clone()
    wrong[0, 1, 2, 3] += 1e-2 * float(v.abs().max())  # far above float32 rounding, below the values' size
    with pytest.raises(CaptureError, match="layer 0: the kernel's output is not softmax"):
        intercept._check_rows_and_product(0, a, v, wrong, EPS)


@pytest.mark.parametrize("off", [0.0, 0.5, 2.0])
def test_a_column_averaging_to_zero_is_judged_by_the_full_bound(off: float) -> None:
    """Column 0 of v alternates +-1 under uniform rows: ``a v`` is 0 there, so the first bound is 0 and only
    the pass over v can accept a rounding-sized error; a larger one is refused as `check_product` refuses it."""
    a = torch.full((B, H, S, N), 1.0 / N)
    _, v = _case()
    v[..., 0] = torch.tensor([1.0, -1.0]).repeat(N // 2)
    o = a @ v
    rtol = 4 * EPS * (1 + intercept._FULL_PRECISION_LOGITS) + (N + DV) * EPS
    o[..., 0] += off * rtol  # off x the tolerance of a column whose largest |v| is 1
    want = _reference_accepts(a, v, o)
    assert want == (off < 1.0)
    if want:
        intercept._check_rows_and_product(0, a, v, o.clone(), EPS)
    else:
        with pytest.raises(CaptureError, match="output off by"):
            intercept._check_rows_and_product(0, a, v, o.clone(), EPS)


def test_rows_error_comes_first() -> None:
    a, v = _case()
    o = a @ v
    a[0, 0, 1] = float("nan")  # a row that is not a softmax (0/0): the product fails too
    with pytest.raises(CaptureError, match="rows do not sum to 1"):
        intercept._check_rows_and_product(0, a, v, o, EPS)
