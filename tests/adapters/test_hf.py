"""The transformers adapter against transformers' own eager attention, for every supported family.

Each family is a tiny random model (hidden 32, 2 layers, 4 heads, 32x32 input) saved with ``save_pretrained``
and loaded back through ``vitscope.load("hf:<folder>")``; the reference is the same folder loaded separately
with ``attn_implementation="eager"`` and run with ``output_attentions=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import vitscope
from vitscope.capture import capture_full
from vitscope.capture.intercept import AttentionCall, observe_attention
from vitscope.errors import CheckpointError, NotAViTError, VitscopeError

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32)


def _clip_full(**kw: Any) -> Any:
    text = transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        max_position_embeddings=8,
    )
    vision = transformers.CLIPVisionConfig(**COMMON, patch_size=8)
    return transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)


@dataclass(frozen=True)
class Spec:
    """One family: how to build it, and what the adapter must report."""

    cls: str
    config: Callable[[], Any]
    prefix: tuple[str, ...]
    family: str
    patch: int = 8
    folder: str = "model"
    classifier: bool = False
    composite: bool = False  # CLIPModel: only its vision tower runs
    native_interp: bool = False  # DINOv2: no interpolate_pos_encoding argument
    naflex: bool = False  # SigLIP2: pre-patchified input


SPECS: dict[str, Spec] = {
    "vit": Spec("ViTForImageClassification", lambda: transformers.ViTConfig(**COMMON, patch_size=8, num_labels=5),
                ("cls",), "vit", classifier=True),
    "dino": Spec("ViTModel", lambda: transformers.ViTConfig(**COMMON, patch_size=8), ("cls",), "dino",
                 folder="dino-vit-tiny"),
    "deit_distilled": Spec(
        "DeiTForImageClassificationWithTeacher",
        lambda: transformers.DeiTConfig(**COMMON, patch_size=8, num_labels=3), ("cls", "dist"), "deit",
        classifier=True,
    ),
    "dinov2": Spec("Dinov2Model", lambda: transformers.Dinov2Config(**COMMON, patch_size=4), ("cls",), "dinov2",
                   patch=4, native_interp=True),
    "dinov2_registers": Spec(
        "Dinov2WithRegistersForImageClassification",
        lambda: transformers.Dinov2WithRegistersConfig(**COMMON, patch_size=4, num_register_tokens=4, num_labels=3),
        ("cls", "register", "register", "register", "register"), "dinov2", patch=4, classifier=True,
        native_interp=True,
    ),
    "clip_vision": Spec("CLIPVisionModel", lambda: transformers.CLIPVisionConfig(**COMMON, patch_size=8), ("cls",),
                        "clip"),
    "clip_projection": Spec("CLIPVisionModelWithProjection",
                            lambda: transformers.CLIPVisionConfig(**COMMON, patch_size=8, projection_dim=8), ("cls",),
                            "clip"),
    "clip_full": Spec("CLIPModel", _clip_full, ("cls",), "clip", composite=True),
    "siglip": Spec("SiglipVisionModel", lambda: transformers.SiglipVisionConfig(**COMMON, patch_size=8), (), "siglip"),
    "siglip2": Spec(
        "Siglip2VisionModel",
        lambda: transformers.Siglip2VisionConfig(
            **{k: v for k, v in COMMON.items() if k != "image_size"}, patch_size=8, num_patches=16
        ),
        (), "siglip2", naflex=True,
    ),
}


def _sharpen(model: nn.Module, seed: int) -> None:
    """Random weights large enough that attention is far from uniform (so a wrong map cannot pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


@dataclass
class Built:
    spec: Spec
    folder: Path
    vit: vitscope.VitModel
    ref: Any  # a transformers model: the same weights, attn_implementation="eager"


@pytest.fixture(scope="module", params=list(SPECS))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    spec = SPECS[request.param]
    cls = getattr(transformers, spec.cls)
    torch.manual_seed(0)
    model = cls(spec.config()).eval()
    _sharpen(model, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param) / spec.folder
    model.save_pretrained(folder)
    vit = vitscope.load(f"hf:{folder}")
    ref = cls.from_pretrained(folder, attn_implementation="eager").eval()
    return Built(spec, folder, vit, ref)


def _pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _naflex_inputs(pixels: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """SigLIP2 inputs built with transformers' own image-processor patchifier (independent of the adapter)."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    B, _, H, W = pixels.shape
    patches = np.stack([convert_image_to_patches(p.numpy(), patch) for p in pixels])
    rows, cols = H // patch, W // patch
    return {
        "pixel_values": torch.from_numpy(patches),
        "spatial_shapes": torch.tensor([[rows, cols]] * B),
        "pixel_attention_mask": torch.ones(B, rows * cols, dtype=torch.int32),
    }


def _reference(b: Built, pixels: torch.Tensor) -> Any:
    target = b.ref.vision_model if b.spec.composite else b.ref
    with torch.no_grad():
        if b.spec.naflex:
            return target(**_naflex_inputs(pixels, b.spec.patch), output_attentions=True)
        if b.spec.native_interp:
            return target(pixel_values=pixels, output_attentions=True)
        return target(pixel_values=pixels, interpolate_pos_encoding=True, output_attentions=True)


def _eager_attentions(b: Built, pixels: torch.Tensor) -> torch.Tensor:
    """``(layers, B, heads, N, N)`` from the eager model."""
    return torch.stack(_reference(b, pixels).attentions)


def _hooked(module: nn.Module) -> list[str]:
    return [
        name for name, m in module.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
    ]


def _tensors(output: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------- description
def test_info_read_from_config(built: Built) -> None:
    spec, info = built.spec, built.vit.info
    cfg: Any = built.vit.module.config
    vcfg = getattr(cfg, "vision_config", None) or cfg
    assert info.prefix == spec.prefix
    assert info.family == spec.family
    assert (info.num_layers, info.num_heads, info.embed_dim) == (2, 4, 32)
    assert len(built.vit.sites) == vcfg.num_hidden_layers
    assert info.patch_size == (spec.patch, spec.patch)
    assert info.preprocess.image_size == (32, 32)
    assert info.preprocess.dynamic_size
    assert info.num_classes == (cfg.num_labels if spec.classifier else None)
    # capture must not need eager attention: the model keeps transformers' default (SDPA)
    assert cfg._attn_implementation == "sdpa"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["square", "wide"])
def test_capture_equals_eager_attention(built: Built, size: tuple[int, int], batch: int) -> None:
    pixels = _pixels(batch, *size)
    attn = vitscope.capture(built.vit, pixels)
    ref = _eager_attentions(built, pixels)  # (L, B, H, N, N)
    rows, cols = size[0] // built.spec.patch, size[1] // built.spec.patch
    assert attn.grid == (rows, cols)
    assert attn.prefix == built.spec.prefix
    assert ref.shape == (2, batch, 4, attn.num_tokens, attn.num_tokens)
    assert ref.amax() > 5.0 / attn.num_tokens  # far from uniform: a wrong scale or layout would show
    torch.testing.assert_close(attn.weights, ref, atol=1e-5, rtol=0)


def test_cls_row_mean_heads_last_layer(built: Built) -> None:
    pixels = _pixels(3, 32, 48, seed=1)
    ref = _eager_attentions(built, pixels)[-1]  # (B, H, N, N)
    if "cls" not in built.spec.prefix:
        with pytest.raises(VitscopeError, match="no \\[CLS\\]"):
            vitscope.capture(built.vit, pixels, queries="cls")
        # [CLS]-less models: the global map is the mean over all patch query rows
        attn = vitscope.capture(built.vit, pixels, layers=[-1], heads="mean")
        expected = ref.mean(dim=1)[:, attn.patch_slice].mean(dim=1)  # (B, N)
        torch.testing.assert_close(attn.weights[0, :, 0, attn.patch_slice].mean(dim=1), expected, atol=1e-5, rtol=0)
        return
    attn = vitscope.capture(built.vit, pixels, queries="cls", heads="mean", layers=[-1])
    assert attn.weights.shape == (1, 3, 1, 1, attn.num_tokens)
    assert attn.layers == (1,)
    cls = built.spec.prefix.index("cls")
    torch.testing.assert_close(attn.weights[0, :, 0, 0], ref[:, :, cls].mean(dim=1), atol=1e-5, rtol=0)
    if "dist" in built.spec.prefix:  # DeiT's distillation row is a different distribution, also exact
        dist = vitscope.capture(built.vit, pixels, queries="dist", heads=[2], layers=[0])
        torch.testing.assert_close(dist.weights[0, :, 0, 0], _eager_attentions(built, pixels)[0, :, 2, 1],
                                   atol=1e-5, rtol=0)


def test_outputs_bit_identical_and_state_restored(built: Built) -> None:
    vit = built.vit
    module: Any = vit.module
    module.train()  # capture puts it in eval for the pass, then restores the flag
    flags = {name: m.training for name, m in module.named_modules()}
    impl = module.config._attn_implementation
    pixels = _pixels(2, 32, 48, seed=2)
    with torch.no_grad():
        module.eval()
        plain = _tensors(vit(pixels))
        module.train()
    result = capture_full(vit, pixels, token_norms=True)
    captured = _tensors(result.output)
    assert plain.keys() == captured.keys() and plain
    for key in plain:
        assert torch.equal(plain[key], captured[key]), key
    logits = vit.logits(result.output)
    if built.spec.classifier:
        assert logits is not None and torch.equal(logits, result.output.logits)
    else:
        assert logits is None
    assert module.config._attn_implementation == impl
    assert {name: m.training for name, m in module.named_modules()} == flags
    assert _hooked(module) == []
    module.eval()


def test_hooks_removed_after_errors(built: Built) -> None:
    module: Any = built.vit.module

    class Boom(RuntimeError):
        pass

    def explode(*_: Any) -> None:
        raise Boom("inside the forward pass")

    mlp = built.vit.sites[0].block.get_submodule("mlp")  # mid-pass (capture ends after the last attention)
    handle = mlp.register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            vitscope.capture(built.vit, _pixels(1, 32, 32))
    finally:
        handle.remove()
    assert _hooked(module) == []
    # an input smaller than one patch fails inside the model's own patch embedding
    tiny = _pixels(1, built.spec.patch // 2, built.spec.patch // 2)
    with pytest.raises((RuntimeError, ValueError)):
        vitscope.capture(built.vit, tiny)
    assert _hooked(module) == []
    assert module.config._attn_implementation == "sdpa"


def test_kernel_value_and_output_for_gradients(built: Built) -> None:
    """The intercepted kernel output is ``A V`` with the eager ``A``, and stays in the graph."""
    pixels = _pixels(2, 32, 48, seed=3).requires_grad_(True)
    ref = _eager_attentions(built, pixels.detach())  # (L, B, H, N, N)
    seen: dict[int, AttentionCall] = {}
    with observe_attention(built.vit.sites, lambda c: seen.__setitem__(c.layer, c), graph=True) as check:
        built.vit(pixels)
        check()
    assert sorted(seen) == [0, 1]
    for layer, call in seen.items():
        assert call.out is not None and call.v is not None and call.out_to_heads is not None
        assert call.out.requires_grad
        o = call.out_to_heads(call.out.detach())  # (B, H, N, d): SDPA's output is per head already
        torch.testing.assert_close(o, ref[layer] @ call.v.detach(), atol=1e-5, rtol=0)
    assert _hooked(built.vit.module) == []


def test_readout_of_last_block_tokens_equals_the_logits(built: Built) -> None:
    """The adapter's read-out (LeGrad) applied to the last block's tokens reproduces the model's own logits."""
    pixels = _pixels(2, 32, 32, seed=5)
    out = built.vit(pixels)
    logits = built.vit.logits(out)
    assert (logits is not None) == built.spec.classifier
    if logits is None:
        assert built.vit.readout is None
        return
    assert built.vit.readout is not None
    last: list[torch.Tensor] = []
    handle = built.vit.sites[-1].block.register_forward_hook(
        lambda _m, _i, o: last.append(o[0] if isinstance(o, tuple) else o)
    )
    try:
        built.vit(pixels)
    finally:
        handle.remove()
    torch.testing.assert_close(built.vit.readout(last[0]), logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- SigLIP probe
def test_probe_attention_matches_multihead_attention(built: Built) -> None:
    from vitscope.methods import probe_attention

    if built.spec.family not in ("siglip", "siglip2"):
        with pytest.raises(VitscopeError, match="attention-pooling head"):
            probe_attention(built.vit, _pixels(1, 32, 32))
        return
    pixels = _pixels(2, 32, 48, seed=4)
    got = probe_attention(built.vit, pixels)  # (B, H, rows, cols)
    head = built.ref.head
    with torch.no_grad():
        hidden = _reference(built, pixels).last_hidden_state  # the head's input (after post_layernorm)
        probe = head.probe.repeat(2, 1, 1)
        _, weights = head.attention(probe, hidden, hidden, need_weights=True, average_attn_weights=False)
    assert got.shape == (2, 4, 4, 6)
    torch.testing.assert_close(got.flatten(2), weights[:, :, 0], atol=1e-5, rtol=0)
    assert _hooked(built.vit.module) == []


# ------------------------------------------------------------------------------------------- loading
def test_siglip2_patchify_matches_image_processor() -> None:
    from vitscope.adapters.hf import siglip2_inputs

    pixels = _pixels(2, 16, 24, seed=5)
    ours, theirs = siglip2_inputs(pixels, 8), _naflex_inputs(pixels, 8)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), key


def _save_tiny_vit(folder: Path) -> None:
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**COMMON, patch_size=8)).save_pretrained(folder)


