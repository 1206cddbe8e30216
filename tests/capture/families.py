"""The family table: one tiny random model per ViT family, with a reference for its attention written outside vitscope.

Each entry builds (once per input size it needs) the model vitscope captures and an independent reference
``pixels -> (layers, batch, heads, N, N)`` that reads the probabilities from the family's own explicit path:

- transformers: the same saved weights loaded with ``attn_implementation="eager"``, ``output_attentions=True``;
- timm: a deep copy with ``fused_attn=False`` everywhere, probabilities read at each block's ``attn.attn_drop``;
- torchvision / open_clip: each ``nn.MultiheadAttention`` called again on its own inputs with
  ``need_weights=True, average_attn_weights=False``;
- vitscope's ViT: ``set_fused_attn(False)`` and its ``attn_drop``; the custom module: its explicit ``probs``.

Random init hides a wrong capture two ways, and `sharpen` undoes both: attention is near uniform (so every
model's q/k projections and q/k norms are multiplied by a per-family ``factor``, chosen so that the reference's
mean row maximum is above 0.2), and prefix tokens, position tables and relative position biases start at zero
(so [CLS] and [DIST], or two registers, are the same vector; they are redrawn). `tests/capture/test_families.py`
asserts both: row maxima above 0.2, and no two tokens' attention columns equal.

``FAMILY_DOCS`` lists (family id, source kind, class name) for generated docs.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vitscope

PATCH = 8
SIZES: dict[str, tuple[int, int]] = {"square": (32, 32), "wide": (32, 48)}
CLS = ("cls",)
REG4 = ("cls", "register", "register", "register", "register")

# name components of the parameters that set q·k (the v part of a fused qkv is scaled too: harmless)
_QK_PARTS = {"query", "key", "q_proj", "k_proj", "qkv", "q_norm", "k_norm"}
_QK_LEAVES = {"in_proj_weight", "in_proj_bias", "q_bias", "k_bias"}
# parameters many inits leave at zero (or 1e-6): prefix tokens, position tables, relative position biases. Left
# so, [CLS] and [DIST] (or the registers) are the same vector and a capture that swaps them would still pass.
_DISTINCT = {"cls_token": 1.0, "reg_token": 1.0, "register_tokens": 1.0, "distillation_token": 1.0,
             "dist_token": 1.0, "class_embedding": 1.0, "class_token": 1.0, "position_embeddings": 0.5,
             "pos_embed": 0.5, "pos_embedding": 0.5, "positional_embedding": 0.5,
             "relative_position_bias_table": 1.0}


def sharpen(model: nn.Module, factor: float, seed: int = 0) -> nn.Module:
    """Peaked, distinguishable attention: q/k projections (and q/k norms) times ``factor``; prefix tokens,
    learned position tables and relative position bias tables redrawn ``N(0, s^2)`` (fixed tables kept)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if parts[-1] in _DISTINCT and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * _DISTINCT[parts[-1]])
            elif parts[-1] in _QK_LEAVES or (_QK_PARTS & set(parts[:-1]) and parts[-1] in ("weight", "bias")):
                p.mul_(factor)
    return model


