"""Suffix tokens (YOLOS's detection tokens, after the patches) through every path: streaming, gradients, info,
viewer. Token order ``[prefix, patches, suffix]``; each map must read the patch columns ``P0 .. P0 + P - 1``.

References are independent of vitscope's code: transformers' own eager attention of the YOLOS model (``b.reference``,
q/k sharpened so the mean row max > 0.2, asserted) and hand computations on it.
"""

from __future__ import annotations

import torch

import vitscope
from tests.capture.families import PATCH
from tests.capture.test_probe import _pixels, _yolos
from vitscope.methods.distance import mean_attention_distance

SIZE = (32, 48)  # 4x6 grid of 8 px patches: non-square
GRID = (SIZE[0] // PATCH, SIZE[1] // PATCH)
P0, P, S = 1, GRID[0] * GRID[1], 3  # [CLS], 4x6 patches, 3 detection tokens


def _hand_rollout(ref: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Rollout by hand on the eager attention ``(L, B, H, N, N)``: ``R = A'_{L-1} ... A'_0`` in float64."""
    fused = ref.double().mean(2)  # (L, B, N, N)
    eye = torch.eye(fused.shape[-1], dtype=torch.float64)
    R = eye.expand_as(fused[0]).clone()
    for A in fused:
        a = (1 - residual) * A + residual * eye
        R = (a / a.sum(-1, keepdim=True)) @ R
    return R


def test_streaming_paths_read_the_patch_columns_of_a_suffix_model() -> None:
    """Streamed fused attention, rollout (cls, det and mean queries) and distance equal the eager attention's
    (and the full capture's); on the old code the streaming paths refused YOLOS, and a ``N - prefix`` patch count
    (27 here, not 24) cannot reshape to the 4x6 grid."""
    from vitscope.capture.streaming import fused_attention
    from vitscope.methods.streaming import streaming_distance, streaming_rollout

    b = _yolos("YolosModel")
    px = _pixels(SIZE, batch=2)
    ref, _ = b.reference(px)  # (L, B, H, N, N)
    assert ref.shape[-1] == P0 + P + S and float(ref.amax(-1).mean()) > 0.2  # peaked (q/k sharpened)
    fused = fused_attention(b.model, px, chunk_rows=4)
    torch.testing.assert_close(fused, ref.mean(2), atol=1e-5, rtol=0)
    det = fused_attention(b.model, px, queries=["det:1", (1, 2)], layers=[-1], head_fusion="max")
    torch.testing.assert_close(det[0], ref[-1][:, :, [P0 + P + 1, P0 + 1 * GRID[1] + 2]].amax(1), atol=1e-5, rtol=0)

    R = _hand_rollout(ref)  # (B, N, N)
    cls = streaming_rollout(b.model, px, chunk_rows=4)
    assert cls.suffix == ("det",) * S and cls.queries == (0,)
    torch.testing.assert_close(cls.rows[:, 0].double(), R[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cls.map().double(), R[:, 0, P0 : P0 + P].reshape(2, *GRID), atol=1e-5, rtol=0)
    mean = streaming_rollout(b.model, px, queries="mean")  # the mean over patch rows only, never det rows
    torch.testing.assert_close(mean.map().double(), R[:, P0 : P0 + P, P0 : P0 + P].mean(1).reshape(2, *GRID),
                               atol=1e-5, rtol=0)
    last = streaming_rollout(b.model, px, queries=["det:2"])
    torch.testing.assert_close(last.rows[:, 0].double(), R[:, -1], atol=1e-5, rtol=0)
    assert vitscope.maps(b.model, px, "rollout").map.shape == (2, *GRID)

    dist = streaming_distance(b.model, px)
    full = mean_attention_distance(vitscope.capture(b.model, px), per_image=True)  # (L, B, H)
    torch.testing.assert_close(dist.double(), full, atol=1e-4, rtol=0)
    # by hand, layer 0 image 0 head 1: patch rows, patch keys renormalised, centre distances in pixels
    ys, xs = torch.meshgrid(torch.arange(float(GRID[0])) * PATCH, torch.arange(float(GRID[1])) * PATCH, indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1).double()
    d = torch.cdist(pos, pos)  # (P, P)
    w = ref[0, 0, 1, P0 : P0 + P, P0 : P0 + P].double()
    hand = ((w / w.sum(-1, keepdim=True)) * d).sum(-1).mean()
    torch.testing.assert_close(dist[0, 0, 1].double(), hand, atol=1e-4, rtol=0)


def test_batch_statistics_count_only_patch_tokens_of_a_suffix_model() -> None:
    """Batch mode's per-image measures: ``patch_tokens`` and the norm means cover the patches only (not the det
    tokens: 27 on the old ``N - prefix`` slice)."""
    from vitscope.batch.stats import image_statistics

    b = _yolos("YolosModel")
    px = _pixels(SIZE, batch=1)
    stats = image_statistics(vitscope.load(b.model), px)
    assert int(stats["patch_tokens"][0]) == P
    with torch.no_grad():
        hidden = b.model(px, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    hand = torch.stack([h[0, P0 : P0 + P].norm(dim=-1).mean() for h in hidden[1:]]).double().numpy()
    assert abs(stats["norm_mean"][0] - hand).max() < 1e-4