def test_preprocessor_config_is_read(tmp_path: Path) -> None:
    _save_tiny_vit(tmp_path)
    transformers.ViTImageProcessor(
        image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], size={"height": 48, "width": 40}, resample=3
    ).save_pretrained(tmp_path)
    prep = vitscope.load(f"hf:{tmp_path}").info.preprocess
    assert (prep.mean, prep.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert prep.image_size == (48, 40)
    assert prep.resample == "bicubic"


def test_center_crop_size_and_processor_config_json(tmp_path: Path) -> None:
    import json

    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**COMMON, patch_size=8)).save_pretrained(tmp_path)
    # no preprocessor config: CLIP's own defaults
    prep = vitscope.load(f"hf:{tmp_path}").info.preprocess
    assert prep.mean == pytest.approx(OPENAI_CLIP_MEAN) and prep.std == pytest.approx(OPENAI_CLIP_STD)
    assert prep.image_size == (32, 32) and prep.resample == "bicubic"
    # a processor saved as processor_config.json (transformers 5 layout) with resize + center crop
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 24, "width": 32})
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": image_processor.to_dict()}))
    prep = vitscope.load(f"hf:{tmp_path}").info.preprocess
    assert prep.image_size == (24, 32)


def test_images_go_through_the_model_preprocessing(tmp_path: Path, rgb_image: Any) -> None:
    """A PIL image is resized to the processor's size and normalised with its mean/std."""
    _save_tiny_vit(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=2).save_pretrained(tmp_path)
    vit = vitscope.load(f"hf:{tmp_path}")
    ours = vit.preprocess(rgb_image)
    theirs = transformers.ViTImageProcessor.from_pretrained(tmp_path)(rgb_image, return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=0.02, rtol=0)  # PIL vs tensor resize: a few grey levels


