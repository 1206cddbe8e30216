"""vitscope's own ViT: fused == explicit attention, equal to timm's ViT with the same weights, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_vit
from vitscope.models.vit import ViT, ViTConfig, count_parameters, load_vit, save_vit


@pytest.mark.parametrize("registers", [0, 4])
def test_fused_equals_manual_attention(registers: int) -> None:
    model = make_tiny_vit(num_registers=registers, image_size=(24, 40), seed=3)  # 3x5 grid: not square
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.set_fused_attn(True)
        fused = model.forward_features(x)
        model.set_fused_attn(False)
        manual = model.forward_features(x)
    assert fused.shape == (2, 1 + registers + 15, 32)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)
    assert all(not blk.attn.fused_attn for blk in model.blocks)


def test_attention_matches_hand_computation() -> None:
    """One attention module on 3 tokens, 1 head: softmax(q k^T / sqrt(d)) v, computed by hand."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=(8, 8), patch_size=4, dim=4, heads=1, depth=1, num_classes=2))
    attn = model.blocks[0].attn
    x = torch.randn(1, 3, 4)
    W, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    q, k, v = (x[0] @ W[i * 4:(i + 1) * 4].T + b[i * 4:(i + 1) * 4] for i in range(3))
    expected = torch.empty(3, 4)
    for i in range(3):
        logits = torch.tensor([float(q[i] @ k[j]) / 2.0 for j in range(3)])  # sqrt(head_dim=4) = 2
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        expected[i] = sum(p[j] * v[j] for j in range(3))
    expected = expected @ attn.proj.weight.detach().T + attn.proj.bias.detach()
    for fused in (True, False):
        attn.fused_attn = fused
        with torch.no_grad():
            torch.testing.assert_close(attn(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_matches_timm_vit_with_same_weights() -> None:
    """Same parameter names as timm's VisionTransformer: its forward is an independent reference."""
    timm = pytest.importorskip("timm")
    model = make_tiny_vit(image_size=(32, 32), seed=5)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5, global_pool="token",
        qkv_bias=True, mlp_ratio=4.0,
    ).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith("fc_norm")]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip_and_vitscope_load(tmp_path) -> None:
    import vitscope

    model = make_tiny_vit(num_registers=2, seed=7)
    model.cfg.labels = ("a", "b", "c", "d", "e")
    save_vit(model, tmp_path / "m", extra={"note": "hello"})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architecture"] == "vitscope.ViT" and cfg["note"] == "hello"
    loaded = load_vit(tmp_path / "m")
    assert loaded.cfg == model.cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    vit = vitscope.load(tmp_path / "m")
    assert vit.info.prefix == ("cls", "register", "register")
    assert vit.info.labels == ("a", "b", "c", "d", "e")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(x), model(x))
    assert count_parameters(loaded) == sum(p.numel() for p in model.parameters())


def test_load_vit_missing_files_is_one_line_error(tmp_path) -> None:
    from vitscope.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        load_vit(tmp_path)


def test_pos_interp_defaults_to_size_and_round_trips(tmp_path) -> None:
    model = make_tiny_vit(seed=2)
    assert model.cfg.pos_interp == "size"  # vitscope-trained models keep the exact-grid resampling
    model.cfg.pos_interp = "dino"
    save_vit(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["pos_interp"] == "dino"
    assert load_vit(tmp_path / "m").cfg.pos_interp == "dino"
    # A config.json written before pos_interp existed loads as "size".
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["pos_interp"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert load_vit(tmp_path / "m").cfg.pos_interp == "size"
    with pytest.raises(ValueError, match=r"pos_interp='area' is not one of 'size', 'dino'"):
        ViTConfig(pos_interp="area")  # type: ignore[arg-type]


@pytest.mark.parametrize("grid", [(8, 8), (4, 8), (12, 20), (8, 3)])
def test_pos_interp_modes(grid: tuple[int, int]) -> None:
    """"size" resamples to the exact grid; "dino" with DINO's scale factor (grid + 0.1) / training grid."""
    model = make_tiny_vit(image_size=(32, 32), patch=4, seed=4)  # trained on an 8x8 grid
    pos = model.pos_embed.detach()
    patch_pos = pos[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)  # (1, D, 8, 8)
    expected = {
        "size": F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False),
        "dino": F.interpolate(patch_pos, scale_factor=((grid[0] + 0.1) / 8, (grid[1] + 0.1) / 8), mode="bicubic"),
    }
    out = {}
    for mode in ("size", "dino"):
        model.cfg.pos_interp = mode  # type: ignore[assignment]
        with torch.no_grad():
            out[mode] = model.interpolate_pos_embed(*grid)
        assert out[mode].shape == (1, 1 + grid[0] * grid[1], 32)
        assert torch.equal(out[mode][:, :1], pos[:, :1])  # [CLS] position untouched
        if grid == (8, 8):
            assert out[mode] is model.pos_embed  # the training grid is never resampled
        else:
            ref = expected[mode].permute(0, 2, 3, 1).reshape(1, -1, 32)  # (1, rows*cols, D), row-major
            torch.testing.assert_close(out[mode][:, 1:], ref, atol=1e-6, rtol=0)
    if grid != (8, 8):
        assert (out["size"] - out["dino"]).abs().max() > 1e-3
