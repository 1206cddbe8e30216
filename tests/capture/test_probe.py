"""The token layout is measured (`vitscope.capture.probe`), declarations are cross-checked, and the softmax axis
must be the token axis.

- every family of `tests/capture/families.py`: the measured layout is the adapter's (square and non-square);
- a custom module wrapped with zero layout declarations: prefix and suffix counts measured, capture exact against
  the module's own probabilities (peaked: `sharpen`, mean row max > 0.2, asserted);
- YOLOS (100 detection tokens in real models, 3 here, after the patches): exact against transformers' eager
  attention through ``vitscope.load(model)`` and ``vitscope.load("hf:<folder>")``;
- guards, each silently wrong (or accepted) on the code before the probe: a suffix declared as a prefix, a wrong
  grid with the right token count, patches in another order, padding tokens, XCiT's channel softmax at a size
  where ``head_dim`` equals the token count, ViTMAE's random shuffle through ``wrap``, linear attention.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
import torch
from torch import nn

import vitscope
from tests.capture.families import (
    FAMILIES,
    PATCH,
    SIZES,
    CustomBlock,
    _explicit_reference,
    _hf,
    _hf_common,
    built,
    sharpen,
)
from vitscope.attentions import Attentions
from vitscope.capture.probe import probe_layout
from vitscope.errors import CaptureError
from vitscope.layout import TokenLayout
from vitscope.methods.rollout import map_from_matrix

DIM = 32


def _pixels(size: tuple[int, int], batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- measured == declared, every family
CASES = [(f.id, s) for f in FAMILIES for s in SIZES if not (f.square_only and s != "square")]


@pytest.mark.parametrize(("fid", "sname"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_measured_layout_is_the_adapters(fid: str, sname: str) -> None:
    fam = next(f for f in FAMILIES if f.id == fid)
    size = SIZES[sname]
    b = built(fid, size)
    vit = b.model if isinstance(b.model, vitscope.VitModel) else vitscope.load(b.model)
    m = probe_layout(vit, (3, *size))
    known = (len(fam.prefix), (size[0] // fam.patch, size[1] // fam.patch), 0)  # written in the family table
    assert (m.num_prefix, m.grid, m.num_suffix) == known
    assert (len(vit.info.prefix), vit.grid_for(size), len(vit.info.suffix)) == known  # the adapter's declaration


# ----------------------------------------------------------------------- a configurable custom token layout
class TokViT(nn.Module):
    """Conv patches, ``prefix`` learned tokens before them and ``suffix`` after, 2 `CustomBlock` layers.

    ``order``: ``"row"`` (row-major), ``"col"`` (column-major) or ``"reversed"``; ``pad``: constant tokens
    appended after the patches of the left ``crop`` pixel columns (a padded variable-resolution batch), or put in
    the middle of the patches (``pad_mid``); ``patch``: the conv's kernel and stride.
    """

    def __init__(self, prefix: int = 1, suffix: int = 0, order: str = "row", pad: int = 0, pad_mid: bool = False,
                 crop: int | None = None, patch: tuple[int, int] = (PATCH, PATCH)) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, patch, patch)
        self.pre = nn.Parameter(torch.randn(1, prefix, DIM))
        self.post = nn.Parameter(torch.randn(1, suffix, DIM))
        self.layers = nn.ModuleList([CustomBlock(DIM) for _ in range(2)])
        self.order, self.pad, self.pad_mid, self.crop = order, pad, pad_mid, crop

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.crop is not None:
            pixels = pixels[..., : self.crop]
        x = self.patch(pixels)  # (B, D, rows, cols)
        if self.order == "col":
            x = x.transpose(2, 3)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D)
        if self.order == "reversed":
            x = x.flip(1)
        B = x.shape[0]
        if self.pad:
            pads = torch.zeros(B, self.pad, DIM, dtype=x.dtype)
            half = x.shape[1] // 2
            x = torch.cat([x[:, :half], pads, x[:, half:]] if self.pad_mid else [x, pads], dim=1)
        return torch.cat([self.pre.expand(B, -1, -1), x, self.post.expand(B, -1, -1)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.tokens(pixels)
        for blk in self.layers:
            x = blk(x)
        return x[:, 0]

    def reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(layers, B, heads, N, N)``: the blocks' own probabilities."""
        out = []
        with torch.no_grad():
            x = self.tokens(pixels)
            for blk in self.layers:
                out.append(blk.probs(x))
                x = blk(x)
        return torch.stack(out)