def test_wrap_transformers_module_directly() -> None:
    """``vitscope.wrap`` on an in-memory model, including a classifier that cannot interpolate positions."""
    torch.manual_seed(0)
    cfg = _clip_full()
    model = transformers.CLIPForImageClassification(
        transformers.CLIPConfig(text_config=cfg.text_config.to_dict(), vision_config=cfg.vision_config.to_dict(),
                                num_labels=4)
    ).eval()
    _sharpen(model, seed=7)
    vit = vitscope.wrap(model)
    assert vit.info.prefix == ("cls",) and vit.info.num_classes == 4
    assert not vit.info.preprocess.dynamic_size  # CLIPForImageClassification has no interpolate_pos_encoding
    pixels = _pixels(2, 32, 32, seed=6)
    attn = vitscope.capture(vit, pixels)
    model.set_attn_implementation("eager")  # reference: same weights, eager attention
    try:
        with torch.no_grad():
            ref = torch.stack(model(pixel_values=pixels, output_attentions=True).attentions)
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(attn.weights, ref, atol=1e-5, rtol=0)


def test_offline_hub_id_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as info:
        vitscope.load("hf:vitscope-tests/no-such-model", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert "offline" in message and "vitscope-tests/no-such-model" in message
    assert "hf:/path/to/folder" in message and "save_pretrained" in message


def test_missing_or_incomplete_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="folder not found"):
        vitscope.load(f"hf:{tmp_path / 'missing' / 'model'}")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        vitscope.load(f"hf:{tmp_path}")
    transformers.ViTConfig(**COMMON, patch_size=8).save_pretrained(tmp_path)  # a config but no weights
    with pytest.raises(CheckpointError, match="cannot load weights") as info:
        vitscope.load(f"hf:{tmp_path}")
    assert "\n" not in str(info.value)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        vitscope.load(f"hf:{tmp_path}")
    with pytest.raises(CheckpointError, match="not a model folder"):
        vitscope.load(f"hf:{weights}")


