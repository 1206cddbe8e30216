"""Capture is exact for every ViT family vitscope reads, against each family's own explicit attention.

The families, their tiny random models and their references are in `tests/capture/families.py` (one table).
Only public API is used: ``vitscope.capture``, ``vitscope.wrap``, and ``capture_full`` for the model output.

Peaked attention (the reference's mean row maximum, batch 3 seed 1, 32x32 / 32x48 input), measured with each
family's q/k factor from the table (id factor: square wide):
    hf-vit 16: .62 .56             hf-deit 16: .62 .54              hf-dinov2 16: .61 .55
    hf-dinov2-registers 16: .59 .53  hf-clip 4: .69 .68             hf-siglip 2: .64 .61
    hf-dinov3 16: .57 .57          hf-beit 16: .63 .58              hf-beit-shared-bias 16: .63 .57
    hf-data2vec-vision 16: .63 .58 hf-vitmae 16: .63 .57            hf-vitmsn 16: .61 .56
    hf-ijepa 16: .67 .61           hf-aimv2 16: .53 .47             hf-aimv2-no-head 16: .52 .48
    hf-aimv2-learned 16: .60 (square only)
    timm-vit 16: .64 .57           timm-vit-reg4 16: .56 .55        timm-deit-distilled 16: .61 .57
    timm-eva-dinov3(-qkvb) 16: .57 .55  timm-eva02 16: .63 .57      timm-vit-qknorm 2: .70 .63
    timm-eva-rope 16: .57 .56      timm-eva-rope-mixed 16: .59 .54  timm-eva-rope-reg1-gap 16: .63 .55
    timm-beit 16: .67 .57          timm-relpos 4: .74 .71           timm-naflexvit 16: .57 .53
    torchvision-vit 2: .43 (square only)  open-clip-vit 2: .41 .37
    vitscope-vit 16: .59 .55       vitscope-vit-reg4 16: .55 .51    custom-wrap 4: .70 .68
    hf-blip 16: .60 .56            hf-blip2 16: .62 .55             hf-owlvit 4: .69 .68
    hf-owlv2 4: .69 .68            hf-chinese-clip 4: .69 .68       hf-dpt 16: .58 .53
    hf-vitpose 16: .52 .49         hf-idefics3 16: .62 .55          hf-smolvlm 16: .62 .55
    hf-mlcd 4: .64 .64             timm-vit-hybrid 16: .57 .51      timm-qwen3-vit 16: .62 .58
    timm-gemma4-vit 1: .83 .79 (q/k-normed: peaked unsharpened)     timm-deepseek-vit 16: .61 .59
With factor 8 most stayed at .13-.20, with 1 (the init) at .06-.13: near uniform over 17-29 tokens.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from torch import nn

import vitscope
from tests.capture.families import BY_ID, FAMILIES, FAMILY_DOCS, SIZES, Built, Family, built, main_tensor
from tests.conftest import KernelQueries
from vitscope.capture import capture_full
from vitscope.capture.intercept import sample_rows
from vitscope.errors import VitscopeError

IDS = [f.id for f in FAMILIES]
CASES = [("square", 1), ("square", 3), ("wide", 1), ("wide", 3)]


def _pixels(size: tuple[int, int], batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@cache
def _reference(fid: str, sname: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = SIZES[sname]
    return built(fid, size).reference(_pixels(size, batch))


def _family(fid: str, sname: str) -> tuple[Family, Built]:
    fam = BY_ID[fid]
    if fam.square_only and sname != "square":
        pytest.skip(f"{fid} takes one square size only (see test_square_only_refuses_other_sizes)")
    return fam, built(fid, SIZES[sname])


def _not_the_models_own(hooks: Any) -> bool:
    """Hooks other than the ones transformers installs at construction (VitPose's output recorders)."""
    return any(not str(getattr(h, "__module__", "")).startswith("transformers") for h in hooks.values())


def _hooked(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules()
            if _not_the_models_own(m._forward_hooks) or _not_the_models_own(m._forward_pre_hooks)]


def _modes_active() -> int:
    return torch._C._len_torch_function_stack()


# ----------------------------------------------------------------------------------------- the references
@pytest.mark.parametrize("fid", IDS)
def test_reference_is_the_models_own_computation(fid: str) -> None:
    """The reference's model gives the capture model's output (eager vs SDPA, unfused vs fused, slow vs fast)."""
    sname = "square" if BY_ID[fid].square_only else "wide"
    fam, b = _family(fid, sname)
    ref, ref_out = _reference(fid, sname, 3)
    torch.testing.assert_close(ref_out, b.forward(_pixels(SIZES[sname], 3)), atol=1e-5, rtol=1e-5)
    rows, cols = SIZES[sname][0] // fam.patch, SIZES[sname][1] // fam.patch
    n = len(fam.prefix) + rows * cols
    assert ref.shape == (fam.depth, 3, fam.heads, n, n)
    assert len(b.blocks) == fam.depth
    sums = ref.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert ref.amax(-1).mean() > 0.2  # peaked rows (values in the module docstring)
    keys = ref.movedim(-1, 0).reshape(n, -1)  # each key token's column, over layers, images, heads, queries
    gaps = torch.cdist(keys, keys, p=float("inf")) + torch.eye(n)
    assert gaps.min() > 1e-3  # no two tokens interchangeable: a capture that swaps any two would fail
    if not fam.square_only:  # the same rows with the 4x6 patch grid read column-major differ: layout matters
        p = len(fam.prefix)
        perm = list(range(p)) + [p + r * cols + c for c in range(cols) for r in range(rows)]
        assert (ref - ref[..., perm, :][..., perm]).abs().amax() > 0.05


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("mode", ["all", "cls-mean"])
@pytest.mark.parametrize(("sname", "batch"), CASES, ids=[f"{s}-b{b}" for s, b in CASES])
@pytest.mark.parametrize("fid", IDS)
def test_capture_equals_reference(fid: str, sname: str, batch: int, mode: str) -> None:
    fam, b = _family(fid, sname)
    size = SIZES[sname]
    pixels = _pixels(size, batch)
    ref, _ = _reference(fid, sname, batch)  # (L, B, H, N, N)
    assert ref.amax(-1).mean() > 0.2

    if mode == "all":
        attn = vitscope.capture(b.model, pixels)
        expected = ref
    else:
        # [CLS] row, heads averaged; a model without [CLS] (SigLIP, I-JEPA, AIMv2): the first token's row
        attn = vitscope.capture(b.model, pixels, queries="cls" if fam.has_cls else [0], heads="mean")
        expected = ref[:, :, :, :1].mean(dim=2, keepdim=True)

    rows, cols = size[0] // fam.patch, size[1] // fam.patch
    assert attn.prefix == fam.prefix
    assert attn.grid == (rows, cols)
    assert attn.weights.dtype == torch.float32
    assert attn.weights.shape[0] == fam.depth  # every layer captured
    assert attn.weights.shape[-1] == len(attn.prefix) + rows * cols == ref.shape[-1]
    assert attn.weights.shape == expected.shape
    sums = attn.weights.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-4, rtol=0)
    diff = (attn.weights - expected).abs().max().item()
    assert torch.allclose(attn.weights, expected, atol=1e-5), f"{fid} {sname} b{batch} {mode}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("fid", IDS)
