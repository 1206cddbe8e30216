"""timm adapter: capture equals timm's own unfused softmax, for every prefix layout timm has.

Each model is built with ``pretrained=False`` at a tiny size, saved to safetensors, and loaded back from that
file the way a user loads downloaded weights (``load_timm(name, checkpoint=path, **same_kwargs)``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import vitscope
from vitscope.adapters.timm import load_timm
from vitscope.capture import capture_full
from vitscope.capture.intercept import AttentionCall, observe_attention
from vitscope.errors import CheckpointError, NotAViTError, VitscopeError

timm = pytest.importorskip("timm")

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 5}

# (id, timm name, extra kwargs, expected prefix kinds in token order)
VARIANTS = [
    ("plain", "vit_tiny_patch16_224", {}, ("cls",)),
    ("reg4", "vit_tiny_patch16_224", {"reg_tokens": 4}, ("cls",) + ("register",) * 4),
    ("no_embed_class", "vit_tiny_patch16_224", {"no_embed_class": True, "reg_tokens": 2},
     ("cls", "register", "register")),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", {}, ("cls", "dist")),
    ("qk_norm", "vit_tiny_patch16_224", {"qk_norm": True}, ("cls",)),
    ("no_cls", "vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg", "reg_tokens": 1},
     ("register",)),
]


def _sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with peaked attention (timm's init gives near-uniform rows, too easy to match)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv.weight") or name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.35 if "qkv" in name else 1.0))
            elif "q_norm.weight" in name or "k_norm.weight" in name:
                p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=g))
    return model


def _build(tmp_path: Path, name: str, extra: dict[str, Any], dynamic: bool = True) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, dynamic_img_size=dynamic, **TINY, **extra).eval()
    _sharpen(model)
    from safetensors.torch import save_file

    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def timm_unfused_attention(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """timm's own explicit softmax: a copy with ``fused_attn=False``; ``attn_drop``'s input is the probs."""
    ref = copy.deepcopy(model).eval()
    probs: list[torch.Tensor] = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_pre_hook(lambda _m, inp: probs.append(inp[0].detach().clone()))
    with torch.no_grad():
        ref(pixels)
    return torch.stack(probs)  # (L, B, H, N, N)


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize(("size", "batch"), [((32, 32), 1), ((32, 48), 3)], ids=["square-b1", "32x48-b3"])
@pytest.mark.parametrize(("vid", "name", "extra", "prefix"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_capture_matches_timm_unfused(tmp_path: Path, vid: str, name: str, extra: dict[str, Any],
                                      prefix: tuple[str, ...], size: tuple[int, int], batch: int) -> None:
    model, path = _build(tmp_path, name, extra)
    vit = load_timm(name, checkpoint=path, **TINY, **extra)
    assert vit.info.prefix == prefix
    assert vit.info.num_layers == 2 and vit.info.num_heads == 4 and vit.info.patch_size == (8, 8)
    pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))

    res = capture_full(vit, pixels)
    ref = timm_unfused_attention(model, pixels)
    attn = res.attentions
    assert attn.grid == (size[0] // 8, size[1] // 8)
    assert attn.weights.shape == ref.shape
    assert ref.amax() > 0.5  # peaked rows: a wrong token order or scale would not match
    torch.testing.assert_close(attn.weights, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(res.output, model(pixels))  # same weights loaded; capture alters nothing
        assert torch.equal(res.output, vit(pixels))


def test_kernel_value_and_output_match_unfused(tmp_path: Path) -> None:
    """The intercepted SDPA call's v and output give ``A V`` exactly as timm's unfused path computes it."""
    model, path = _build(tmp_path, "vit_tiny_patch16_224", {"reg_tokens": 2, "qk_norm": True})
    vit = load_timm("vit_tiny_patch16_224", checkpoint=path, **TINY, reg_tokens=2, qk_norm=True)
    pixels = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(2))
    probs = timm_unfused_attention(model, pixels)
    got: dict[int, AttentionCall] = {}
    with torch.no_grad(), observe_attention(vit.sites, lambda c: got.__setitem__(c.layer, c)) as check:
        vit(pixels)
        check()
    for layer in range(2):
        v, out = got[layer].v, got[layer].out  # (B, H, N, d) each
        assert v is not None and out is not None and got[layer].source == "sdpa"
        torch.testing.assert_close(out, probs[layer] @ v, atol=1e-5, rtol=0)


def test_flags_hooks_and_outputs_are_left_alone(tmp_path: Path) -> None:
    _, path = _build(tmp_path, "vit_tiny_patch16_224", {"reg_tokens": 4})
    vit = load_timm("vit_tiny_patch16_224", checkpoint=path, **TINY, reg_tokens=4)
    vit.module.blocks[0].attn.fused_attn = False  # a mix of flags must survive as it is
    vit.module.train()
    vit.module.blocks[1].eval()
    fused = [b.attn.fused_attn for b in vit.module.blocks]
    training = {n: m.training for n, m in vit.module.named_modules()}
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        vit.module.eval()
        plain = vit.module(pixels)
        for n, m in vit.module.named_modules():
            m.training = training[n]
    out = capture_full(vit, pixels, layers=[-1], queries="cls").output
    assert torch.equal(out, plain)
    assert [b.attn.fused_attn for b in vit.module.blocks] == fused
    assert {n: m.training for n, m in vit.module.named_modules()} == training
    assert _hook_count(vit.module) == 0


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom inside the forward pass")


def test_hooks_removed_after_exception(tmp_path: Path) -> None:
    _, path = _build(tmp_path, "vit_tiny_patch16_224", {})
    vit = load_timm("vit_tiny_patch16_224", checkpoint=path, **TINY)
    vit.module.blocks[1].mlp = _Boom()  # raises after layer 0's attention was captured
    vit.module.train()
    with pytest.raises(RuntimeError, match=r"boom"):
        vitscope.capture(vit, torch.randn(1, 3, 32, 32), token_norms=True)
    assert _hook_count(vit.module) == 0
    assert all(m.training for m in vit.module.modules())


def test_spec_string_and_module_wrapping(tmp_path: Path) -> None:
    model, path = _build(tmp_path, "deit_tiny_distilled_patch16_224", {})
    pixels = torch.randn(1, 3, 32, 32)
    via_spec = vitscope.capture(
        vitscope.load("timm:deit_tiny_distilled_patch16_224", checkpoint=str(path), **TINY), pixels)
    via_module = vitscope.capture(model, pixels)  # a timm module is detected without a declaration
    torch.testing.assert_close(via_spec.weights, via_module.weights, atol=0, rtol=0)
    assert via_module.prefix == ("cls", "dist") and via_module.dist_index == 1


def test_preprocess_from_pretrained_cfg(tmp_path: Path) -> None:
    vit = load_timm("vit_tiny_patch16_224", random_weights=True, **TINY)
    cfg = vit.module.pretrained_cfg
    prep = vit.info.preprocess
    assert prep.mean == tuple(cfg["mean"]) and prep.std == tuple(cfg["std"])
    assert prep.resample == cfg["interpolation"]
    assert prep.image_size == (32, 32)  # the size it was built at, not the cfg's 224
    assert prep.dynamic_size is True  # load_timm's default
    deit = load_timm("deit_tiny_distilled_patch16_224", random_weights=True, **TINY)
    assert deit.info.preprocess.mean == (0.485, 0.456, 0.406)
    one = load_timm("vit_tiny_patch16_224", random_weights=True, in_chans=1, **TINY)
    assert one.info.preprocess.channels == 1
    assert one.preprocess(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_fixed_size_model_says_so(tmp_path: Path) -> None:
    from PIL import Image

    vit = load_timm("vit_tiny_patch16_224", random_weights=True, dynamic_img_size=False, **TINY)
    assert vit.info.preprocess.dynamic_size is False
    with pytest.raises(VitscopeError, match=r"^images: .*32x32.*dynamic_img_size=True"):
        vitscope.capture(vit, torch.randn(1, 3, 32, 48))
    img = Image.new("RGB", (48, 32))
    with pytest.raises(VitscopeError, match=r"^size: "):
        vitscope.capture(vit, img, policy="native")
    attn = vitscope.capture(vit, img)  # the default policy resizes to 32x32
    assert attn.grid == (4, 4)


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    _, path = _build(tmp_path, "vit_tiny_patch16_224", {})
    with pytest.raises(CheckpointError, match=r"^checkpoint: .*does not fit") as err:
        load_timm("vit_tiny_patch16_224", checkpoint=path, **{**TINY, "depth": 3})
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"^checkpoint: .*size mismatch"):
        load_timm("vit_tiny_patch16_224", checkpoint=path, **{**TINY, "embed_dim": 64})
    with pytest.raises(CheckpointError, match=r"^checkpoint: checkpoint file not found"):
        load_timm("vit_tiny_patch16_224", checkpoint=tmp_path / "nope.safetensors", **TINY)


def test_checkpoint_resampled_to_another_size_and_classes_inferred(tmp_path: Path) -> None:
    model, path = _build(tmp_path, "vit_tiny_patch16_224", {})
    kwargs = {k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")}
    vit = load_timm("vit_tiny_patch16_224", checkpoint=path, img_size=48, **kwargs)
    assert vit.info.num_classes == 5  # from head.weight
    assert vit.module.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(vit.module.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_pth_checkpoint_with_module_prefix(tmp_path: Path) -> None:
    model, _ = _build(tmp_path, "vit_tiny_patch16_224", {})
    path = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    vit = load_timm("vit_tiny_patch16_224", checkpoint=path, **TINY)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit.module(pixels), model(pixels))


def test_unknown_model_is_one_line() -> None:
    with pytest.raises(VitscopeError, match=r"^model: timm has no model 'vit_tiny_patch16_22' \(did you mean") as err:
        load_timm("vit_tiny_patch16_22")
    assert "\n" not in str(err.value)


def test_pretrained_offline_says_how_to_pass_a_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail fast
    for how in ({}, {"pretrained": True}):  # pretrained by default, as on the command line
        with pytest.raises(CheckpointError, match=r"^model: .*offline.*`checkpoint=.*`random_weights=True`") as err:
            vitscope.load("timm:vit_tiny_patch16_224", **how, **TINY)
        assert "\n" not in str(err.value)
        assert "huggingface.co/timm/vit_tiny_patch16_224" in str(err.value)


def test_non_vit_timm_model_is_refused() -> None:
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    with pytest.raises(NotAViTError, match=r"^model: timm model ResNet has no transformer blocks") as err:
        vitscope.load(cnn)
    assert "\n" not in str(err.value)


def test_imagenet_labels_when_the_head_has_1000_classes() -> None:
    vit = load_timm("vit_tiny_patch16_224", random_weights=True, **{**TINY, "num_classes": 1000})
    assert vit.info.labels is not None and len(vit.info.labels) == 1000
    assert vit.info.labels[0].lower().startswith("tench")  # ImageNet class 0
    assert load_timm("vit_tiny_patch16_224", random_weights=True, **TINY).info.labels is None
