"""Video ViTs (transformers VideoMAE, ViViT, V-JEPA 2; TimeSformer refused) through the zero-declaration route.

One table, `VIDEO`: a tiny random model per family, saved with ``save_pretrained`` and loaded with
``vitscope.load("hf:<folder>")``; the reference is the same folder loaded with ``attn_implementation="eager"``
and ``output_attentions=True`` (the family's own explicit softmax). q/k are sharpened (`families.sharpen`) so the
reference's mean row maximum is above 0.2 (asserted): near-uniform random attention would hide a wrong capture.
The time axis is checked against the model's own embedding output: a change in one input frame moves exactly the
tokens vitscope's layout puts in that frame's tubelet.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from tests.capture.families import main_tensor, sharpen
from vitscope.errors import CaptureError, ImageError

PATCH = 8
SIZES = {"square": (32, 32), "wide": (32, 48)}
FRAMES = {"square": 4, "wide": 8}  # 4 and 8 input frames (2 and 4 token frames at tubelet 2)
_TMP = tempfile.TemporaryDirectory(prefix="vitscope-video-")


def _videomae(size: tuple[int, int], frames: int) -> Any:
    import transformers

    return transformers.VideoMAEModel(transformers.VideoMAEConfig(
        image_size=list(size), patch_size=PATCH, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_frames=frames, tubelet_size=2))


def _vivit(size: tuple[int, int], frames: int) -> Any:
    import transformers

    return transformers.VivitForVideoClassification(transformers.VivitConfig(
        image_size=list(size), num_frames=frames, tubelet_size=[2, PATCH, PATCH], hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=3))


def _vjepa2(size: tuple[int, int], frames: int) -> Any:
    import transformers

    return transformers.VJEPA2Model(transformers.VJEPA2Config(
        crop_size=size[0], patch_size=PATCH, frames_per_clip=frames, tubelet_size=2, hidden_size=48,
        num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=24, pred_num_hidden_layers=1,
        pred_num_attention_heads=2, num_pooler_layers=1))


def _timesformer(attention_type: str) -> Callable[[tuple[int, int], int], Any]:
    def make(size: tuple[int, int], frames: int) -> Any:
        import transformers

        return transformers.TimesformerForVideoClassification(transformers.TimesformerConfig(
            image_size=size[0], patch_size=PATCH, num_frames=frames, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_labels=3, attention_type=attention_type))

    return make


@dataclass(frozen=True)
class VideoFamily:
    id: str
    make: Callable[[tuple[int, int], int], Any]
    factor: float  # q/k scale: the reference's mean row maximum above 0.2
    prefix: tuple[str, ...]
    key: str = "pixel_values"
    sizes: tuple[str, ...] = ("square", "wide")
    extra: tuple[tuple[str, Any], ...] = ()  # the eager reference's own keywords


VIDEO = [
    VideoFamily("videomae", _videomae, 15.0, ()),
    VideoFamily("vivit", _vivit, 15.0, ("cls",)),
    VideoFamily("vjepa2", _vjepa2, 10.0, (), key="pixel_values_videos", sizes=("square",),  # crop_size: square
                extra=(("skip_predictor", True),)),
]
BY_ID = {f.id: f for f in VIDEO}
CASES = [(f.id, s) for f in VIDEO for s in f.sizes]


@dataclass
class Built:
    vit: Any
    module: torch.nn.Module
    eager: torch.nn.Module
    folder: Path
    fam: VideoFamily

    def pixels(self, batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        T = int(self.vit.info.frames)
        H, W = self.vit.info.preprocess.image_size
        return torch.randn(batch, T, 3, H, W, generator=g)  # (B, T, C, H, W)

    def reference(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, B, H, N, N)`` from the eager model's own softmax, and its embedding output ``(B, N, D)``."""
        with torch.no_grad():
            out = self.eager(**{self.fam.key: pixels}, output_attentions=True, output_hidden_states=True,
                             **dict(self.fam.extra))
        hidden = out.hidden_states if out.hidden_states is not None else out.last_hidden_state
        return torch.stack([a.float() for a in out.attentions]), hidden[0]