def test_the_pass_ends_at_the_last_layers_kernel_on_the_verified_rows(fid: str) -> None:
    """Once a whole run at a size has shown the last layer's module makes one call, `capture` ends the pass at
    that call, and a family whose attention is torch's SDPA computes only the verified rows there (its bias or
    mask sliced to them: BEiT, relpos, EVA's RoPE before the call); every family's rows still equal its
    reference. A family without SDPA (eager softmax, nn.MultiheadAttention) runs as before."""
    sname = "square" if BY_ID[fid].square_only else "wide"
    _fam, b = _family(fid, sname)
    size = SIZES[sname]
    pixels = _pixels(size, 3)
    ref, _ = _reference(fid, sname, 3)  # (L, B, H, N, N)
    first = vitscope.capture(b.model, pixels, layers=[-1], queries=[0])  # a whole run of the last module at N
    with KernelQueries() as whole:
        capture_full(b.model, pixels, layers=[-1], queries=[0])  # the whole model, every kernel whole
    with KernelQueries() as early:
        attn = vitscope.capture(b.model, pixels, layers=[-1], queries=[0])
    expected = ref[-1:, :, :, :1]  # (1, B, H, 1, N)
    assert expected.amax(-1).mean() > 0.2  # peaked
    torch.testing.assert_close(first.weights, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn.weights, first.weights, atol=1e-6, rtol=0)
    N = ref.shape[-1]
    blocks = [q for q in whole.queries if q[-2] == N]  # the blocks' SDPA calls (not a pooling head's)
    few = len(sample_rows(N, [0]))
    assert few < N
    if blocks:  # the last block's call got the verified rows only, after the other blocks' whole calls
        assert early.queries == [*blocks[:-1], (*blocks[-1][:-2], few, blocks[-1][-1])]
    else:
        assert early.queries == []
    assert _hooked(b.module) == [] and _modes_active() == 0