def _tok(**kw: Any) -> TokViT:
    torch.manual_seed(0)
    return sharpen(TokViT(**kw).eval(), 4.0)  # type: ignore[return-value]


def _wrap(model: nn.Module, size: tuple[int, int] = (32, 32), **decl: Any) -> vitscope.VitModel:
    return vitscope.wrap(model, blocks="layers.*", num_heads=2, patch_size=decl.pop("patch_size", PATCH),
                         image_size=size, dynamic_size=True, **decl)


LAYOUTS = [(0, 0), (1, 0), (5, 0), (1, 3), (0, 2)]  # (prefix, suffix)


@pytest.mark.parametrize(("prefix", "suffix"), LAYOUTS)
@pytest.mark.parametrize("sname", list(SIZES))
def test_zero_declaration_wrap_is_measured_and_exact(prefix: int, suffix: int, sname: str) -> None:
    size = SIZES[sname]
    model = _tok(prefix=prefix, suffix=suffix)
    vit = _wrap(model, size)  # no prefix, no suffix: measured
    px = _pixels(size, batch=3)
    attn = vitscope.capture(vit, px)
    assert attn.prefix == (("cls",) + ("register",) * (prefix - 1) if prefix else ())
    assert attn.suffix == ("suffix",) * suffix
    assert attn.grid == (size[0] // PATCH, size[1] // PATCH)
    ref = model.reference(px)
    assert float(ref.amax(-1).mean()) > 0.2  # peaked attention, so a misplaced token would show
    torch.testing.assert_close(attn.weights, ref, atol=1e-5, rtol=0)
    if prefix:  # the [CLS]-row + head-mean path
        cls = vitscope.capture(vit, px, queries="cls", heads="mean", layers=[-1])
        torch.testing.assert_close(cls.weights[0, :, 0, 0], ref[-1, :, :, 0].mean(1), atol=1e-5, rtol=0)


def test_hybrid_resnet_stem_zero_declaration_exact() -> None:
    """timm's hybrid ViT (a ResNet stem: every token sees far beyond its own 32x32 px): grid and prefix measured."""
    import timm

    torch.manual_seed(0)
    model = sharpen(timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, dynamic_img_size=True,
                                      depth=2).eval(), 16.0)
    vit = vitscope.wrap(model, blocks="blocks.*", attn="attn", num_heads=3, patch_size=32, image_size=224,
                        dynamic_size=True)
    px = _pixels((128, 96), batch=2)
    attn = vitscope.capture(vit, px)
    assert (attn.prefix, attn.grid) == (("cls",), (4, 3))
    ref, _ = _explicit_reference(model)[0](px)
    assert float(ref.amax(-1).mean()) > 0.2  # peaked (sharpened q/k)
    torch.testing.assert_close(attn.weights, ref, atol=1e-5, rtol=0)


def test_probe_runs_once_per_model_and_geometry() -> None:
    model = _tok()
    vit = _wrap(model)
    calls = []
    handle = model.patch.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        vitscope.capture(vit, _pixels((32, 32)))
        first = len(calls)
        vitscope.capture(vit, _pixels((32, 32)))
        assert len(calls) == first + 1  # the capture's own forward pass only
        vitscope.capture(vit, _pixels((32, 48)))  # a new geometry: probed again (the axis check is per model)
        assert len(calls) > first + 2
    finally:
        handle.remove()
    assert not model.patch._forward_pre_hooks and not model.layers[0]._forward_pre_hooks  # nothing left hooked


# --------------------------------------------------------------------------------------------------- YOLOS
def _yolos_config(_size: tuple[int, int] = (32, 32)) -> Any:
    import transformers

    kw = _hf_common(num_detection_tokens=3)
    kw["image_size"] = [32, 32]  # YolosConfig wants a pair
    return transformers.YolosConfig(**kw)


