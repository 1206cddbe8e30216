import itertools
import math

import numpy as np
import pytest
import torch

from tests.methods.helpers import PREFIX_REG, attentions_from, random_attentions
from vitscope.attentions import Attentions
from vitscope.errors import VitscopeError
from vitscope.methods import DistanceAccumulator, mean_attention_distance
from vitscope.methods.distance import patch_distances


def _uniform(prefix, grid, patch) -> Attentions:
    N = len(prefix) + grid[0] * grid[1]
    return attentions_from(torch.full((2, 1, 3, N, N), 1.0 / N), prefix, grid, patch)


@pytest.mark.parametrize("prefix", [(), PREFIX_REG])
def test_uniform_attention_gives_mean_pairwise_grid_distance(prefix):
    grid, patch = (3, 5), (8, 6)
    cells = [(r * 8.0, c * 6.0) for r in range(3) for c in range(5)]  # patch centres (offsets suffice)
    pair_mean = np.mean([math.dist(p, q) for p in cells for q in cells])  # over ordered pairs, i = j included
    a = _uniform(prefix, grid, patch)
    got = mean_attention_distance(a)  # renormalised over patches
    np.testing.assert_allclose(got.numpy(), np.full((2, 3), pair_mean), rtol=1e-6)
    # without renormalisation the prefix mass counts for nothing: scaled by P / N
    P, N = 15, len(prefix) + 15
    got_raw = mean_attention_distance(a, renormalize=False)
    np.testing.assert_allclose(got_raw.numpy(), np.full((2, 3), pair_mean * P / N), rtol=1e-6)


def test_hand_worked_rows():
    w = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]])[None, None, None]
    a = attentions_from(w, (), (1, 3), (2, 2))  # patches 2 px apart
    # row 0: .5*0 + .5*2 = 1; row 1: 0; row 2: .25*4 + .25*2 = 1.5  -> mean 2.5 / 3
    torch.testing.assert_close(mean_attention_distance(a), torch.tensor([[2.5 / 3]], dtype=torch.float64))


def test_pixel_exact_distance_by_brute_force():
    grid, (ph, pw) = (2, 3), (2, 3)
    got = patch_distances(grid, (ph, pw), "pixel")
    for i, j in itertools.product(range(6), repeat=2):
        (ri, ci), (rj, cj) = divmod(i, 3), divmod(j, 3)
        pix_i = [(ri * ph + u, ci * pw + v) for u in range(ph) for v in range(pw)]
        pix_j = [(rj * ph + u, cj * pw + v) for u in range(ph) for v in range(pw)]
        ref = np.mean([math.dist(p, q) for p in pix_i for q in pix_j])
        assert abs(float(got[i, j]) - ref) < 1e-12, (i, j)
    centre = patch_distances(grid, (ph, pw), "centre")
    assert float(centre[0, 5]) == pytest.approx(math.hypot(1 * ph, 2 * pw))