@pytest.mark.parametrize("fid", [f.id for f in FAMILIES if not f.has_cls])
def test_cls_query_without_cls_names_the_argument(fid: str) -> None:
    b = built(fid, SIZES["square"])
    with pytest.raises(VitscopeError, match=r"^queries: ") as err:
        vitscope.capture(b.model, _pixels(SIZES["square"], 1), queries="cls")
    assert "\n" not in str(err.value)
    assert _hooked(b.module) == [] and _modes_active() == 0


@pytest.mark.parametrize("fid", [f.id for f in FAMILIES if f.source in ("hf", "timm", "vitscope")])
def test_capture_reads_the_explicit_path_too(fid: str) -> None:
    """The reference's own model (eager transformers, ``fused_attn=False`` timm): an explicit softmax, same rows."""
    sname = "square" if BY_ID[fid].square_only else "wide"
    fam, b = _family(fid, sname)
    assert b.explicit is not None
    ref, _ = _reference(fid, sname, 3)
    attn = vitscope.capture(b.explicit, _pixels(SIZES[sname], 3))
    assert attn.prefix == fam.prefix and attn.weights.shape == ref.shape
    diff = (attn.weights - ref).abs().max().item()
    assert torch.allclose(attn.weights, ref, atol=1e-5), f"{fid} explicit path: max |diff| {diff:.2e}"


@pytest.mark.parametrize("fid", [f.id for f in FAMILIES if f.source == "hf"])
def test_saved_folder_loads_and_captures_the_same(fid: str) -> None:
    """``vitscope.load("hf:<folder>")`` on what save_pretrained wrote gives the reference too."""
    sname = "square" if BY_ID[fid].square_only else "wide"
    _, b = _family(fid, sname)
    assert b.folder is not None
    vit = vitscope.load(f"hf:{b.folder}")
    attn = vitscope.capture(vit, _pixels(SIZES[sname], 3))
    ref, _ = _reference(fid, sname, 3)
    assert attn.prefix == BY_ID[fid].prefix
    assert attn.weights.shape == ref.shape
    diff = (attn.weights - ref).abs().max().item()
    assert torch.allclose(attn.weights, ref, atol=1e-5), f"{fid} loaded from its folder: max |diff| {diff:.2e}"


@pytest.mark.parametrize("fid", IDS)
def test_layer_head_and_patch_selections_are_slices(fid: str) -> None:
    """The last layer, the last head, two patch rows (bottom-right, then top-left): slices of the reference."""
    fam = BY_ID[fid]
    sname = "square" if fam.square_only else "wide"
    _, b = _family(fid, sname)
    rows, cols = SIZES[sname][0] // fam.patch, SIZES[sname][1] // fam.patch
    ref, _ = _reference(fid, sname, 3)
    attn = vitscope.capture(b.model, _pixels(SIZES[sname], 3), layers=[-1], heads=[fam.heads - 1],
                            queries=[(rows - 1, cols - 1), (0, 0)])
    p = len(fam.prefix)
    assert attn.layers == (fam.depth - 1,)
    assert attn.queries == (p + rows * cols - 1, p)
    expected = ref[-1:, :, -1:][:, :, :, [p + rows * cols - 1, p]]
    assert attn.weights.shape == expected.shape
    diff = (attn.weights - expected).abs().max().item()
    assert torch.allclose(attn.weights, expected, atol=1e-5), f"{fid} selections: max |diff| {diff:.2e}"


# ------------------------------------------------------------------------------- outputs, hooks and modes
@pytest.mark.parametrize("fid", IDS)
def test_capture_leaves_outputs_bit_identical(fid: str) -> None:
    fam = BY_ID[fid]
    sname = "square" if fam.square_only else "wide"
    _, b = _family(fid, sname)
    pixels = _pixels(SIZES[sname], 3, seed=2)
    before = b.forward(pixels)
    from vitscope.capture import capture_full

    res = capture_full(b.model, pixels)
    assert torch.equal(main_tensor(res.output), before), f"{fid}: the output changed inside capture"
    assert torch.equal(b.forward(pixels), before), f"{fid}: capture left the model changed"


def _state(module: nn.Module) -> dict[str, Any]:
    """Training flags, timm's ``fused_attn`` flags and transformers' attention backend: capture changes none."""
    out: dict[str, Any] = {}
    for name, m in module.named_modules():
        out[f"{name}.training"] = m.training
        if hasattr(m, "fused_attn"):
            out[f"{name}.fused_attn"] = m.fused_attn
    config = getattr(module, "config", None)
    if config is not None:
        out["config._attn_implementation"] = config._attn_implementation
        out["config.mask_ratio"] = getattr(config, "mask_ratio", None)
    return out


def _boom(_m: nn.Module, _args: Any) -> None:
    raise RuntimeError("boom in the last block")