@cache
def _yolos(cls_name: str) -> Any:
    return _hf(cls_name, _yolos_config)(16.0, (32, 32))


@pytest.mark.parametrize("cls_name", ["YolosModel", "YolosForObjectDetection"])
@pytest.mark.parametrize("route", ["object", "folder"])
@pytest.mark.parametrize("sname", list(SIZES))
def test_yolos_suffix_tokens_exact(cls_name: str, route: str, sname: str) -> None:
    b = _yolos(cls_name)
    size = SIZES[sname]
    px = _pixels(size, batch=3 if route == "object" else 1)
    model = b.model if route == "object" else "hf:" + str(b.folder)
    attn = vitscope.capture(model, px)
    ref, _ = b.reference(px)
    assert float(ref.amax(-1).mean()) > 0.2  # peaked (q/k sharpened)
    assert (attn.prefix, attn.suffix, attn.grid) == (("cls",), ("det",) * 3, (size[0] // PATCH, size[1] // PATCH))
    torch.testing.assert_close(attn.weights, ref, atol=1e-5, rtol=0)
    det = vitscope.capture(model, px, queries=["cls", "det:2"], heads="mean", layers=[-1])
    torch.testing.assert_close(det.weights[0, :, 0], ref[-1][:, :, [0, -1]].mean(1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- guards
def _xcit(size: tuple[int, int]) -> nn.Module:
    import timm

    torch.manual_seed(0)  # head_dim 64: 128 / 2 heads
    return timm.create_model("xcit_nano_12_p16_224", pretrained=False, embed_dim=128, num_heads=2, depth=2,
                             cls_attn_layers=1, img_size=size).eval()


def timm_hybrid() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, dynamic_img_size=True, depth=2).eval()


def _mae_wrapped() -> vitscope.VitModel:
    import transformers

    torch.manual_seed(0)
    module = transformers.ViTMAEModel(transformers.ViTMAEConfig(**_hf_common(mask_ratio=0.0))).eval()
    return vitscope.wrap(module, blocks="layers.*", attn="attention", num_heads=2, patch_size=PATCH,
                         image_size=32, prefix=("cls",), forward=lambda m, x: m(pixel_values=x))


class LinearAttention(nn.Module):
    """``phi(q) (phi(k)^T v)`` with ``phi = elu + 1``: no softmax at all."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        return x + q @ (k.transpose(1, 2) @ v) / x.shape[1]


class LinearViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.layers = nn.ModuleList([LinearAttention() for _ in range(2)])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        for blk in self.layers:
            x = blk(x)
        return x


# (id, model factory, size, match): each is silently read (or accepted) without the probe
GUARDS: list[tuple[str, Callable[[], Any], tuple[int, int], str]] = [
    # 1 cls + 16 patches + 1 suffix == 2 "prefix" + 16 patches: the counts match, the order does not
    ("suffix-declared-as-prefix", lambda: _wrap(_tok(prefix=1, suffix=1), prefix=("cls", "register")), (32, 32),
     r"measured 1 prefix \+ 4x4 patches \+ 1 suffix tokens .* described with 2 prefix \+ 4x4 patches \+ 0 suffix"),
    ("wrong-prefix-count", lambda: _wrap(_tok(prefix=2), prefix=("cls",), suffix=("suffix",)), (32, 32),
     r"measured 2 prefix \+ 4x4 patches \+ 0 suffix"),
    # 16x4 patches on 32x48 px: a 2x12 grid, 24 tokens, like the declared 8x8 patches' 4x6
    ("wrong-grid-same-count", lambda: _wrap(_tok(patch=(16, 4)), (32, 48), prefix=("cls",)), (32, 48),
     r"do not form a row-major patch grid"),
    ("reversed-patches", lambda: _wrap(_tok(order="reversed"), prefix=("cls",)), (32, 32), r"tokens are permuted"),
    ("column-major-patches", lambda: _wrap(_tok(order="col"), (32, 48), prefix=("cls",)), (32, 48),
     r"tokens are permuted"),
    # a 4x4 image plus 8 padding tokens, as a 32x48 input: 1 + 24 tokens, read as 4x6 without the probe
    ("padding-at-the-end", lambda: _wrap(_tok(pad=8, crop=32), (32, 48), prefix=("cls",)), (32, 48),
     r"measured 1 prefix \+ 4x4 patches \+ 8 suffix"),
    ("padding-in-the-middle", lambda: _wrap(_tok(pad=8, pad_mid=True, crop=32), (32, 48), prefix=("cls",)),
     (32, 48), r"between the patches depend on no pixel"),
    # XCiT: softmax over (head_dim x head_dim) channels; at 128x128 px, 8x8 = 64 patch tokens = head_dim
    # a hybrid ResNet stem's tokens are 32 px apart: patch_size=16 is wrong, though its grid has as many rows
    ("hybrid-wrong-patch-size",
     lambda: vitscope.wrap(timm_hybrid(), blocks="blocks.*", attn="attn", num_heads=3, patch_size=16,
                           image_size=224, dynamic_size=True), (128, 96), r"measured 1 prefix \+ 4x3 patches"),
    ("xcit-head-dim-equals-tokens",
     lambda: vitscope.wrap(_xcit((128, 128)), blocks="blocks.*", attn="attn", num_heads=2, patch_size=16,
                           image_size=128, prefix=()), (128, 128), r"softmax is not over the tokens"),
    ("xcit-zero-declaration",
     lambda: vitscope.wrap(_xcit((128, 128)), blocks="blocks.*", attn="attn", num_heads=2, patch_size=16,
                           image_size=128), (128, 128), r"softmax is not over the tokens"),
    # the case: through the timm adapter at 112x144 (1 + 7x9 = 64 = head_dim as it declares [CLS])
    ("xcit-load-112x144", lambda: vitscope.load(_xcit((112, 144))), (112, 144),
     r"softmax is not over the tokens|measured 0 prefix \+ 7x9 patches"),
    ("vitmae-wrapped-shuffles", _mae_wrapped, (32, 32), r"two identical images give different tokens"),
    ("linear-attention",
     lambda: vitscope.wrap(LinearViT().eval(), blocks="layers.*", num_heads=2, patch_size=PATCH, image_size=32),
     (32, 32), r"token softmax attention only"),
]


@pytest.mark.parametrize(("make", "size", "match"), [g[1:] for g in GUARDS], ids=[g[0] for g in GUARDS])
def test_guard_fires(make: Callable[[], Any], size: tuple[int, int], match: str) -> None:
    vit = make()
    with pytest.raises(CaptureError, match=match) as err:
        vitscope.capture(vit, _pixels(size, batch=1))
    assert "\n" not in str(err.value)
    module = vit.module if isinstance(vit, vitscope.VitModel) else vit
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())  # nothing left hooked


# --------------------------------------------------------------------------------- suffix in layout/attentions
def test_token_layout_with_suffix() -> None:
    lay = TokenLayout(("cls", "register"), (2, 3), suffix=("det",) * 2)
    assert lay.num_tokens == 2 + 6 + 2 and lay.patch_slice == slice(2, 8)
    assert lay.query_ids("mean") == list(range(2, 8))  # patches only, no suffix token
    assert lay.token_index("det:1") == 9 and lay.token_index((1, 2)) == 7 and lay.token_index(-1) == 9
    with pytest.raises(vitscope.VitscopeError, match="2 det tokens"):
        lay.token_index("det:2")


def test_attentions_suffix_round_trip_and_grid(tmp_path: Any) -> None:
    torch.manual_seed(0)
    N = 1 + 6 + 2
    w = torch.softmax(torch.randn(1, 1, 2, N, N), dim=-1)
    attn = Attentions(weights=w, prefix=("cls",), grid=(2, 3), patch_size=(8, 8), image_size=(16, 24),
                      layers=(0,), heads=(0, 1), queries=None, num_layers=1, num_heads=2, suffix=("det", "det"))
    grid = attn.to_grid(w[0, 0, :, 0])  # (heads, 2, 3): the patch columns 1..6, not the det tokens
    torch.testing.assert_close(grid, w[0, 0, :, 0, 1:7].reshape(2, 2, 3))
    back = Attentions.load(attn.save(tmp_path / "a.npz"))
    assert back.suffix == ("det", "det") and back.num_tokens == N
    torch.testing.assert_close(back.weights, w)
    r = w[0, :, 0].double()  # (B=1, N, N) token matrix
    torch.testing.assert_close(map_from_matrix(r, ("cls",), (2, 3), "cls", ("det", "det")),
                               r[:, 0, 1:7].reshape(1, 2, 3))


def test_yolos_maps_read_the_patch_columns() -> None:
    """[CLS] and rollout maps of a model with suffix tokens: the patch columns (1..P), never the det tokens."""
    b = _yolos("YolosModel")
    px = _pixels((32, 48), batch=1)
    attn = vitscope.capture(b.model, px)
    P = attn.num_patches
    cls = vitscope.maps(b.model, px, "cls", renormalize=False).map
    torch.testing.assert_close(cls[0], attn.weights[-1, 0, :, 0, 1:1 + P].mean(0).reshape(4, 6), atol=1e-6, rtol=0)
    from vitscope.methods.rollout import rollout_matrix

    rollout = vitscope.maps(b.model, px, "rollout").map
    torch.testing.assert_close(rollout[0], rollout_matrix(attn)[0, 0, 1:1 + P].float().reshape(4, 6))
    flow = vitscope.maps(b.model, px, "flow").map
    assert flow.shape == (1, 4, 6) and bool(torch.isfinite(flow).all())


def test_vitmae_wrapped_with_the_suggested_fix_is_exact() -> None:
    """The fix the shuffle error gives (mask_ratio 0 and increasing noise) makes ViTMAE through `wrap` exact."""
    import transformers

    b = _hf("ViTMAEModel", lambda _size: transformers.ViTMAEConfig(**_hf_common()), mae=True)(16.0, (32, 32))
    module = b.module
    module.config.mask_ratio = 0.0
    P = 16

    def forward(m: nn.Module, x: torch.Tensor) -> Any:
        return m(pixel_values=x, noise=torch.arange(P, dtype=torch.float32).expand(len(x), P))

    vit = vitscope.wrap(module, blocks="layers.*", attn="attention", num_heads=2, patch_size=PATCH, image_size=32,
                        forward=forward)
    px = _pixels((32, 32), batch=2)
    attn = vitscope.capture(vit, px)
    ref, _ = b.reference(px)
    assert float(ref.amax(-1).mean()) > 0.2 and attn.prefix == ("cls",)
    torch.testing.assert_close(attn.weights, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- the probe's own memory
def test_large_inputs_are_probed_a_few_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe makes its images on demand and runs at most `_CHUNK_BYTES` of input per stopped forward pass
    (at 1024 px its 27 images made at once cost 340 MB and a chunk of 8 more: the first [CLS] capture of a
    ViT-B at 1024 px took 1.3 GB over the forward before, benchmarks/capture_memory.py), and measures the same
    layout as when every image runs in one pass."""
    import vitscope.capture.probe as P

    fid = FAMILIES[0].id
    size = SIZES["square"]
    b = built(fid, size)
    vit = b.model if isinstance(b.model, vitscope.VitModel) else vitscope.load(b.model)
    seen: list[int] = []
    tokens = P._tokens

    def counted(v: Any, images: Any) -> torch.Tensor:
        seen.append(len(images))
        return tokens(v, images)

    monkeypatch.setattr(P, "_tokens", counted)
    monkeypatch.setattr(P, "_CHUNK", 10**6)  # every image in one pass: the reference
    P._layouts.pop(vit.module, None)  # measured afresh, not from the cache
    whole = probe_layout(vit, (3, *size))
    assert len(seen) == 1 and seen[0] > 8
    count, seen[:] = seen[0], []
    monkeypatch.setattr(P, "_CHUNK_BYTES", 3 * size[0] * size[1] * 4)  # one float32 image's bytes
    P._layouts.pop(vit.module, None)
    small = probe_layout(vit, (3, *size))
    assert max(seen) == 1 and sum(seen) == count  # every probe image, one per pass
    assert (small.num_prefix, small.grid, small.num_suffix) == (whole.num_prefix, whole.grid, whole.num_suffix)
