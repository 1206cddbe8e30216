"""The generic transformers route: composite models (text + vision, detection, depth, VLMs) are read through the
vision transformer `vitscope.adapters.hf._find_tower` finds in them, and what a model cannot take is refused in
one line.

Each composite is a tiny random model saved with ``save_pretrained``; the reference is the same folder loaded
with ``attn_implementation="eager"``, its vision tower run alone with ``output_attentions=True``. q/k are
sharpened (`tests.capture.families.sharpen`, factor 16) so the reference's mean row maximum is above 0.2 (asserted):
near-uniform attention would hide a wrong capture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

import vitscope
from tests.capture.families import sharpen
from vitscope.adapters.hf import _find_tower
from vitscope.capture import capture_full
from vitscope.errors import VitscopeError, VitscopeWarning

transformers = pytest.importorskip("transformers")

V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
T = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)


def _clip() -> Any:
    return transformers.CLIPConfig(text_config=T, vision_config=V, projection_dim=8)


def _blip() -> Any:
    return transformers.BlipConfig(text_config=T, vision_config={**V, "initializer_range": 0.02})


def _owlvit() -> Any:
    return transformers.OwlViTConfig(text_config=T, vision_config=V, projection_dim=8)


def _owlv2() -> Any:
    return transformers.Owlv2Config(text_config=T, vision_config=V, projection_dim=8)


def _chinese_clip() -> Any:
    return transformers.ChineseCLIPConfig(text_config=T, vision_config=V, projection_dim=8)


def _idefics3() -> Any:
    text = dict(T, num_key_value_heads=2)
    return transformers.Idefics3Config(vision_config=V, text_config=text, scale_factor=2)


def _dpt() -> Any:
    return transformers.DPTConfig(**V, backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 8], fusion_hidden_size=8,
                                  reassemble_factors=[1, 1], head_hidden_size=8)


#: (id, class, config, where the vision transformer sits, whether it takes any input size)
COMPOSITES: list[tuple[str, str, Callable[[], Any], str, bool]] = [
    ("clip", "CLIPModel", _clip, "vision_model", True),
    ("blip-captioning", "BlipForConditionalGeneration", _blip, "vision_model", True),
    ("owlvit-detection", "OwlViTForObjectDetection", _owlvit, "owlvit.vision_model", True),
    ("owlv2-detection", "Owlv2ForObjectDetection", _owlv2, "owlv2.vision_model", True),
    ("chinese-clip", "ChineseCLIPModel", _chinese_clip, "vision_model", True),
    ("idefics3", "Idefics3Model", _idefics3, "vision_model", True),
    ("dpt-depth", "DPTForDepthEstimation", _dpt, "dpt", False),  # its neck folds tokens into a square grid
]
IDS = [c[0] for c in COMPOSITES]
BY_ID = {c[0]: c for c in COMPOSITES}


@cache
def _built(cid: str, root: str) -> tuple[Any, Any, Path]:
    _, cls_name, config, _, _ = BY_ID[cid]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = sharpen(cls(config()).eval(), 16.0)
    folder = Path(root) / cid
    model.save_pretrained(folder)
    eager = cls.from_pretrained(folder, attn_implementation="eager").eval()
    return model, eager, folder


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("composites"))


def _reference(eager: Any, path: str, pixels: torch.Tensor) -> torch.Tensor:
    tower = eager.get_submodule(path)
    kw: dict[str, Any] = {"output_attentions": True}
    if "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters:
        kw["interpolate_pos_encoding"] = True
    with torch.no_grad():
        out = tower(pixel_values=pixels, **kw)
    return torch.stack([a.float() for a in out.attentions])  # (L, B, H, N, N)


@pytest.mark.parametrize(("size", "batch"), [((32, 32), 3), ((32, 48), 1)], ids=["square-b3", "wide-b1"])
@pytest.mark.parametrize("cid", IDS)
def test_composite_reads_its_vision_tower(cid: str, size: tuple[int, int], batch: int, root: str) -> None:
    """The model object and its saved folder, zero declarations: exact against the eager tower's attention."""
    _, _, _, path, any_size = BY_ID[cid]
    model, eager, folder = _built(cid, root)
    assert _find_tower(model) == path
    pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    if size != (32, 32) and not any_size:  # the model's own head fails on this size: refused where it runs
        with pytest.raises(VitscopeError, match=r"^size: .*fails on 32x48 inputs") as err:
            capture_full(model, pixels)
        assert "\n" not in str(err.value)
        # `capture` ends the pass at the last attention, before the head: the tower's attention is exact
    ref = _reference(eager, path, pixels)
    assert ref.amax(-1).mean() > 0.2  # peaked rows: a wrong capture cannot pass as near-uniform
    for source in (model, f"hf:{folder}"):
        vit = vitscope.load(source)
        attn = vitscope.capture(vit, pixels)
        assert attn.grid == (size[0] // 8, size[1] // 8)
        assert attn.weights.shape == ref.shape
        diff = (attn.weights - ref).abs().max().item()
        assert torch.allclose(attn.weights, ref, atol=1e-5), f"{cid} via {source!r}: max |diff| {diff:.2e}"


def test_a_model_without_a_vision_transformer_is_refused_before_loading(tmp_path: Path) -> None:
    """A text model's folder holds no weights here: the refusal comes from the structure, before any load."""
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(VitscopeError, match="no vision transformer") as err:
        vitscope.load(f"hf:{tmp_path}")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------ what a model cannot take: one line
def _clip_classifier() -> Any:
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=T, vision_config=V, num_labels=3)
    return transformers.CLIPForImageClassification(cfg).eval()