@pytest.mark.parametrize("fid", IDS)
def test_no_hooks_or_function_modes_left(fid: str) -> None:
    fam = BY_ID[fid]
    _, b = _family(fid, "square")
    pixels = _pixels(SIZES["square"], 1, seed=3)
    assert _hooked(b.module) == [] and _modes_active() == 0
    b.module.train()  # a mix of training flags must come back as it was
    b.blocks[0].eval()
    state = _state(b.module)
    try:
        vitscope.capture(b.model, pixels, queries="cls" if fam.has_cls else None, heads="mean")
        assert _hooked(b.module) == []
        assert _modes_active() == 0
        assert _state(b.module) == state

        handle = b.blocks[-1].register_forward_pre_hook(_boom)
        try:
            with pytest.raises(RuntimeError, match="boom in the last block"):
                vitscope.capture(b.model, pixels)
        finally:
            handle.remove()
        assert _hooked(b.module) == []
        assert _modes_active() == 0
        assert _state(b.module) == state

        seen: list[int] = []  # a hook of the user's own is run, and left in place
        user = b.blocks[0].register_forward_hook(lambda _m, _a, _o: seen.append(1))
        try:
            vitscope.capture(b.model, pixels)
            assert seen == [1]
            assert _hooked(b.module) == [name for name, m in b.module.named_modules() if m is b.blocks[0]]
        finally:
            user.remove()
    finally:
        b.module.eval()


# ----------------------------------------------------------------------------------------- family details
def test_vitmae_capture_is_deterministic_and_drops_no_token() -> None:
    """ViT-MAE shuffles and drops 75% of the patches at random; capture must see every patch in place."""
    b = built("hf-vitmae", SIZES["wide"])
    assert b.module.config.mask_ratio == 0.75  # the model keeps its own setting
    pixels = _pixels(SIZES["wide"], 3, seed=4)
    first = vitscope.capture(b.model, pixels).weights
    second = vitscope.capture(b.model, pixels).weights
    assert torch.equal(first, second)
    assert first.shape[-1] == 1 + 4 * 6
    assert b.module.config.mask_ratio == 0.75


def test_square_only_refuses_other_sizes() -> None:
    """torchvision's VisionTransformer asserts its one image size: a 32x48 input must fail in one line."""
    b = built("torchvision-vit", SIZES["square"])
    with pytest.raises(Exception) as err:  # vitscope's error or torchvision's own
        vitscope.capture(b.model, _pixels(SIZES["wide"], 1))
    msg = str(err.value)
    assert "\n" not in msg.strip() and "48" in msg, msg
    assert _hooked(b.module) == [] and _modes_active() == 0


def _swin() -> nn.Module:
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                             window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5)


def _hiera() -> nn.Module:
    import timm

    return timm.create_model("hiera_tiny_224", pretrained=False, img_size=64, embed_dim=16, num_heads=1,
                             stages=(1, 1, 1, 1), num_classes=5)


def _samvit() -> nn.Module:
    import timm

    return timm.create_model("samvit_base_patch16", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, window_size=2, global_attn_indexes=(), neck_chans=16,
                             num_classes=5)


def _samvit_one_global() -> nn.Module:
    import timm

    return timm.create_model("samvit_base_patch16", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, window_size=2, global_attn_indexes=(1,), neck_chans=16,
                             num_classes=5)


@pytest.mark.parametrize(("build", "side"), [(_swin, 32), (_hiera, 64), (_samvit, 32), (_samvit_one_global, 32)],
                         ids=["swin", "hiera", "samvit", "samvit-window-then-global"])
def test_windowed_attention_is_refused(build: Any, side: int) -> None:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build().eval()
    with pytest.raises(VitscopeError) as err:
        vitscope.capture(vitscope.wrap(model), _pixels((side, side), 1))
    msg = str(err.value)
    assert "\n" not in msg and "window" in msg.lower(), msg
    assert _hooked(model) == [] and _modes_active() == 0


def test_compiled_module_is_refused_in_one_line() -> None:
    b = built("vitscope-vit", SIZES["square"])
    compiled = torch.compile(b.module)  # nothing is compiled until it is called
    with pytest.raises(VitscopeError) as err:
        vitscope.capture(vitscope.wrap(compiled), _pixels(SIZES["square"], 1))
    msg = str(err.value)
    assert "\n" not in msg and "compile" in msg.lower(), msg


def test_family_docs_list_every_family_once() -> None:
    assert [d[0] for d in FAMILY_DOCS] == IDS and len(set(IDS)) == len(IDS)
    assert {d[1] for d in FAMILY_DOCS} == {"hf", "timm", "torchvision", "open_clip", "vitscope", "custom"}
    assert all(isinstance(d[2], str) and d[2] for d in FAMILY_DOCS)