def main_tensor(output: Any) -> torch.Tensor:
    """The tensor a family's forward is judged by: itself, ``last_hidden_state``, ``logits`` or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("last_hidden_state", "logits", "heatmaps"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output:
        return main_tensor(output[0])
    raise TypeError(f"no tensor in a {type(output).__name__}")


@dataclass
class Built:
    """What one family gives the tests for one input size."""

    model: Any  # what is passed to vitscope.capture (a VitModel from vitscope.load, or the nn.Module)
    module: nn.Module  # the module capture runs: hooks, flags and outputs are checked on it
    reference: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # pixels -> (L, B, H, N, N), output
    forward: Callable[[torch.Tensor], torch.Tensor]  # a plain forward of `module` (the main tensor)
    blocks: list[nn.Module]  # the attention blocks in depth order
    folder: Path | None = None  # transformers: where save_pretrained wrote the model
    explicit: nn.Module | None = None  # the reference's own model (eager / unfused): capture must read it too


Builder = Callable[[float, tuple[int, int]], Built]  # (q/k factor, input size) -> Built


@dataclass(frozen=True)
class Family:
    id: str
    source: str  # "hf" | "timm" | "torchvision" | "open_clip" | "vitscope" | "custom"
    cls_name: str
    build: Builder
    prefix: tuple[str, ...]
    factor: float  # q/k scale for peaked attention (see the table for the row maxima it gives)
    depth: int = 2
    heads: int = 2
    patch: int = PATCH
    per_size: bool = False  # built at each input size (position tables fixed at construction)
    square_only: bool = False  # refuses any other input size (torchvision)
    has_cls: bool = True


def _stack(attns: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([a.detach().float() for a in attns])


# --------------------------------------------------------------------------------------------- transformers
_TMP = tempfile.TemporaryDirectory(prefix="vitscope-families-")  # removed at interpreter exit


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _hf(cls_name: str, config: Callable[[tuple[int, int]], Any], mae: bool = False) -> Builder:
    def build(factor: float, size: tuple[int, int]) -> Built:
        import transformers

        cls = getattr(transformers, cls_name)
        torch.manual_seed(0)
        module = sharpen(cls(config(size)).eval(), factor)
        # capture runs transformers' default kernel: SDPA where the class has it (BLIP, ChineseCLIP: eager only)
        assert module.config._attn_implementation == ("sdpa" if cls._supports_sdpa else "eager")
        folder = Path(tempfile.mkdtemp(dir=_TMP.name))
        module.save_pretrained(folder)
        eager = cls.from_pretrained(folder, attn_implementation="eager").eval()
        kwargs: dict[str, Any] = {}
        if _accepts(eager.forward, "interpolate_pos_encoding"):
            kwargs["interpolate_pos_encoding"] = True  # non-square input (DINOv2/DINOv3/AIMv2 handle it natively)

        def extra(pixels: torch.Tensor) -> dict[str, Any]:
            if not mae:
                return kwargs
            # identity shuffle: argsort(arange) keeps every patch in its own place (with mask_ratio 0)
            n = (pixels.shape[2] // PATCH) * (pixels.shape[3] // PATCH)
            return {**kwargs, "noise": torch.arange(n, dtype=torch.float32)[None].expand(pixels.shape[0], -1)}

        if mae:
            eager.config.mask_ratio = 0.0

        def reference(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                out = eager(pixel_values=pixels, output_attentions=True, **extra(pixels))
            return _stack(list(out.attentions)), main_tensor(out)

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            saved = getattr(module.config, "mask_ratio", None)
            try:
                if mae:
                    module.config.mask_ratio = 0.0
                with torch.no_grad():
                    return main_tensor(module(pixel_values=pixels, **extra(pixels)))
            finally:
                if mae:
                    module.config.mask_ratio = saved

        blocks = [m for m in module.modules() if type(m).__name__.endswith("Layer")]  # ViTLayer, CLIPEncoderLayer
        return Built(module, module, reference, forward, blocks, folder, eager)

    return build


def _hf_common(**extra: Any) -> dict[str, Any]:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=PATCH, **extra)


def _cfg(name: str, sized: bool = False, **extra: Any) -> Callable[[tuple[int, int]], Any]:
    """A tiny config; ``sized``: built for the input size (a learned position table of that grid, per_size)."""

    def make(size: tuple[int, int]) -> Any:
        import transformers

        common = _hf_common(**extra)
        if sized:
            common["image_size"] = list(size)
        return getattr(transformers, name)(**common)

    return make


def _vitpose_cfg(size: tuple[int, int]) -> Any:
    """VitPose: a ViT backbone (its learned position table fixes the input size: built per size) and a heatmap
    head; vitscope runs the whole model (it needs only pixels)."""
    import transformers

    backbone = transformers.VitPoseBackboneConfig(**{**_hf_common(), "image_size": list(size), "patch_size": [PATCH] * 2},
                                                  out_indices=[2])
    return transformers.VitPoseConfig(backbone_config=backbone)


# --------------------------------------------------------------------------------------------------- timm
def _explicit_reference(model: nn.Module
                        ) -> tuple[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], nn.Module]:
    """The explicit branch of timm's attention (and of vitscope's ViT, which has the same two branches):
    ``fused_attn=False`` on a copy; each block's ``attn.attn_drop`` gets the probs."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    probs: list[torch.Tensor] = []
    holder = ref if hasattr(ref, "blocks") else ref.encoder  # timm's VLM towers keep their blocks on .encoder
    for blk in holder.blocks:
        blk.attn.attn_drop.register_forward_pre_hook(lambda _m, inp: probs.append(inp[0].detach().clone()))

    def reference(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs.clear()
        with torch.no_grad():
            out = main_tensor(ref(pixels))
        return _stack(probs), out

    return reference, ref


def _timm(name: str, dynamic: bool = True, **extra: Any) -> Builder:
    def build(factor: float, size: tuple[int, int]) -> Built:
        import timm

        kw: dict[str, Any] = dict(img_size=size, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, num_classes=5)
        if dynamic:
            kw["dynamic_img_size"] = True
        torch.manual_seed(0)
        model = sharpen(timm.create_model(name, pretrained=False, **{**kw, **extra}).eval(), factor)

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return main_tensor(model(pixels))

        reference, explicit = _explicit_reference(model)
        blocks = model.blocks if hasattr(model, "blocks") else model.encoder.blocks
        return Built(model, model, reference, forward, list(blocks), explicit=explicit)

    return build


def _tiny_stem() -> nn.Module:
    """A ResNet-like stem (two 3x3 stride-2 convolutions: 4 pixels per feature), as in timm's hybrid ViTs."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, stride=2, padding=1))


def _timm_hybrid() -> Builder:
    """timm's hybrid ViT (``vit_*_r26_*``, ``vit_*_r50_*``: a CNN stem, then a 1x1 ``HybridEmbed`` projection...)
    with a tiny stem and a 2x2 projection: 8 pixels per token that only the stem's output shows (its declared
    ``patch_size`` is the projection's 2)."""

    def build(factor: float, size: tuple[int, int]) -> Built:
        from functools import partial

        from timm.models.vision_transformer import VisionTransformer
        from timm.models.vision_transformer_hybrid import HybridEmbed

        torch.manual_seed(0)
        embed = partial(HybridEmbed, backbone=_tiny_stem(), patch_size=2)
        model = VisionTransformer(img_size=size, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                                  embed_layer=embed, dynamic_img_size=True).eval()
        sharpen(model, factor)

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return main_tensor(model(pixels))

        reference, explicit = _explicit_reference(model)
        return Built(model, model, reference, forward, list(model.blocks), explicit=explicit)

    return build


# ------------------------------------------------------------------------------ nn.MultiheadAttention families
def _mha_reference(model: nn.Module, mhas: Callable[[nn.Module], list[nn.MultiheadAttention]]
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Each MHA called again (its ``forward``, so no hook recursion) on its own inputs, asking for the weights."""
    ref = copy.deepcopy(model).eval()
    probs: list[torch.Tensor] = []

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        assert isinstance(m, nn.MultiheadAttention) and m.batch_first  # (B, N, D) in, (B, H, N, N) out
        kw = {**kwargs, "need_weights": True, "average_attn_weights": False}
        probs.append(m.forward(*args, **kw)[1].detach().clone())

    for mha in mhas(ref):
        mha.register_forward_hook(hook, with_kwargs=True)

    def reference(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs.clear()
        with torch.no_grad():
            out = main_tensor(ref(pixels))
        return _stack(probs), out

    return reference


def _torchvision() -> Builder:
    def build(factor: float, _size: tuple[int, int]) -> Built:
        from torchvision.models import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(image_size=32, patch_size=PATCH, num_layers=2, num_heads=2, hidden_dim=32,
                                  mlp_dim=64, num_classes=5).eval()
        sharpen(model, factor)
        layers = lambda m: list(m.encoder.layers)  # noqa: E731

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(pixels)

        ref = _mha_reference(model, lambda m: [blk.self_attention for blk in layers(m)])
        return Built(model, model, ref, forward, layers(model))

    return build


def _open_clip() -> Builder:
    def build(factor: float, size: tuple[int, int]) -> Built:
        from open_clip.transformer import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(image_size=size, patch_size=PATCH, width=32, layers=2, heads=2, mlp_ratio=2,
                                  output_dim=16).eval()
        sharpen(model, factor)

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return main_tensor(model(pixels))

        ref = _mha_reference(model, lambda m: [blk.attn for blk in m.transformer.resblocks])
        return Built(model, model, ref, forward, list(model.transformer.resblocks))

    return build


# ------------------------------------------------------------------------------------- vitscope and custom
def _vitscope(registers: int = 0) -> Builder:
    def build(factor: float, _size: tuple[int, int]) -> Built:
        from vitscope.models.vit import ViT, ViTConfig

        torch.manual_seed(0)
        cfg = ViTConfig(image_size=(32, 32), patch_size=PATCH, dim=32, depth=2, heads=2, num_classes=5,
                        num_registers=registers)
        model = sharpen(ViT(cfg).eval(), factor)
        reference, explicit = _explicit_reference(model)  # vitscope's ViT has timm's two attention branches

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(pixels)

        return Built(model, model, reference, forward, list(model.blocks), explicit=explicit)

    return build


class CustomBlock(nn.Module):
    """Pre-norm block: qkv Linear, 2 heads, ``F.scaled_dot_product_attention`` (``probs`` writes it out)."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, H, N, d)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self._qkv(x)
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self._qkv(x)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class CustomViT(nn.Module):
    """Conv patches (8x8), [CLS] first, no position table (so any multiple of 8 works), 2 blocks, head on [CLS]."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.ModuleList([CustomBlock(dim) for _ in range(2)])
        self.head = nn.Linear(dim, 5)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2)  # (B, rows*cols, D), row-major
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.tokens(pixels)
        for blk in self.layers:
            x = blk(x)
        return self.head(x[:, 0])


def _custom() -> Builder:
    def build(factor: float, _size: tuple[int, int]) -> Built:
        torch.manual_seed(0)
        model = sharpen(CustomViT().eval(), factor)
        vit = vitscope.wrap(model, blocks="layers.*", qkv="qkv", out="proj", num_heads=2, patch_size=PATCH,
                            prefix=("cls",), image_size=(32, 32), dynamic_size=True, name="custom-tiny")

        def reference(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probs = []
            with torch.no_grad():
                x = model.tokens(pixels)
                for blk in model.layers:
                    probs.append(blk.probs(x))
                    x = blk(x)
                return _stack(probs), model.head(x[:, 0])

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(pixels)

        return Built(vit, model, reference, forward, list(model.layers))

    return build


# ----------------------------------------------------------------------------------------------- the table
FAMILIES: list[Family] = [
    # transformers 5.x: capture runs the model as built (transformers' default attention, SDPA)
    Family("hf-vit", "hf", "ViTModel", _hf("ViTModel", _cfg("ViTConfig")), CLS, 16.0),
    Family("hf-deit", "hf", "DeiTModel", _hf("DeiTModel", _cfg("DeiTConfig")), ("cls", "dist"), 16.0),
    Family("hf-dinov2", "hf", "Dinov2Model", _hf("Dinov2Model", _cfg("Dinov2Config")), CLS, 16.0),
    Family("hf-dinov2-registers", "hf", "Dinov2WithRegistersModel",
           _hf("Dinov2WithRegistersModel", _cfg("Dinov2WithRegistersConfig", num_register_tokens=4)), REG4, 16.0),
    Family("hf-clip", "hf", "CLIPVisionModel", _hf("CLIPVisionModel", _cfg("CLIPVisionConfig")), CLS, 4.0),
    Family("hf-siglip", "hf", "SiglipVisionModel", _hf("SiglipVisionModel", _cfg("SiglipVisionConfig")), (), 2.0,
           has_cls=False),
    Family("hf-dinov3", "hf", "DINOv3ViTModel",
           _hf("DINOv3ViTModel", _cfg("DINOv3ViTConfig", num_register_tokens=4)), REG4, 16.0),
    Family("hf-beit", "hf", "BeitModel", _hf("BeitModel", _cfg("BeitConfig", use_relative_position_bias=True)),
           CLS, 16.0),
    Family("hf-beit-shared-bias", "hf", "BeitModel",
           _hf("BeitModel", _cfg("BeitConfig", use_shared_relative_position_bias=True)), CLS, 16.0),
    Family("hf-data2vec-vision", "hf", "Data2VecVisionModel",
           _hf("Data2VecVisionModel", _cfg("Data2VecVisionConfig", use_relative_position_bias=True)), CLS, 16.0),
    Family("hf-vitmae", "hf", "ViTMAEModel", _hf("ViTMAEModel", _cfg("ViTMAEConfig"), mae=True), CLS, 16.0),
    Family("hf-vitmsn", "hf", "ViTMSNModel", _hf("ViTMSNModel", _cfg("ViTMSNConfig")), CLS, 16.0),
    Family("hf-ijepa", "hf", "IJepaModel", _hf("IJepaModel", _cfg("IJepaConfig")), (), 16.0, has_cls=False),
    Family("hf-aimv2", "hf", "Aimv2VisionModel", _hf("Aimv2VisionModel", _cfg("Aimv2VisionConfig", is_native=True)),
           (), 16.0, has_cls=False),  # "native": sin-cos positions for any grid; an attention-pooling head
    Family("hf-aimv2-no-head", "hf", "Aimv2VisionModel",
           _hf("Aimv2VisionModel", _cfg("Aimv2VisionConfig", is_native=True, use_head=False)), (), 16.0,
           has_cls=False),
    Family("hf-aimv2-learned", "hf", "Aimv2VisionModel",
           _hf("Aimv2VisionModel", _cfg("Aimv2VisionConfig", is_native=False)), (), 16.0, has_cls=False,
           square_only=True),  # a learned 4x4 position table: one input size
    # found by structure (vitscope.adapters.hf._find_tower): vision towers of composites, VLMs, depth and pose
    Family("hf-blip", "hf", "BlipVisionModel", _hf("BlipVisionModel", _cfg("BlipVisionConfig", initializer_range=0.02)), CLS, 16.0),
    Family("hf-blip2", "hf", "Blip2VisionModel", _hf("Blip2VisionModel", _cfg("Blip2VisionConfig", initializer_range=0.02)), CLS, 16.0),
    Family("hf-owlvit", "hf", "OwlViTVisionModel", _hf("OwlViTVisionModel", _cfg("OwlViTVisionConfig")), CLS, 4.0),
    Family("hf-owlv2", "hf", "Owlv2VisionModel", _hf("Owlv2VisionModel", _cfg("Owlv2VisionConfig")), CLS, 4.0),
    Family("hf-chinese-clip", "hf", "ChineseCLIPVisionModel",
           _hf("ChineseCLIPVisionModel", _cfg("ChineseCLIPVisionConfig")), CLS, 4.0),
    Family("hf-dpt", "hf", "DPTModel", _hf("DPTModel", _cfg("DPTConfig")), CLS, 16.0),
    Family("hf-vitpose", "hf", "VitPoseForPoseEstimation",
           _hf("VitPoseForPoseEstimation", _vitpose_cfg), (), 16.0, has_cls=False, per_size=True),
    Family("hf-idefics3", "hf", "Idefics3VisionTransformer",
           _hf("Idefics3VisionTransformer", _cfg("Idefics3VisionConfig")), (), 16.0, has_cls=False),
    Family("hf-smolvlm", "hf", "SmolVLMVisionTransformer",
           _hf("SmolVLMVisionTransformer", _cfg("SmolVLMVisionConfig")), (), 16.0, has_cls=False),
    Family("hf-mlcd", "hf", "MLCDVisionModel", _hf("MLCDVisionModel", _cfg("MLCDVisionConfig")), CLS, 4.0),
    # timm 1.x: the module itself
    Family("timm-vit", "timm", "VisionTransformer", _timm("vit_tiny_patch16_224"), CLS, 16.0),
    Family("timm-vit-reg4", "timm", "VisionTransformer", _timm("vit_tiny_patch16_224", reg_tokens=4), REG4, 16.0),
    Family("timm-deit-distilled", "timm", "VisionTransformerDistilled", _timm("deit_tiny_distilled_patch16_224"),
           ("cls", "dist"), 16.0),
    Family("timm-eva-dinov3", "timm", "Eva", _timm("vit_small_patch16_dinov3"), REG4, 16.0),
    Family("timm-eva-dinov3-qkvb", "timm", "Eva", _timm("vit_small_patch16_dinov3_qkvb"), REG4, 16.0),
    Family("timm-eva02", "timm", "Eva", _timm("eva02_tiny_patch14_224"), CLS, 16.0),
    Family("timm-vit-qknorm", "timm", "VisionTransformer", _timm("vit_tiny_patch16_224", qk_norm=True), CLS, 2.0),
    Family("timm-eva-rope", "timm", "Eva", _timm("vit_small_patch16_rope_224"), CLS, 16.0),
    Family("timm-eva-rope-mixed", "timm", "Eva", _timm("vit_small_patch16_rope_mixed_224"), CLS, 16.0),
    Family("timm-eva-rope-reg1-gap", "timm", "Eva", _timm("vit_medium_patch16_rope_reg1_gap_256"), ("register",),
           16.0, has_cls=False),
    Family("timm-beit", "timm", "Beit", _timm("beit_base_patch16_224", dynamic=False), CLS, 16.0, per_size=True),
    Family("timm-relpos", "timm", "VisionTransformerRelPos",
           _timm("vit_relpos_small_patch16_224", dynamic=False, class_token=True, global_pool="token"), CLS, 4.0,
           per_size=True),
    Family("timm-naflexvit", "timm", "NaFlexVit",
           _timm("naflexvit_base_patch16_gap", dynamic=False, class_token=True, reg_tokens=4), REG4, 16.0),
    # hybrid stem (grid measured from the stem's output) and the VLM towers (their blocks on .encoder)
    Family("timm-vit-hybrid", "timm", "VisionTransformer (HybridEmbed)", _timm_hybrid(), CLS, 16.0),
    Family("timm-qwen3-vit", "timm", "Qwen3VitClassifier", _timm("qwen3_vit_88m", dynamic=False), (), 16.0,
           has_cls=False),
    Family("timm-gemma4-vit", "timm", "Gemma4VitClassifier", _timm("gemma4_vit_167m", dynamic=False), (), 1.0,
           has_cls=False),
    Family("timm-deepseek-vit", "timm", "DeepseekVitClassifier", _timm("deepseek_vit_412m", dynamic=False), (), 16.0,
           has_cls=False),
    # torchvision / open_clip: nn.MultiheadAttention
    Family("torchvision-vit", "torchvision", "VisionTransformer", _torchvision(), CLS, 2.0, square_only=True),
    Family("open-clip-vit", "open_clip", "VisionTransformer", _open_clip(), CLS, 2.0, per_size=True),
    # vitscope's own ViT and a custom module declared with vitscope.wrap
    Family("vitscope-vit", "vitscope", "ViT", _vitscope(), CLS, 16.0),
    Family("vitscope-vit-reg4", "vitscope", "ViT", _vitscope(registers=4), REG4, 16.0),
    Family("custom-wrap", "custom", "CustomViT", _custom(), CLS, 4.0),
]
BY_ID: dict[str, Family] = {f.id: f for f in FAMILIES}
assert len(BY_ID) == len(FAMILIES), "duplicate family id"

# (family id, source kind, class name): for generated docs
FAMILY_DOCS: list[tuple[str, str, str]] = [(f.id, f.source, f.cls_name) for f in FAMILIES]


@cache
def _built(fid: str, size: tuple[int, int] | None) -> Built:
    fam = BY_ID[fid]
    return fam.build(fam.factor, size if size is not None else SIZES["square"])


def built(fid: str, size: tuple[int, int]) -> Built:
    """The family's models for ``size``, built once per test session (once in all, unless ``per_size``)."""
    return _built(fid, size if BY_ID[fid].per_size else None)