def _aimv2_learned() -> Any:
    torch.manual_seed(0)
    return transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**V, is_native=False)).eval()


def _vitpose() -> Any:
    from tests.capture.families import _vitpose_cfg

    torch.manual_seed(0)
    return transformers.VitPoseForPoseEstimation(_vitpose_cfg((32, 32))).eval()


#: models whose learned position table fixes their input size (and that cannot interpolate it): another size is a
#: one-line error naming ``size`` (today transformers' own ValueError / RuntimeError escaped)
FIXED_SIZE: list[tuple[str, Callable[[], Any]]] = [
    ("clip-for-image-classification", _clip_classifier), ("aimv2-learned", _aimv2_learned), ("vitpose", _vitpose),
]


@pytest.mark.parametrize("build", [f[1] for f in FIXED_SIZE], ids=[f[0] for f in FIXED_SIZE])
def test_fixed_size_model_refuses_another_size_in_one_line(build: Callable[[], Any]) -> None:
    model = build()
    vit = vitscope.load(model)
    assert not vit.info.preprocess.dynamic_size
    vitscope.capture(vit, torch.randn(1, 3, 32, 32))  # its own size works
    with pytest.raises(VitscopeError, match=r"^size: .*32x32 inputs only.*got 32x48") as err:
        vitscope.capture(vit, torch.randn(1, 3, 32, 48))
    assert "\n" not in str(err.value)
    assert [n for n, m in model.named_modules() if any(
        not str(getattr(h, "__module__", "")).startswith("transformers") for h in m._forward_hooks.values())] == []


# ----------------------------------------------------------------------------- windowed layers, refused per layer
def _hf_sam() -> Any:
    cfg = transformers.SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                       patch_size=8, mlp_dim=64, window_size=2, global_attn_indexes=[1],
                                       output_channels=16, initializer_range=0.02)  # (its default 1e-10: uniform)
    torch.manual_seed(0)
    return sharpen(transformers.SamVisionModel(cfg).eval(), 16.0)


def _hf_vitdet() -> Any:
    cfg = transformers.VitDetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                    pretrain_image_size=32, patch_size=8, mlp_ratio=2, window_size=2,
                                    window_block_indices=[0], use_relative_position_embeddings=True)
    torch.manual_seed(0)
    return transformers.VitDetModel(cfg).eval()


def _timm_samvit() -> Any:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("samvit_base_patch16", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, window_size=2, global_attn_indexes=(1,), neck_chans=16,
                             num_classes=5).eval()


#: SAM's image encoder (transformers, timm) and ViTDet: layer 0 windowed (2x2 windows), layer 1 global
WINDOWED: list[tuple[str, Callable[[], Any]]] = [("hf-sam", _hf_sam), ("hf-vitdet", _hf_vitdet),
                                                 ("timm-samvit", _timm_samvit)]


def _user_hooks(model: Any) -> list[str]:
    return [n for n, m in model.named_modules() if any(
        not str(getattr(h, "__module__", "")).startswith("transformers")
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))]