def test_loop_reference_with_registers_and_3x5():
    a = random_attentions(grid=(3, 5), layers=2, batch=2, heads=3, patch_size=(4, 8), seed=31)
    got = mean_attention_distance(a, metric="centre", per_image=True)
    w = a.weights.double().numpy()
    ref = np.zeros((2, 2, 3))
    for layer, b, h in itertools.product(range(2), range(2), range(3)):
        vals = []
        for qi in range(15):
            row = w[layer, b, h, 5 + qi, 5:]
            row = row / row.sum()
            vals.append(sum(row[kj] * math.hypot((qi // 5 - kj // 5) * 4, (qi % 5 - kj % 5) * 8) for kj in range(15)))
        ref[layer, b, h] = np.mean(vals)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)


def test_streaming_over_100_images_equals_batch():
    a = random_attentions(prefix=("cls",), grid=(2, 3), layers=2, batch=100, heads=2, seed=32, sharp=3.0)
    per = mean_attention_distance(a, metric="pixel", per_image=True)  # (L, 100, H)
    acc = DistanceAccumulator(metric="pixel")
    start = 0
    for size in [1, 7, 13, 29, 50]:
        part = Attentions(
            weights=a.weights[:, start : start + size], prefix=a.prefix, grid=a.grid, patch_size=a.patch_size,
            image_size=a.image_size, layers=a.layers, heads=a.heads, queries=None, num_layers=2, num_heads=2,
        )
        acc.update(part)
        start += size
    assert acc.count == 100
    torch.testing.assert_close(acc.mean, per.mean(1))
    torch.testing.assert_close(acc.std, per.std(1, unbiased=False))
    torch.testing.assert_close(acc.mean, mean_attention_distance(a, metric="pixel"))
    assert float(acc.std.min()) > 0


def test_accumulator_errors():
    acc = DistanceAccumulator()
    with pytest.raises(VitscopeError, match="update"):
        _ = acc.mean
    acc.update(random_attentions(seed=1))
    with pytest.raises(VitscopeError, match="layers"):
        acc.update(random_attentions(seed=1).select([0]))
    with pytest.raises(VitscopeError, match="metric"):
        mean_attention_distance(random_attentions(seed=1), metric="manhattan")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- from a forward pass's attention
def _centre_distance_ref(probs: np.ndarray, grid, patch) -> np.ndarray:
    """(B, H) by hand in float64: patch rows renormalised over patch keys, weighted by patch-centre distances,
    averaged over query patches. ``probs``: (B, H, P, P) attention of patch queries to patch keys."""
    centres = np.array([((r + 0.5) * patch[0], (c + 0.5) * patch[1]) for r in range(grid[0]) for c in range(grid[1])])
    dist = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))  # (P, P)
    w = probs / probs.sum(-1, keepdims=True)
    return (w * dist).sum(-1).mean(-1)


#: name -> (grid, batch, heads, block bytes): the blocks `add_distance_from_qk` / `_from_probs` work through
#: (one image's heads at a time)
DISTANCE_BLOCKS = {
    "one block per image": ((3, 5), 2, 3, 2**20),
    "heads, partial last block": ((3, 5), 2, 3, 2 * 15 * 15 * 4),  # 2 of an image's 3 heads, then 1
    "rows of one head": ((3, 5), 2, 3, 4 * 15 * 15 - 4),  # a head exceeds the block: 16-row chunks (here 15)
    "rows of one head, several chunks": ((6, 7), 1, 2, 4 * 42 * 16),  # 42 rows in chunks of 16, 16, 10
    "ViT-S/16 at 224 px (38416 terms per sum)": ((14, 14), 2, 2, 2**20),
}


@pytest.mark.parametrize("layout", ["qkv views", "contiguous"])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize("case", list(DISTANCE_BLOCKS))
def test_distance_from_qk_and_probs_equal_a_float64_hand_loop(case, bias, layout, monkeypatch):
    """Batch mode's per-layer distance (`add_distance_from_qk`: only the patch block of the logits, its softmax
    weighted and summed per pair; `add_distance_from_probs`: from the attention itself, prefix columns present)
    equals a float64 loop over patch centres, whatever the blocks and whatever q's and k's strides (the kernel's
    own views are read in place). q is scaled so rows are peaked (mean row max > 0.2 checked): a wrong row, key,
    head or image order changes the result."""
    from vitscope.methods import distance as D

    grid, B, H, block = DISTANCE_BLOCKS[case]
    monkeypatch.setattr(D, "DISTANCE_BLOCK_BYTES", block)
    P, P0, d, patch, scale = grid[0] * grid[1], 2, 8, (16, 12), 0.35
    gen = torch.Generator().manual_seed(3)
    # q and k (B, H, N, d) with 2 prefix tokens; "qkv views": as a model's attention hands them to the kernel,
    # views of one (B, N, 3, H, d) projection, read in place (no (B, H) batch stride, rows 3*H*d apart)
    qkv = torch.randn(B, P0 + P, 3, H, d, generator=gen).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
    if layout == "qkv views":
        q, k = qkv[0].mul_(3.0), qkv[1]
    else:
        q, k = (3.0 * qkv[0]).contiguous(), qkv[1].contiguous()
    b = torch.randn(1, H, P0 + P, P0 + P, generator=gen) if bias else None  # a position bias shared by images
    logits = (q.double() @ k.double().transpose(-2, -1)) * scale + (0 if b is None else b.double())
    probs = torch.softmax(logits, dim=-1)  # (B, H, N, N) over every key, as the kernel computes it
    assert float(probs.amax(-1).mean()) > 0.2
    patches = slice(P0, P0 + P)
    ref = _centre_distance_ref(probs[:, :, patches, patches].numpy(), grid, patch)
    got_qk = torch.full((B, H), 5.0)  # added to, not overwritten
    D.add_distance_from_qk(got_qk, q[:, :, patches], k[:, :, patches], scale,
                           None if b is None else b[:, :, patches, patches], grid, patch)
    np.testing.assert_allclose(got_qk.numpy() - 5.0, ref, rtol=1e-6, atol=1e-5)
    got_p = torch.zeros(B, H)
    D.add_distance_from_probs(got_p, probs.float()[:, :, patches, patches], grid, patch)
    np.testing.assert_allclose(got_p.numpy(), ref, rtol=1e-6, atol=1e-5)
    small = torch.empty(3)  # a scratch too small is replaced, never overrun
    D.add_distance_from_qk(got_p.zero_(), q[:, :, patches], k[:, :, patches], scale,
                           None if b is None else b[:, :, patches, patches], grid, patch, scratch=small)
    np.testing.assert_allclose(got_p.numpy(), ref, rtol=1e-6, atol=1e-5)
