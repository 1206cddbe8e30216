"""Random-weight models for the target tests, saved offline, with an independent reference of each stated score.

Each case gives the vitscope model (loaded the public way where a folder exists) and ``reference(pixels)``:
the explicit attention of every layer ``(B, H, N, N)`` in the autograd graph (transformers' eager attention with
``output_attentions``; timm with ``fused_attn`` off; open_clip's attention recomputed by hand from its
``in_proj``), the stated score from the model's own API (``logits_per_image``, ``logits``, ``pooler_output``) and
a per-layer score written out by hand (LeGrad reads each layer's tokens out the same way). q/k are sharpened
(`tests.capture.families.sharpen`) so attention is peaked: the tests assert a mean row max > 0.2.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.capture.families import sharpen

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "cat", "dog", "photo", "of", "tabby"]
SIZE = 32  # 4x4 grid of 8x8 patches


@dataclass
class Ref:
    attns: list[torch.Tensor]  # per layer (B, H, N, N), in the graph
    score: torch.Tensor  # (B,) the stated score from the model's own API
    layer_scores: list[torch.Tensor]  # (B,) per layer, the same score read out at that layer's tokens


@dataclass
class Case:
    vit: Any
    target: Any
    reference: Callable[[torch.Tensor], Ref]
    query_cls: bool  # the map's row: [CLS] (else the mean of the patch rows)


def save_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer (``<s> words </s>``), saved where the model is: offline, no vocab download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def _text_cfg() -> dict[str, Any]:
    return dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, eos_token_id=3, bos_token_id=2, pad_token_id=0)


def _vision_cfg() -> dict[str, Any]:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
                patch_size=8)


def _eager(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.set_attn_implementation("eager")  # type: ignore[operator]
    return ref


def _cos_logit(model: nn.Module, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """logit_scale.exp() * cos (+ logit_bias), written out."""
    s = model.logit_scale.exp() * (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t())[:, 0]
    bias = getattr(model, "logit_bias", None)
    return s + bias if isinstance(bias, torch.Tensor) else s


def hf_dual(tmp: Path, kind: str) -> Case:
    """transformers CLIPModel / SiglipModel / Siglip2Model saved with its tokenizer; target ``text:a cat``."""
    import transformers

    import vitscope

    torch.manual_seed(1)
    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=_text_cfg(), vision_config=_vision_cfg(),
                                                               projection_dim=16))
    elif kind == "siglip2":  # NaFlex: patches and spatial shapes built from the pixels
        vcfg = {k: v for k, v in _vision_cfg().items() if k != "image_size"}
        model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=_text_cfg(),
                                                                     vision_config={**vcfg, "num_patches": 16}))
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=_text_cfg(),
                                                                   vision_config=_vision_cfg()))
        with torch.no_grad():
            model.logit_bias.fill_(-1.5)  # a bias that is not zero: the score must include it
    sharpen(model.vision_model, 6.0)
    folder = tmp / kind
    model.eval().save_pretrained(folder)
    save_tokenizer(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = vitscope.load(f"hf:{folder}")
    ref_model = _eager(vit.module)
    inputs = vit.text.tokenize(["a cat"])
    vm = ref_model.vision_model

    def readout(h: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        img = vm.head(vm.post_layernorm(h)) if kind != "clip" else ref_model.visual_projection(
            vm.post_layernorm(h[:, 0]))
        return _cos_logit(ref_model, img, txt)

    def reference(pixels: torch.Tensor) -> Ref:
        from vitscope.adapters.hf import siglip2_inputs

        image = siglip2_inputs(pixels, 8) if kind == "siglip2" else {"pixel_values": pixels}
        out = ref_model(**image, **inputs, output_attentions=True, output_hidden_states=True)
        vout = out.vision_model_output
        txt = out.text_embeds.detach()
        return Ref(list(vout.attentions), out.logits_per_image[:, 0],
                   [readout(h, txt) for h in vout.hidden_states[1:]])

    return Case(vit, "text:a cat", reference, query_cls=kind == "clip")


def hf_vit_named(tmp: Path) -> Case:
    """ViTForImageClassification with its own id2label; target by name (``kitten``)."""
    import transformers

    import vitscope

    torch.manual_seed(2)
    labels = {0: "goldfish", 1: "kitten", 2: "tench"}
    cfg = transformers.ViTConfig(**_vision_cfg(), num_labels=3, id2label=labels,
                                 label2id={v: k for k, v in labels.items()})
    model = sharpen(transformers.ViTForImageClassification(cfg), 30.0).eval()
    model.save_pretrained(tmp / "vit")
    vit = vitscope.load(f"hf:{tmp / 'vit'}")
    ref_model = _eager(vit.module)

    def reference(pixels: torch.Tensor) -> Ref:
        out = ref_model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        head = lambda h: ref_model.classifier(ref_model.vit.layernorm(h)[:, 0])[:, 1]  # noqa: E731
        return Ref(list(out.attentions), out.logits[:, 1], [head(h) for h in out.hidden_states[1:]])

    return Case(vit, "kitten", reference, query_cls=True)


def timm_named() -> Case:
    """A timm ViT with ImageNet's 1000 classes: timm's own class names, target ``tabby`` (class 281)."""
    import timm

    from vitscope.adapters import as_vit

    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2)
    sharpen(model, 30.0).eval()  # timm's 0.02-std init needs more than the CLIP towers' (1/sqrt(d))
    vit = as_vit(model)

    def reference(pixels: torch.Tensor) -> Ref:
        m = copy.deepcopy(model)
        attns: list[torch.Tensor] = []
        blocks: list[torch.Tensor] = []
        for blk in m.blocks:
            blk.attn.fused_attn = False
            blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: attns.append(out))
            blk.register_forward_hook(lambda _m, _i, out: blocks.append(out))
        logits = m(pixels)
        return Ref(attns, logits[:, 281], [m.head(m.norm(h)[:, 0])[:, 281] for h in blocks])

    return Case(vit, "tabby", reference, query_cls=True)


def dinov2_ref(tmp: Path, image: Path, kind: str) -> Case:
    """A Dinov2Model backbone: ``image:<path>`` (cosine of the [CLS] embeddings) or ``patch:1,2``."""
    import transformers

    import vitscope

    torch.manual_seed(4)
    cfg = transformers.Dinov2Config(**_vision_cfg())
    model = sharpen(transformers.Dinov2Model(cfg), 30.0).eval()
    model.save_pretrained(tmp / "dinov2")
    vit = vitscope.load(f"hf:{tmp / 'dinov2'}")
    ref_model = _eager(vit.module)
    from vitscope.capture.prepare import prepare

    _, ref_pixels = prepare(vit, image)  # the reference image, prepared as the model prepares any image

    def reference(pixels: torch.Tensor) -> Ref:
        out = ref_model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        norm = ref_model.layernorm
        if kind == "image":
            with torch.no_grad():
                ref = ref_model(pixel_values=ref_pixels).pooler_output
            score = lambda h: F.cosine_similarity(norm(h)[:, 0], ref, dim=-1)  # noqa: E731
            return Ref(list(out.attentions), F.cosine_similarity(out.pooler_output, ref, dim=-1),
                       [score(h) for h in out.hidden_states[1:]])

        def patch(f: torch.Tensor) -> torch.Tensor:  # f: final-norm tokens; patch (1, 2) of the 4x4 grid
            f = F.normalize(f[:, 1:], dim=-1)
            p = 1 * 4 + 2
            sims = torch.einsum("bpd,bd->bp", f, f[:, p].detach())
            return torch.cat([sims[:, :p], sims[:, p + 1:]], dim=1).mean(dim=1)

        return Ref(list(out.attentions), patch(out.last_hidden_state),
                   [patch(norm(h)) for h in out.hidden_states[1:]])

    return Case(vit, f"image:{image}" if kind == "image" else "patch:1,2", reference, query_cls=True)


class ExplicitMHA(nn.Module):
    """open_clip's ``nn.MultiheadAttention`` (batch first) recomputed with its attention kept: ``softmax(q k^T /
    sqrt(d)) v`` from ``in_proj``/``out_proj``, the attention appended to ``store``."""

    def __init__(self, mha: nn.MultiheadAttention, store: list[torch.Tensor]) -> None:
        super().__init__()
        self.mha, self.store = mha, store

    def forward(self, q_x: torch.Tensor, *_args: Any, **_kwargs: Any) -> tuple[torch.Tensor, None]:
        m = self.mha
        B, N, D = q_x.shape
        H = m.num_heads
        q, k, v = F.linear(q_x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, N, H, D // H).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        a = (q @ k.transpose(-2, -1) * (D // H) ** -0.5).softmax(dim=-1)  # (B, H, N, N)
        self.store.append(a)
        return m.out_proj((a @ v).transpose(1, 2).reshape(B, N, D)), None


def open_clip_model() -> nn.Module:
    import open_clip

    torch.manual_seed(5)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=open_clip.model.CLIPVisionCfg(
        layers=2, width=32, head_width=16, patch_size=8, image_size=SIZE, mlp_ratio=2),
        text_cfg=open_clip.model.CLIPTextCfg(width=32, heads=2, layers=1))
    sharpen(model.visual, 6.0)
    return model.eval()


def explicit_open_clip(model: nn.Module, pixels: torch.Tensor,
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], nn.Module, torch.Tensor]:
    """(attention per layer, block outputs per layer, the copy, its image embedding) of open_clip's image tower,
    attention explicit, all in one graph."""
    m = copy.deepcopy(model)
    attns: list[torch.Tensor] = []
    blocks: list[torch.Tensor] = []
    for blk in m.visual.transformer.resblocks:
        blk.attn = ExplicitMHA(blk.attn, attns)
        blk.register_forward_hook(lambda _m, _i, out: blocks.append(out))
    emb = m.visual(pixels)
    return attns, blocks, m, emb


def open_clip_text() -> Case:
    """An open_clip CLIP (random weights, its bundled tokenizer): ``text:a cat``."""
    import open_clip

    from vitscope.adapters import as_vit

    model = open_clip_model()
    vit = as_vit(model)
    with torch.no_grad():
        txt = model.encode_text(open_clip.tokenize(["a cat"]))

    def reference(pixels: torch.Tensor) -> Ref:
        attns, blocks, m, emb = explicit_open_clip(model, pixels)
        v = m.visual
        read = lambda h: _cos_logit(m, v.ln_post(h)[:, 0] @ v.proj, txt)  # noqa: E731
        return Ref(attns, _cos_logit(m, emb, txt), [read(h) for h in blocks])

    return Case(vit, "text:a cat", reference, query_cls=True)