@pytest.mark.parametrize("build", [w[1] for w in WINDOWED], ids=[w[0] for w in WINDOWED])
def test_windowed_layers_are_listed_and_refused_by_default(build: Callable[[], Any]) -> None:
    """Loaded (today: refused whole, or unsupported), its layers listed; all layers (the default) is refused in one
    line naming the windowed layer and the ``layers=[1]`` to select instead; layer 0 alone too."""
    model = build()
    vit = vitscope.load(model)
    assert vit.info.layer_kinds == ("windowed", "global")
    assert vit.info.global_layers == (1,) and vit.info.windowed_layers == (0,)
    assert "global layers [1], windowed layers [0]" in vit.info.describe()
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(VitscopeError, match=r"^layers: every layer is selected by default, and layers \[0\] .* local "
                       r"windows.*layers=\[1\] \(CLI: --layers 1\)") as err:
        vitscope.capture(vit, pixels)
    assert "\n" not in str(err.value)
    with pytest.raises(VitscopeError, match=r"^layers: layers \[0\] .* local windows"):
        vitscope.capture(vit, pixels, layers=[0])
    assert _user_hooks(model) == []


def test_sam_global_layer_is_exact_and_a_windowed_call_is_measured(tmp_path: Path) -> None:
    """SAM's global layer against its own eager attention; with the declaration removed, the windowed layer is
    still refused, from what its attention call measures (4 windows of 4 keys per image, not 16 tokens)."""
    import dataclasses

    model = _hf_sam()
    model.save_pretrained(tmp_path)
    eager = transformers.SamVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = eager(pixel_values=pixels, output_attentions=True).attentions[1].float()  # (B*H, N, N), batch-major
    ref = ref.reshape(3, 2, 16, 16)
    assert ref.amax(-1).mean() > 0.2  # peaked rows
    for source in (model, f"hf:{tmp_path}"):
        attn = vitscope.capture(vitscope.load(source), pixels, layers=[1])
        assert attn.weights.shape == (1, 3, 2, 16, 16)
        diff = (attn.weights[0] - ref).abs().max().item()
        assert torch.allclose(attn.weights[0], ref, atol=1e-5), f"SAM global layer via {source!r}: {diff:.2e}"
    vit = vitscope.load(model)
    undeclared = vitscope.adapters.VitModel(model, dataclasses.replace(vit.info, layer_kinds=()), vit.sites,
                                            forward=vit._forward)
    # the layout probe (which needs (B, N, C) tokens at the first attention module) or the windowed-call check
    # refuses it, whichever runs first: never a map
    with pytest.raises(VitscopeError, match=r"^(layers: layer 0 attends within 4 local windows of 4 tokens|model: "
                       r"the first attention module got no \(batch, tokens, channels\) tensor)") as err:
        vitscope.capture(undeclared, pixels[:2])
    assert "\n" not in str(err.value)
    assert _user_hooks(model) == []