@cache
def build(fid: str, sname: str) -> Built:
    import transformers

    fam = BY_ID[fid]
    torch.manual_seed(0)
    module = sharpen(fam.make(SIZES[sname], FRAMES[sname]).eval(), fam.factor)
    folder = Path(tempfile.mkdtemp(dir=_TMP.name))
    module.save_pretrained(folder)
    eager = getattr(transformers, type(module).__name__).from_pretrained(folder, attn_implementation="eager").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = vitscope.load(f"hf:{folder}")
    return Built(vit, vit.module, eager, folder, fam)


@pytest.mark.parametrize(("fid", "sname"), CASES)
def test_loads_with_zero_declarations(fid: str, sname: str) -> None:
    b = build(fid, sname)
    info = b.vit.info
    assert info.frames == FRAMES[sname] and info.tubelet == 2 and info.prefix == b.fam.prefix
    assert info.patch_size == (PATCH, PATCH) and info.num_layers == 2
    assert b.module.config._attn_implementation == "sdpa"  # capture reads the fused kernel, not eager mode


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("fid", "sname"), CASES)
def test_capture_equals_eager_attention(fid: str, sname: str, batch: int) -> None:
    b = build(fid, sname)
    x = b.pixels(batch)
    ref, _ = b.reference(x)
    assert float(ref.amax(-1).mean()) > 0.2  # peaked: a wrong row or token order would show
    a = vitscope.capture(b.vit, x)
    H, W = SIZES[sname]
    frames = FRAMES[sname] // 2
    assert a.frames == frames and a.frame_grid == (H // PATCH, W // PATCH) and a.grid == (frames * H // PATCH, W // PATCH)
    assert a.weights.shape == ref.shape
    torch.testing.assert_close(a.weights, ref, atol=1e-5, rtol=0)
    # the default query row (CLS, else the mean over patch rows) with heads fused as they are computed
    q = "cls" if "cls" in b.fam.prefix else None
    fused = vitscope.capture(b.vit, x, layers=[-1], queries=q, heads="mean")
    want = ref[-1].mean(dim=1)[:, :1] if q else None  # (B, 1, N)
    got = fused.weights[0, :, 0]  # (B, Q, N)
    if want is not None:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(got, ref[-1].mean(dim=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("fid", "sname"), CASES)
def test_outputs_bit_identical_under_capture(fid: str, sname: str) -> None:
    b = build(fid, sname)
    x = b.pixels(2, seed=1)
    with torch.no_grad():
        plain = main_tensor(b.vit(x))
    result = vitscope.capture_full(b.vit, x) if hasattr(vitscope, "capture_full") else None
    if result is None:
        from vitscope.capture.core import capture_full

        result = capture_full(b.vit, x)
    assert torch.equal(main_tensor(result.output), plain)


@pytest.mark.parametrize(("fid", "sname"), CASES)
def test_a_frame_change_moves_only_its_tubelet(fid: str, sname: str) -> None:
    """The time axis: changing input frame t moves exactly the tokens the layout puts in token frame t // 2
    (read from the model's own embedding output, outside vitscope)."""
    b = build(fid, sname)
    x = b.pixels(1, seed=2)
    a = vitscope.capture(b.vit, x, layers=[0], queries=[0])
    rows, cols = a.frame_grid
    _, h0 = b.reference(x)
    for t in range(x.shape[1]):
        y = x.clone()
        y[:, t] += 1.0
        _, h1 = b.reference(y)
        moved = ((h1 - h0).norm(dim=-1)[0] > 1e-5).nonzero().flatten().tolist()
        tf = t // a.tubelet
        want = [a.num_prefix_tokens + (tf * rows + r) * cols + c for r in range(rows) for c in range(cols)]
        assert moved == want, f"frame {t}"
        index = torch.zeros(a.num_patches)
        index[[w - a.num_prefix_tokens for w in want]] = 1
        per = a.per_frame(a.to_grid(index))  # (T', rows, cols): only frame tf is set
        assert per.shape == (a.frames, rows, cols) and bool(per[tf].all()) and float(per.sum()) == rows * cols


# ------------------------------------------------------------------------------------------------- guards
def _fresh(fid: str, sname: str) -> Any:
    """The family's saved model loaded anew (its own module: no probe result cached for it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vitscope.load(f"hf:{build(fid, sname).folder}")


def _stem_hook(vit: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Change the tokens the patch embedding outputs ``(B, T' * rows * cols, D)``."""
    stem = vit.module.embeddings.patch_embeddings
    return stem.register_forward_hook(lambda _m, _i, out: change(out))


@pytest.mark.parametrize(("change", "match"), [
    (lambda t: t + t.roll(16, dims=1), "moves under 2 frame perturbations"),  # each token mixes two frames
    (lambda t: t.unflatten(1, (2, 16)).flip(1).flatten(1, 2), "holds frame 1, row 0, column 0: the tokens run in "
     "another order"),  # the token frames reversed
])
def test_a_stem_that_breaks_the_time_axis_is_refused(change: Callable[[torch.Tensor], torch.Tensor], match: str,
                                                     ) -> None:
    b = build("videomae", "square")  # 2 token frames of 4x4 patches
    vit = _fresh("videomae", "square")
    handle = _stem_hook(vit, change)
    try:
        with pytest.raises(CaptureError, match=match):
            vitscope.capture(vit, b.pixels(1))
    finally:
        handle.remove()
    vitscope.capture(_fresh("videomae", "square"), b.pixels(1))  # the same model without the change passes


def test_a_wrong_tubelet_is_refused() -> None:
    """Declared tubelet 1 on a tubelet-2 model: 4 token frames declared, 2 measured."""
    b = build("videomae", "square")
    vit = _fresh("videomae", "square")
    vit.info = replace(vit.info, tubelet=1)
    with pytest.raises(CaptureError, match="expected 4x4x4 = 64 consecutive tubelet tokens"):
        vitscope.capture(vit, b.pixels(1))


def test_timesformer_token_order_is_refused() -> None:
    """TimeSformer's tokens run (rows, cols, frames): read as (frames, rows, cols) they would be wrong."""
    torch.manual_seed(0)
    module = _timesformer("joint_space_time")((32, 32), 4).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = vitscope.load(module)
    with pytest.raises(CaptureError, match=r"\(rows, cols, frames\), frames fastest") as info:
        vitscope.capture(vit, torch.randn(1, 4, 3, 32, 32))
    assert "\n" not in str(info.value)


def test_timesformer_divided_layers_are_refused_per_layer() -> None:
    torch.manual_seed(0)
    module = _timesformer("divided_space_time")((32, 32), 4).eval()
    vit = vitscope.load(module)
    assert vit.info.layer_kinds == ("factorised", "factorised") and "factorised layers [0, 1]" in vit.info.describe()
    with pytest.raises(CaptureError, match=r"layers \[0, 1\] .* factorise attention") as info:
        vitscope.capture(vit, torch.randn(1, 4, 3, 32, 32))
    assert info.value.argument == "layers"


@pytest.mark.parametrize(("shape", "match"), [((1, 3, 3, 32, 32), "takes 4 frames"), ((4, 3, 32, 32), "B, T, C, H, W")])
def test_wrong_video_tensors_are_one_line_errors(shape: tuple[int, ...], match: str) -> None:
    b = build("videomae", "square")
    with pytest.raises(ImageError, match=match) as info:
        vitscope.capture(b.vit, torch.randn(*shape))
    assert info.value.argument == "images"


def test_frames_folder_is_sampled_evenly(tmp_path: Path) -> None:
    """Six frame files, a 4-frame model: frames 0, 2, 3, 5 (round(linspace(0, 5, 4))), each preprocessed as an image."""
    from vitscope.images import preprocess

    b = build("vivit", "square")
    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        f = tmp_path / f"frame_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(f)
        files.append(f)
    got = vitscope.capture(b.vit, tmp_path, layers=[-1], queries="cls")
    info = b.vit.info
    frames = preprocess([files[i] for i in (0, 2, 3, 5)], info.preprocess, info.patch_size)[None]  # (1, T, C, H, W)
    want = vitscope.capture(b.vit, frames, layers=[-1], queries="cls")
    torch.testing.assert_close(got.weights, want.weights)
