import pytest
import torch

from vitscope.errors import VitscopeError
from vitscope.methods import upsample


def test_nearest_is_block_repetition_like_dino():
    m = torch.arange(6.0).reshape(1, 2, 3)
    out = upsample(m, (4, 9), "nearest")
    ref = m.repeat_interleave(2, dim=-2).repeat_interleave(3, dim=-1)
    torch.testing.assert_close(out, ref)


def test_bilinear_hand_example():
    # 1x2 map [0, 1] to 1x4: align_corners=False samples at x = (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25
    # clamped to [0, 1]: values 0, 0.25, 0.75, 1
    out = upsample(torch.tensor([[[0.0, 1.0]]]), (1, 4), "bilinear")
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))


def test_bicubic_stays_in_range_and_bool_maps():
    m = torch.zeros(2, 3, 3)
    m[:, 1, 1] = 1.0
    out = upsample(m, (12, 12), "bicubic")
    assert out.shape == (2, 12, 12)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    b = upsample(m > 0.5, (6, 6), "nearest")
    assert b.dtype == torch.float32 and float(b.sum()) == 2 * 4


def test_bad_mode():
    with pytest.raises(VitscopeError, match="mode"):
        upsample(torch.zeros(1, 2, 2), (4, 4), "area")  # type: ignore[arg-type]