def test_sam2_hiera_is_refused_in_one_line() -> None:
    """``vitscope.load(timm.create_model("sam2_hiera_tiny"))`` raised a TypeError inside the adapter."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("sam2_hiera_tiny", pretrained=False, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1),
                              global_att_blocks=(1,))
    with pytest.raises(VitscopeError, match=r"^model: HieraDet \(SAM2's Hiera\) attends within local windows") as err:
        vitscope.load(model)
    assert "\n" not in str(err.value)


def test_cli_info_lists_global_and_windowed_layers(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from vitscope.cli import app

    _hf_sam().save_pretrained(tmp_path)
    res = CliRunner().invoke(app, ["info", "--model", f"hf:{tmp_path}", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    assert data["global_layers"] == [1] and data["windowed_layers"] == [0]
    res = CliRunner().invoke(app, ["info", "--model", f"hf:{tmp_path}"])
    assert res.exit_code == 0 and "global layers [1], windowed layers [0]" in res.output, res.output


# --------------------------------------------------------------------- Pixtral: one image per pass (packed batch)
def test_pixtral_one_image_exact_at_its_own_aspect_and_a_batch_refused(tmp_path: Path) -> None:
    """Pixtral packs a batch into one sequence (a block-diagonal mask): one image is exact against its eager
    attention, square and non-square (RoPE: any size); several images are refused in one line."""
    cfg = transformers.PixtralVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8, head_dim=16)
    torch.manual_seed(0)
    model = sharpen(transformers.PixtralVisionModel(cfg).eval(), 16.0)
    model.save_pretrained(tmp_path)
    eager = transformers.PixtralVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    vit = vitscope.load(f"hf:{tmp_path}")
    assert vit.info.prefix == () and vit.info.preprocess.dynamic_size
    for size in ((32, 32), (32, 48)):
        pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = torch.stack([a.float() for a in eager(pixel_values=pixels, output_attentions=True).attentions])
        assert ref.amax(-1).mean() > 0.2  # peaked rows
        attn = vitscope.capture(vit, pixels)
        assert attn.grid == (size[0] // 8, size[1] // 8) and attn.weights.shape == ref.shape
        assert torch.allclose(attn.weights, ref, atol=1e-5), (attn.weights - ref).abs().max()
    with pytest.raises(VitscopeError, match=r"^images: .* takes at most 1 image per forward pass \(Pixtral packs a "
                       r"batch into one sequence\), got 3") as err:
        vitscope.capture(vit, torch.randn(3, 3, 32, 32))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ timm's real hybrid and VLM-tower builders
#: (timm name, kwargs at a small size, pixels per token the stem gives); built by timm's own entrypoints (seconds
#: each: slow). The fast family table has a tiny hybrid stem (`tests.capture.families._timm_hybrid`).
TIMM_NAMED = [
    ("vit_small_r26_s32_224", dict(img_size=64, embed_dim=32, depth=2, num_heads=2), 32),
    ("vit_base_r50_s16_224", dict(img_size=64, embed_dim=32, depth=2, num_heads=2), 16),
    ("vit_base_mci_224", dict(img_size=64, depth=2, num_heads=2), 16),
    ("vitamin_small_224", dict(img_size=64, depth=2), 16),
    ("qwen3_vit_88m", dict(img_size=64, embed_dim=32, depth=2, num_heads=2), 16),
    ("gemma4_vit_167m", dict(embed_dim=32, depth=2, num_heads=2), 16),
    ("deepseek_vit_412m", dict(img_size=64, embed_dim=32, depth=2, num_heads=2), 14),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs", "patch"), TIMM_NAMED, ids=[t[0] for t in TIMM_NAMED])
def test_timm_named_hybrids_and_towers_load_by_name(name: str, kwargs: dict[str, Any], patch: int) -> None:
    """``timm:<name>``: the measured pixels per token, and a capture at another size than the built one (where
    the model takes it) exact against timm's explicit attention."""
    from tests.capture.families import _explicit_reference

    with pytest.warns(VitscopeWarning, match="random weights"):
        vit = vitscope.load(f"timm:{name}", num_classes=5, random_weights=True, **kwargs)
    assert vit.info.patch_size == (patch, patch)
    size = (2 * patch, 3 * patch) if vit.info.preprocess.dynamic_size else vit.info.preprocess.image_size
    sharpen(vit.module, 4.0)
    reference, _ = _explicit_reference(vit.module)
    pixels = torch.randn(2, vit.info.preprocess.channels, *size, generator=torch.Generator().manual_seed(1))
    ref, _ = reference(pixels)
    attn = vitscope.capture(vit, pixels)
    assert attn.grid == (size[0] // patch, size[1] // patch) and attn.weights.shape == ref.shape
    assert torch.allclose(attn.weights, ref, atol=1e-5), (attn.weights - ref).abs().max()


def test_dpt_hybrid_reads_its_vit_after_the_bit_stem(tmp_path: Path) -> None:
    """DPT-hybrid: a BiT stem (16 pixels per feature) then a 1x1 projection: the tower is found from that
    projection, the patch measured from its output grid; exact against the eager attention; another size refused
    in one line (its position table is fixed)."""
    bit = transformers.BitConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1],
                                 num_groups=4, layer_type="bottleneck", global_padding="same",
                                 out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True)
    cfg = transformers.DPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=64, patch_size=16, is_hybrid=True, backbone_config=bit,
                                 backbone_out_indices=[0, 1], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
                                 reassemble_factors=[1, 1, 1, 1], backbone_featmap_shape=[1, 32, 4, 4])
    torch.manual_seed(0)
    model = sharpen(transformers.DPTModel(cfg).eval(), 16.0)
    model.save_pretrained(tmp_path)
    eager = transformers.DPTModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.stack([a.float() for a in eager(pixel_values=pixels, output_attentions=True).attentions])
    assert ref.amax(-1).mean() > 0.2  # peaked rows
    for source in (model, f"hf:{tmp_path}"):
        vit = vitscope.load(source)
        assert vit.info.patch_size == (16, 16) and vit.info.prefix == ("cls",)
        attn = vitscope.capture(vit, pixels)
        assert attn.grid == (4, 4) and attn.weights.shape == ref.shape
        assert torch.allclose(attn.weights, ref, atol=1e-5), (attn.weights - ref).abs().max()
    with pytest.raises(VitscopeError, match=r"^size: .*fails on 64x96 inputs") as err:
        vitscope.capture(vit, torch.randn(1, 3, 64, 96))
    assert "\n" not in str(err.value)


