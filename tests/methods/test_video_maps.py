"""Maps of a video per frame (`vitscope.video_maps`), against references computed from the family's own eager
attention (the models of `tests/capture/test_video.py`: sharpened q/k, reference row maxima above 0.2 asserted
there): raw [CLS] / mean-query attention, rollout, attention Grad-CAM with a class target (dL/dA by autograd
through the eager model), and the temporal profile by hand."""

from __future__ import annotations

import pytest
import torch

import vitscope
from tests.capture.test_video import build
from vitscope.errors import VitscopeError


def _split(x: torch.Tensor, b: object, prefix: int) -> torch.Tensor:
    """Patch tokens ``(..., N)`` -> ``(..., T', rows, cols)`` by the model's own token order (T', rows, cols)."""
    info = b.vit.info  # type: ignore[attr-defined]
    H, W = info.preprocess.image_size
    rows, cols = H // info.patch_size[0], W // info.patch_size[1]
    return x[..., prefix:].reshape(*x.shape[:-1], info.frames // info.tubelet, rows, cols)


@pytest.mark.parametrize(("fid", "sname"), [("vivit", "wide"), ("videomae", "square"), ("vjepa2", "square")])
def test_raw_attention_per_frame_and_profile(fid: str, sname: str) -> None:
    b = build(fid, sname)
    x = b.pixels(2)
    ref, _ = b.reference(x)  # (L, B, H, N, N)
    P0 = len(b.fam.prefix)
    last = ref[-1].double()  # (B, H, N, N)
    if P0:  # [CLS] row, heads averaged
        want = _split(last[:, :, 0].mean(dim=1), b, P0)
    else:  # no [CLS]: the mean over every patch query row of every frame, heads averaged
        want = _split(last.mean(dim=1)[:, P0:].mean(dim=1), b, P0)
    r = vitscope.video_maps(b.vit, x, "cls")
    assert r.map.shape == want.shape and r.frames == want.shape[1]
    torch.testing.assert_close(r.map.double(), want, atol=1e-5, rtol=0)
    mass = want.sum(dim=(-2, -1))
    torch.testing.assert_close(r.profile.double(), mass / mass.sum(dim=1, keepdim=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.profile.sum(dim=1), torch.ones(2))


def test_rollout_per_frame() -> None:
    """Abnar & Zuidema's rollout (heads mean, 0.5 A + 0.5 I, rows renormalised) by hand from the eager attention."""
    b = build("vivit", "square")
    x = b.pixels(1)
    ref, _ = b.reference(x)
    N = ref.shape[-1]
    r = torch.eye(N, dtype=torch.float64).expand(1, N, N)
    for a in ref.double():
        m = 0.5 * a.mean(dim=1) + 0.5 * torch.eye(N, dtype=torch.float64)
        r = (m / m.sum(dim=-1, keepdim=True)) @ r
    want = _split(r[:, 0], b, 1)
    got = vitscope.video_maps(b.vit, x, "rollout", residual=0.5, discard_ratio=0.0, head_fusion="mean").map
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_attention_gradcam_per_frame_with_a_class_target() -> None:
    """ReLU(mean_h w_h A_h[cls, patches]) with w_h = mean over patches of dL/dA_h[cls]: autograd on the eager model."""
    b = build("vivit", "square")
    x = b.pixels(1, seed=3)
    nonzero = 0
    for target in range(3):
        out = b.eager(pixel_values=x, output_attentions=True)
        attn = out.attentions[-1]  # (B, H, N, N)
        attn.retain_grad()
        out.logits[:, target].sum().backward()
        a, g = attn[:, :, 0, 1:].detach().double(), attn.grad[:, :, 0, 1:].double()  # type: ignore[index]
        cam = (g.mean(dim=-1, keepdim=True) * a).mean(dim=1).clamp_min(0)  # (B, P)
        want = _split(torch.cat([cam.new_zeros(1, 1), cam], dim=1), b, 1)
        nonzero += float(want.abs().max()) > 0
        got = vitscope.video_maps(b.vit, x, "attn_gradcam", target=target).map
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)
    assert nonzero  # some class's map is not all clamped away


def test_an_image_model_is_refused() -> None:
    with pytest.raises(VitscopeError, match="image model"):
        vitscope.video_maps("vitscope:shapes", torch.zeros(1, 3, 32, 32))


def test_temporal_profile_of_a_zero_map_is_uniform() -> None:
    from vitscope.methods.video import temporal_profile

    p = temporal_profile(torch.zeros(2, 4, 3, 3))
    torch.testing.assert_close(p, torch.full((2, 4), 0.25))
    p = temporal_profile(torch.tensor([[[[1.0]], [[3.0]]]]))  # (1, 2, 1, 1)
    torch.testing.assert_close(p, torch.tensor([[0.25, 0.75]]))


def test_spatial_only_measures_refuse_a_video() -> None:
    """Mean attention distance (captured and streamed) and pooled flow would treat frames as rows of one image."""
    from vitscope.methods.distance import mean_attention_distance
    from vitscope.methods.flow import attention_flow
    from vitscope.methods.streaming import streaming_distance

    b = build("vivit", "square")
    x = b.pixels(1)
    a = vitscope.capture(b.vit, x)
    with pytest.raises(VitscopeError, match="token frames stacked"):
        mean_attention_distance(a)
    with pytest.raises(VitscopeError, match="token frames stacked"):
        streaming_distance(b.vit, x)
    with pytest.raises(VitscopeError, match="pool patches of different frames"):
        attention_flow(a, max_tokens=10, approximate=True)
    img = vitscope.capture("vitscope:shapes", torch.zeros(1, 3, 32, 32))  # an image's distance still runs
    assert mean_attention_distance(img).numel()


def _videomae_classifier() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    return transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_frames=4, tubelet_size=2, num_labels=3)).eval()


@pytest.mark.parametrize("which", ["vivit", "videomae"])
def test_video_classifier_readout_is_the_models_head(which: str) -> None:
    """The read-out LeGrad applies to every layer's tokens gives the model's own logits on the last layer's."""
    if which == "vivit":
        b = build("vivit", "square")
        vit, module, x = b.vit, b.eager, b.pixels(2)
    else:
        module = _videomae_classifier()
        vit, x = vitscope.load(module), torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        out = module(pixel_values=x, output_hidden_states=True)
        assert vit.readout is not None
        torch.testing.assert_close(vit.readout(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=1e-5)
    r = vitscope.video_maps(vit, x, "legrad", target=1)
    assert r.map.shape == (2, 2, 4, 4) and bool(torch.isfinite(r.map).all())
