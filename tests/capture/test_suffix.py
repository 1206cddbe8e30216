"""Suffix tokens (YOLOS's detection tokens, after the patches) through every path: streaming, gradients, info,
viewer. Token order ``[prefix, patches, suffix]``; each map must read the patch columns ``P0 .. P0 + P - 1``.

References are independent of vitscope's code: transformers' own eager attention of the YOLOS model (``b.reference``,
q/k sharpened so the mean row max > 0.2, asserted) and hand computations on it.
"""

from __future__ import annotations

from typing import Any

import pytest
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


# ------------------------------------------------------------------------------------------ gradient methods
DET = P0 + P + 1  # the second detection token: the score reads it, so every layer's gradient is non-zero


def _score_weights() -> torch.Tensor:
    return torch.randn(32, generator=torch.Generator().manual_seed(3))  # hidden size 32 (families._hf_common)


def _target(out: Any) -> torch.Tensor:
    """One scalar per image, read from a detection token of the last hidden state."""
    return out.last_hidden_state[:, DET] @ _score_weights()


def _eager_grads(px: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Independent reference: transformers' eager YOLOS (same weights), ``A`` per layer (the tensor it multiplies
    with V, ``(B, H, N, N)``), ``dL/dA`` by autograd for the final score, and per layer ``dL_i/dA_i`` for the score
    read from block ``i``'s output (LeGrad's per-layer read-out)."""
    b = _yolos("YolosModel")
    eager = b.explicit
    assert eager is not None
    outs: list[torch.Tensor] = []
    layers = [m for m in eager.modules() if type(m).__name__ == "YolosLayer"]
    handles = [m.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for m in layers]
    try:
        with torch.enable_grad():
            out = eager(pixel_values=px, output_attentions=True, interpolate_pos_encoding=True)
            attn = list(out.attentions)
            final = torch.autograd.grad(_target(out).sum(), attn, retain_graph=True)
            per_layer = [torch.autograd.grad((outs[i][:, DET] @ _score_weights()).sum(), attn[i], retain_graph=True)[0]
                         for i in range(len(attn))]
    finally:
        for h in handles:
            h.remove()
    return [a.detach().double() for a in attn], [g.double() for g in final], [g.double() for g in per_layer]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    assert scale > 1e-6  # a non-trivial map
    torch.testing.assert_close(got.double(), want, atol=1e-4 * scale, rtol=0)


def test_gradient_methods_on_a_suffix_model_match_autograd_on_the_eager_attention() -> None:
    """grad_rollout, Chefer relevance, attention Grad-CAM and LeGrad on YOLOS equal hand computations from the
    eager model's attention and its autograd gradient: the N x N matrices span prefix, patches and the detection
    tokens, the maps are the patch columns. On the old code these methods refused suffix models."""
    from vitscope.methods.attn_gradcam import attn_gradcam
    from vitscope.methods.grad_rollout import grad_rollout
    from vitscope.methods.legrad import legrad
    from vitscope.methods.relevance import chefer_relevance

    b = _yolos("YolosModel")
    px = _pixels(SIZE, batch=2)
    A, G, G_layer = _eager_grads(px)
    assert float(torch.stack(A).amax(-1).mean()) > 0.2  # peaked (q/k sharpened)
    B, _, N, _ = A[0].shape
    assert N == P0 + P + S
    eye = torch.eye(N, dtype=torch.float64)
    patches = slice(P0, P0 + P)

    # Chefer et al. 2021: R <- R + mean_h((G * A)^+) R, map = R[cls, patches]; query "det:1" reads row DET
    R = eye.expand(B, N, N).clone()
    for a, g in zip(A, G, strict=True):
        R = R + (g * a).clamp_min(0).mean(1) @ R
    _close(chefer_relevance(b.model, px, _target), R[:, 0, patches].reshape(B, *GRID))
    _close(chefer_relevance(b.model, px, _target, query="det:1"), R[:, DET, patches].reshape(B, *GRID))

    # vit-explain gradient rollout without discarding: F = relu(mean_h A * G), rownorm(F/2 + I/2), product
    R = eye.expand(B, N, N).clone()
    for a, g in zip(A, G, strict=True):
        f = 0.5 * (g * a).mean(1).clamp_min(0) + 0.5 * eye
        R = (f / f.sum(-1, keepdim=True)) @ R
    _close(grad_rollout(b.model, px, _target, discard_ratio=0.0), R[:, 0, patches].reshape(B, *GRID))

    # attention Grad-CAM on the last layer, row "det:1" (the [CLS] row of the last layer does not reach the
    # score): w_h = mean over patch keys of G, relu(mean_h w_h A)
    a, g = A[-1][:, :, DET, patches], G[-1][:, :, DET, patches]  # (B, H, P)
    cam = (g.mean(-1, keepdim=True) * a).mean(1).clamp_min(0)
    _close(attn_gradcam(b.model, px, _target, query="det:1"), cam.reshape(B, *GRID))

    # LeGrad, no min-max: sum over layers of mean over heads and all query rows of relu(dL_l/dA_l), patch columns
    want = sum(g.clamp_min(0).mean(1).mean(1)[:, patches] for g in G_layer)
    got = legrad(b.model, px, lambda x: x @ _score_weights(), readout=lambda tok: tok[:, DET], normalize=False)
    _close(got, want.reshape(B, *GRID))


# ------------------------------------------------------------------------------------------------------ info
def test_cli_info_shows_suffix_tokens() -> None:
    """``vitscope info`` on a YOLOS folder names the detection tokens after the patches, in text and --json (the
    old JSON had no suffix at all; a reader would count 1 + patches tokens)."""
    import json

    from typer.testing import CliRunner

    from vitscope.cli import app

    folder = str(_yolos("YolosModel").folder)
    res = CliRunner().invoke(app, ["info", "--model", f"hf:{folder}"])
    assert res.exit_code == 0, res.output
    assert "prefix tokens [cls], suffix tokens [3 det]" in res.output
    res = CliRunner().invoke(app, ["info", "--model", f"hf:{folder}", "--json"])
    assert res.exit_code == 0, res.output
    desc = json.loads(res.output)
    assert (desc["prefix"], desc["suffix"], desc["num_suffix_tokens"]) == (["cls"], ["det"] * S, S)


# ---------------------------------------------------------------------------------------------------- viewer
def test_viewer_pack_of_a_suffix_model_carries_the_patch_slice() -> None:
    """A YOLOS page: the packed rows span [CLS], patches and detection tokens; ``patches`` names the patch
    columns, and the packed [CLS] map (float16) equals the eager attention's patch columns (the old page had no
    suffix, so the viewer labelled the detection tokens as patches past the grid)."""
    from vitscope.viewer.pack import decode_array, pack

    b = _yolos("YolosModel")
    px = _pixels(SIZE, batch=1)
    ref, _ = b.reference(px)  # (L, B, H, N, N)
    attn = vitscope.capture(b.model, px)
    data = pack(attn, torch.rand(*SIZE, 3).numpy(), dtype="float16")
    assert (data["prefix"], data["suffix"], data["patches"], data["tokens"]) == (["cls"], ["det"] * S,
                                                                                  [P0, P0 + P], P0 + P + S)
    raw = decode_array(data["attention"])  # (layers, heads, queries, tokens)
    start, stop = data["patches"]
    cls_map = raw[-1, :, data["queries"].index(0), start:stop].mean(0).reshape(GRID)
    want = ref[-1, 0, :, 0, P0 : P0 + P].mean(0).reshape(GRID).numpy()
    assert abs(cls_map - want).max() < 2e-3  # float16
    det = raw[-1, 0, data["queries"].index(P0 + P + 2)]  # the last detection token's row, over every token
    assert abs(det - ref[-1, 0, 0, -1].numpy()).max() < 2e-3


def test_maps_take_a_suffix_query() -> None:
    """``vitscope.maps(..., query="det:1")``: the query check knows the suffix kinds (the old check built a layout
    without them and refused "det:1"), and the map is that detection token's row over the patch columns."""
    b = _yolos("YolosModel")
    px = _pixels(SIZE, batch=1)
    ref, _ = b.reference(px)
    got = vitscope.maps(b.model, px, "cls", query="det:1", renormalize=False).map
    torch.testing.assert_close(got[0], ref[-1, 0, :, DET, P0 : P0 + P].mean(0).reshape(GRID), atol=1e-5, rtol=0)
    with pytest.raises(vitscope.VitscopeError, match="query"):
        vitscope.maps(b.model, px, "cls", query="det:3")  # 3 detection tokens: det:0..det:2