def test_unsupported_family(tmp_path: Path) -> None:
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(NotAViTError, match="'bert'"):
        vitscope.load(f"hf:{tmp_path}")


# ------------------------------------------------------------------------------------------- real checkpoints
@pytest.mark.slow
@pytest.mark.parametrize(
    ("hub_id", "cls", "prefix"),
    [
        ("facebook/dino-vits16", "ViTModel", ("cls",)),
        ("facebook/deit-tiny-distilled-patch16-224", "DeiTForImageClassificationWithTeacher", ("cls", "dist")),
        ("facebook/dinov2-small", "Dinov2Model", ("cls",)),
        ("facebook/dinov2-with-registers-small", "Dinov2WithRegistersModel", ("cls",) + ("register",) * 4),
        ("openai/clip-vit-base-patch32", "CLIPModel", ("cls",)),
        ("google/siglip-base-patch16-224", "SiglipModel", ()),
    ],
)
def test_pretrained_checkpoint_matches_eager(hub_id: str, cls: str, prefix: tuple[str, ...]) -> None:
    """Needs the hub (or a warm cache); skipped when the checkpoint cannot be had."""
    import inspect
    from importlib import resources

    try:
        vit = vitscope.load(f"hf:{hub_id}")
    except CheckpointError as exc:
        pytest.skip(str(exc))
    assert vit.info.prefix == prefix
    pixels = vit.preprocess(str(resources.files("vitscope") / "data" / "samples" / "chelsea.jpg"))
    attn = vitscope.capture(vit, pixels, layers=[-1])
    ref = getattr(transformers, cls).from_pretrained(hub_id, attn_implementation="eager").eval()
    target = ref.vision_model if cls in ("CLIPModel", "SiglipModel") else ref
    kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(
        target.forward).parameters else {}
    with torch.no_grad():
        expected = target(pixel_values=pixels, output_attentions=True, **kwargs).attentions[-1]
    torch.testing.assert_close(attn.weights[0], expected, atol=1e-5, rtol=0)