def test_windowed_layers_refused_on_the_streaming_and_gradient_paths_too() -> None:
    """`fused_attention` (streaming) and the gradient methods select layers as capture does: the same one line;
    their global layer still works."""
    from vitscope.capture.streaming import fused_attention
    from vitscope.methods import grad_rollout

    model = _hf_sam()
    vit = vitscope.load(model)
    pixels = torch.randn(1, 3, 32, 32)
    for run in (lambda: fused_attention(vit, pixels), lambda: grad_rollout(vit, pixels)):
        with pytest.raises(VitscopeError, match=r"^layers: (every layer .*, and )?layers \[0\] of .* local windows"):
            run()
    fused = fused_attention(vit, pixels, layers=[1])
    ref = vitscope.capture(vit, pixels, layers=[1]).weights.mean(dim=2)  # (1, B, N, N), heads averaged
    assert torch.allclose(fused, ref, atol=1e-5)
    assert _user_hooks(model) == []


# ------------------------------------------------- global layers whose attention folds heads into the batch
def _vitdet_eager_ref(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ref = model(pixels, output_attentions=True).attentions[1].float()  # (B*H, N, N), batch-major
    return ref.reshape(pixels.shape[0], 2, ref.shape[-2], ref.shape[-1])


def _sam_eager_ref(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_attentions=True).attentions[1].float()  # (B*H, N, N)
    return ref.reshape(pixels.shape[0], 2, ref.shape[-2], ref.shape[-1])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", ["hf-vitdet", "hf-sam-eager"])
def test_global_layer_folding_heads_into_the_batch_is_exact(case: str, batch: int, tmp_path: Path) -> None:
    """ViTDet's attention (and SAM's with ``attn_implementation="eager"``) is a softmax of ``(B*H, N, N)``: heads
    folded into the batch, batch-major. Its global layer is exact against the model's own eager attention
    (sharpened q/k: mean row max > 0.2, asserted), batch 1 and 3 (the order proven on a batch of two)."""
    if case == "hf-vitdet":
        model, ref_of, size = sharpen(_hf_vitdet(), 16.0), _vitdet_eager_ref, (32, 32)
    else:
        _hf_sam().save_pretrained(tmp_path)
        model = transformers.SamVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
        ref_of, size = _sam_eager_ref, (32, 32)
    pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
    ref = ref_of(model, pixels)
    assert ref.amax(-1).mean() > 0.2  # peaked rows
    attn = vitscope.capture(vitscope.load(model), pixels, layers=[1])
    assert attn.weights.shape == (1, batch, 2, 16, 16)
    torch.testing.assert_close(attn.weights[0], ref, atol=1e-5, rtol=0)
    cls_mean = vitscope.capture(vitscope.load(model), pixels, layers=[1], heads="mean", queries=[0])
    torch.testing.assert_close(cls_mean.weights[0, :, 0, 0], ref.mean(1)[:, 0], atol=1e-5, rtol=0)
    assert _user_hooks(model) == []


@pytest.mark.parametrize(("batch", "size"), [(1, (32, 32)), (3, (32, 32)), (3, (32, 48))])
def test_timm_samvit_global_layer_folding_heads_is_exact(batch: int, size: tuple[int, int]) -> None:
    """timm ``samvit_*``: SDPA on ``(B*H, N, d)`` (3-d) with a ``(B*H, N, N)`` relative-position bias (fused), or a
    softmax of ``(B*H, N, N)`` (``fused_attn=False``). Its global layer, through ``vitscope.load(model)``, equals
    the model's own eager attention (its ``attn_drop`` input; sharpened: mean row max > 0.2, asserted), batch 1 and
    3, square and non-square, on both kernels."""
    import copy

    model = sharpen(_timm_samvit(), 16.0)
    eager = copy.deepcopy(model)
    eager.blocks[1].attn.fused_attn = False
    seen: list[torch.Tensor] = []
    handle = eager.blocks[1].attn.attn_drop.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        eager(pixels)
    handle.remove()
    n = (size[0] // 8) * (size[1] // 8)
    ref = seen[0].float().reshape(batch, 2, n, n)  # (B*H, N, N), batch-major
    assert ref.amax(-1).mean() > 0.2  # peaked rows
    for source in (model, eager):
        attn = vitscope.capture(vitscope.load(source), pixels, layers=[1])
        assert attn.weights.shape == (1, batch, 2, n, n)
        torch.testing.assert_close(attn.weights[0], ref, atol=1e-5, rtol=0)
        cls_mean = vitscope.capture(vitscope.load(source), pixels, layers=[1], heads="mean", queries=[0])
        torch.testing.assert_close(cls_mean.weights[0, :, 0, 0], ref.mean(1)[:, 0], atol=1e-5, rtol=0)
        assert _user_hooks(source) == []
