"""Transformer Attribution (Chefer, Gur & Wolf 2021, "Transformer Interpretability Beyond Attention
Visualization", CVPR; the method the authors call ``transformer_attribution`` in their ViT code).

Not the same as vitscope's ``chefer`` method (`vitscope.methods.relevance`, Chefer et al. ICCV 2021), which
weights the *attention* ``A`` by its gradient. This one weights the attention's *LRP relevance* ``R^A``:

1. Layer-wise relevance propagation from the target class down to the first block, starting from a one-hot
   vector at the logits (value 1 at the target class), with the paper's rules (dual encoders: see below):

   - linear layers (q/k/v, the attention output, the MLP and the classifier): the alpha-beta rule with
     ``alpha=1, beta=0`` (the z+ rule): ``R_j = sum_i (x_j^+ w_ij^+ + x_j^- w_ij^-) / Z_i R_i`` where
     ``Z_i = sum_j (x_j^+ w_ij^+ + x_j^- w_ij^-)``; the bias takes no relevance;
   - LayerNorm, GELU, softmax, dropout and layer scale: the identity rule (``R_in = R_out``);
   - the two matrix products of attention, ``q k^T`` and ``A v``: each operand gets its share ``x ⊙ ∂Z/∂x ⊙ R/Z``
     and both shares are halved (so the two together carry ``R``);
   - the residual sums ``x + f(x)``: each term's share ``x ⊙ R/Z``, then rescaled so that the two terms' sums
     stand in the ratio of their absolute sums and together carry ``sum R`` (per image);
   - the token read-out ([CLS], the [CLS]/distillation pair, a patch mean): relevance goes to the tokens read,
     in proportion to what each contributes; a copy (the residual branch point) sums its branches' relevance.

   Every division is Chefer's ``safe_divide``: ``a / (b + 1e-9)``, and 0 where ``b == 0``.

2. Per layer ``l``, with ``R^A_l`` the relevance reaching the attention probabilities ``(H, N, N)`` and
   ``∇A_l = ∂y_c / ∂A_l`` the gradient of the target logit:

       Ā_l = mean_h ( (∇A_l ⊙ R^A_l)^+ )
       C   = (Ā_L + I) ··· (Ā_s + I)                  (rollout of ``Ā + I``, layers ``start_layer`` .. last)

   and the map is the [CLS] row of ``C`` over the patch columns (no row normalisation, as in the authors' code).

Dual encoders (CLIP / SigLIP / open_clip image towers) with a ``text:`` or ``image:`` target: the one-hot sits at
the target's similarity score (``logit_scale.exp() * cos(img, txt)`` (+ SigLIP's bias), or ``cos(img, ref)``),
whose gradient weights the relevance. Convention: the normalised target embeddings are the rows of a linear
classifier on the projected image embedding (several prompts = several classes, the target one of them), the
embedding's normalisation and the logit scale/bias are scalings (identity rule, like LayerNorm), and the
projection is a linear layer under z+ (no bias). Read-outs: [CLS] (CLIP ``post_layernorm``, open_clip 'tok'), the
patch mean (open_clip 'avg', the map's default row then the mean of the patch rows), and SigLIP's MAP head (a
learned probe query attending over the tokens, then ``a + mlp(norm(a))``) with the rules above: the probe is a
constant input (what reaches it stays there), in/out projections and the MLP under z+, its norm and activation
identity, halved ``q k^T`` / ``A v`` shares, the residual rule, k and v summed as copies of the tokens.

Conservation: the rules above conserve the starting relevance exactly (z+ takes none for the bias; the add
rule rescales to ``sum R``), so the relevance entering the first block sums to 1 per image, up to the
``1e-9`` stabiliser and any output whose every contribution is zero; with SigLIP's MAP head, 1 minus the probe's
share (exactly 1/4: the query's half of the attention's half), kept in `Relevance.absorbed`. It conserves the one-hot start, not the
logit's value: the bias's share is redistributed, not kept.

How vitscope runs it. The model's own forward gives the tokens entering the first block; from there the
forward is re-run explicitly in float64 from the model's own modules (norms, projections, activations, head),
recording what the rules need, and its logits (for a text/image target, its similarity score, the read-out
re-run too) are checked against the model's own: a model whose blocks or read-out do something this re-run does
not (q/k norms, rotary positions, a gated MLP, relative position bias, ...) is refused rather than explained
wrongly. Supported: vitscope's ViT, timm ``VisionTransformer`` (ViT, DeiT,
DeiT distilled, DINOv2-style layer scale and registers, [CLS] pooling), transformers ViT / DeiT (+ teacher) /
DINOv2 (+ registers) / CLIP / SigLIP image classifiers, torchvision ViT (class targets); transformers
``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` / ``SiglipModel`` / ``SiglipVisionModel`` and open_clip ViT
towers ('tok'/'avg' pooling) with text/image targets. Images are independent: a batch gives the maps of one
image at a time. Chefer's own CLIP notebook (Transformer-MM-Explainability) uses the ICCV'21 gradient method
(vitscope's ``chefer``), not these LRP rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitscope.adapters.base import SizePolicy, VitModel
from vitscope.capture.hooks import _first_tensor, eval_mode, hooks_removed_on_exit, this_thread_only
from vitscope.errors import VitscopeError
from vitscope.methods._common import Query
from vitscope.methods._gradients import Target, grad_enabled, layers_from, per_target, resolve_classes
from vitscope.methods.registry import MapContext, MapResult, Method, register
from vitscope.methods.rollout import map_from_matrix
from vitscope.methods.targets import TokenScore, target_meta

_EPS = 1e-9  # Chefer's safe_divide stabiliser
_FIX = "use a supported family (docs/methods.md#transformer_attribution), or the 'chefer' method"


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class LrpBlock:
    """One pre-norm block ``x + ls1 * attn(norm1(x))``, then ``x + ls2 * mlp(norm2(x))``, as modules."""

    norm1: nn.Module
    qkv: tuple[torch.Tensor, torch.Tensor | None]  # fused weight (3D, D) rows [q; k; v], heads contiguous; bias
    num_heads: int
    scale: float
    proj: nn.Linear
    norm2: nn.Module
    fc1: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    fc2: nn.Linear
    ls1: torch.Tensor | None = None  # layer scale (D,)
    ls2: torch.Tensor | None = None


@dataclass
class LrpHead:
    """A linear classifier on a read-out of the final tokens: ``"cls"`` (token 0), ``"dist"`` (token 1),
    ``"cls+mean"`` (token 0 concatenated with the mean of the patch tokens), ``"mean"`` (the mean of
    tokens ``start:``)."""

    linear: nn.Linear
    read: str
    start: int = 0


@dataclass
class LrpProbe:
    """SigLIP's attention-pooling (MAP) head: a learned probe query attending over the tokens
    (``nn.MultiheadAttention``), then ``a + mlp(norm(a))``; its output is the pooled feature."""

    probe: torch.Tensor  # (1, 1, D), a constant
    qkv: tuple[torch.Tensor, torch.Tensor | None]  # in-projection (3D, D) rows [q; k; v]; bias
    num_heads: int
    proj: nn.Linear  # out_proj
    norm: nn.Module
    fc1: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    fc2: nn.Linear


@dataclass
class LrpEmbed:
    """A dual encoder's image embedding from the final tokens: ``pool`` (``"cls"``: token 0; ``"avg"``: the mean
    of tokens ``start:``; ``"map"``: the `LrpProbe` head), the post norm (on every token, or on the pooled
    feature when ``norm_after_pool``), then the projection ``(E, D)`` (none for SigLIP)."""

    pool: str
    norm: nn.Module | None
    proj: torch.Tensor | None
    start: int = 0
    norm_after_pool: bool = False
    probe: LrpProbe | None = None


@dataclass
class LrpModel:
    """What the rules run on: the blocks, the final norm (or None) and the classifier head(s), averaged; or,
    for a dual encoder's image tower, the image embedding (`LrpEmbed`) a text or image target is scored on."""

    first: nn.Module  # the module whose input is the tokens entering block 0
    blocks: list[LrpBlock]
    norm: nn.Module | None
    heads: list[LrpHead]
    num_prefix: int
    embed: LrpEmbed | None = None


def _child(module: nn.Module, *names: str) -> Any:
    for name in names:
        try:
            return module.get_submodule(name)
        except AttributeError:
            continue
    return None


def _refuse(vit: VitModel, why: str) -> VitscopeError:
    return VitscopeError("method", f"transformer_attribution has no LRP rules for {type(vit.module).__name__} "
                         f"({vit.info.family}): {why}", _FIX)


def _layer_scale(mod: Any) -> torch.Tensor | None:
    if mod is None or isinstance(mod, nn.Identity):
        return None
    for name in ("gamma", "lambda1", "scale"):
        value = getattr(mod, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unknown layer scale {type(mod).__name__}")


def _block(vit: VitModel, layer: int) -> LrpBlock:
    """The rules' view of block ``layer``, found by the names timm, transformers, torchvision and vitscope use."""
    site = vit.sites[layer]
    blk: Any = site.block
    attn: Any = site.attn
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    norm1 = _child(blk, "norm1", "layernorm_before", "layer_norm1", "ln_1")
    norm2 = _child(blk, "norm2", "layernorm_after", "layer_norm2", "ln_2")
    heads = site.num_heads
    if isinstance(attn, nn.MultiheadAttention):  # torchvision
        if attn.in_proj_weight is None or not attn._qkv_same_embed_dim:
            raise TypeError("a MultiheadAttention without a fused in-projection")
        qkv = (attn.in_proj_weight, attn.in_proj_bias)
        proj = attn.out_proj
        dim = attn.embed_dim
    else:
        fused = _child(attn, "qkv")
        if isinstance(fused, nn.Linear):
            qkv = (fused.weight, fused.bias)
            dim = fused.in_features
        else:
            lin = [_child(attn, f"{p}_proj", p, f"attention.{p}_proj", f"attention.{p}")
                   for p in ("q", "k", "v")] if _child(attn, "q_proj", "attention.q_proj") is not None else \
                [_child(attn, p, f"attention.{p}") for p in ("query", "key", "value")]
            if not all(isinstance(m, nn.Linear) for m in lin):
                raise TypeError("no q/k/v projections found")
            qkv = (torch.cat([m.weight for m in lin]),
                   None if lin[0].bias is None else torch.cat([m.bias for m in lin]))
            dim = lin[0].in_features
        proj = _child(attn, "proj", "o_proj", "out_proj", "output.dense", "dense")
        if proj is None:
            proj = _child(blk, "attention.output.dense", "attention.o_proj")
    mlp = _child(blk, "mlp")
    fc1: Any
    act: Any
    fc2: Any
    if isinstance(mlp, nn.Sequential):  # torchvision MLPBlock: Linear, GELU, Dropout, Linear, Dropout
        lins = [m for m in mlp if isinstance(m, nn.Linear)]
        acts = [m for m in mlp if not isinstance(m, (nn.Linear, nn.Dropout))]
        if len(lins) != 2 or len(acts) != 1:
            raise TypeError("an MLP that is not Linear, activation, Linear")
        fc1, act, fc2 = lins[0], acts[0], lins[1]
    else:
        fc1, fc2 = _child(mlp, "fc1"), _child(mlp, "fc2")
        act = _child(mlp, "act", "activation_fn")
        if act is None:
            act = getattr(mlp, "activation_fn", None)
        extra = _child(mlp, "norm")
        if extra is not None and not isinstance(extra, nn.Identity):
            raise TypeError("an MLP with a norm inside")
    scale = site.scale if site.scale is not None else float(getattr(attn, "scale", 0.0) or getattr(
        attn, "scaling", 0.0) or (dim // heads) ** -0.5)
    parts = (norm1, norm2, proj, fc1, fc2, act)
    if any(p is None for p in parts) or not all(isinstance(p, nn.Linear) for p in (proj, fc1, fc2)) \
            or not callable(act):
        raise TypeError("a block whose norms, projections or MLP are not where ViTs keep them")
    return LrpBlock(
        norm1=norm1, qkv=qkv, num_heads=heads, scale=float(scale), proj=proj, norm2=norm2, fc1=fc1, act=act,
        fc2=fc2, ls1=_layer_scale(_child(blk, "ls1", "layer_scale1", "ls_1")),
        ls2=_layer_scale(_child(blk, "ls2", "layer_scale2", "ls_2")),
    )


def _linear(m: Any) -> nn.Linear:
    if not isinstance(m, nn.Linear):
        raise TypeError(f"a classifier that is not one linear layer ({type(m).__name__})")
    return m


def _readout(vit: VitModel) -> tuple[nn.Module | None, list[LrpHead]]:
    """The final norm and the classifier head(s) of the supported classifiers."""
    m: Any = vit.module
    kind, P0 = type(m).__name__, vit.info.num_prefix_tokens
    if vit.info.family == "vitscope":
        return m.norm, [LrpHead(_linear(m.head), "cls")]
    if vit.info.family == "torchvision":
        if [n for n, _ in m.heads.named_children()] != ["head"]:
            raise TypeError("a pre-logits layer in the head")
        return m.encoder.ln, [LrpHead(_linear(m.heads.head), "cls")]
    if vit.info.family == "timm":
        if not isinstance(_child(m, "fc_norm"), (nn.Identity, type(None))) or getattr(m, "attn_pool", None) is not None:
            raise TypeError("a pooled head (fc_norm / attention pooling)")
        if kind == "VisionTransformerDistilled":
            if getattr(m, "distilled_training", False):
                raise TypeError("distilled training mode (two outputs)")
            return m.norm, [LrpHead(_linear(m.head), "cls"), LrpHead(_linear(m.head_dist), "dist")]
        if kind != "VisionTransformer" or getattr(m, "global_pool", "") != "token":
            raise TypeError(f"{kind} with global_pool={getattr(m, 'global_pool', None)!r} ([CLS] pooling only)")
        return m.norm, [LrpHead(_linear(m.head), "cls")]
    if vit.info.family.startswith("hf") or hasattr(m, "config"):
        if kind in ("DeiTForImageClassificationWithTeacher",):
            return m.deit.layernorm, [LrpHead(_linear(m.cls_classifier), "cls"),
                                      LrpHead(_linear(m.distillation_classifier), "dist")]
        if kind in ("ViTForImageClassification", "DeiTForImageClassification"):
            backbone = m.vit if hasattr(m, "vit") else m.deit
            return backbone.layernorm, [LrpHead(_linear(m.classifier), "cls")]
        if kind in ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"):
            backbone = m.dinov2 if hasattr(m, "dinov2") else m.dinov2_with_registers
            return backbone.layernorm, [LrpHead(_linear(m.classifier), "cls+mean", P0)]
        if kind == "CLIPForImageClassification":
            return None, [LrpHead(_linear(m.classifier), "mean", 1)]
        if kind == "SiglipForImageClassification":
            return m.vision_model.post_layernorm, [LrpHead(_linear(m.classifier), "mean", 0)]
    raise TypeError("no classifier head the rules know (image classifiers only: the relevance starts at a logit)")


_DUAL = ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipModel", "SiglipVisionModel")


def _embedding(vit: VitModel) -> LrpEmbed | None:
    """The image embedding of the supported dual encoders and their towers (``None`` for other models):
    transformers CLIP ``visual_projection(post_layernorm(x[:, 0]))``, SigLIP ``head(post_layernorm(x))``,
    open_clip ``ln_post`` and 'tok'/'avg' pooling, then ``@ proj``."""
    m: Any = vit.module
    kind = type(m).__name__
    if vit.info.family == "open_clip":
        visual = getattr(m, "visual", m)
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("open_clip attentional pooling (CoCa)")
        pool = getattr(visual, "pool_type", None)
        if pool not in ("tok", "avg"):
            raise TypeError(f"open_clip pool_type={pool!r} ('tok' or 'avg' only)")
        proj = visual.proj
        return LrpEmbed("cls" if pool == "tok" else "avg", _layer_norm(visual.ln_post),
                        None if proj is None else proj.t(), start=1,
                        norm_after_pool=bool(getattr(visual, "final_ln_after_pool", False)))
    if kind not in _DUAL:
        return None
    tower = getattr(m, "vision_model", m)  # a composite, or the tower itself (SigLIP's in transformers 5)
    proj = getattr(m, "visual_projection", None)
    if proj is not None and (not isinstance(proj, nn.Linear) or proj.bias is not None):
        raise TypeError("a visual projection that is not one linear map without bias")
    weight = None if proj is None else proj.weight
    head = getattr(tower, "head", None)
    if not kind.startswith("Siglip"):
        return LrpEmbed("cls", _layer_norm(tower.post_layernorm), weight)
    if head is None or not getattr(tower, "use_head", True):
        raise TypeError("a SigLIP tower without its attention-pooling head")
    mha, mlp = head.attention, head.mlp
    if not isinstance(mha, nn.MultiheadAttention) or mha.in_proj_weight is None or not mha.batch_first:
        raise TypeError("a pooling head whose attention is not one batch-first MultiheadAttention")
    probe = LrpProbe(head.probe, (mha.in_proj_weight, mha.in_proj_bias), mha.num_heads, mha.out_proj,
                     _layer_norm(head.layernorm), _linear(mlp.fc1), mlp.activation_fn, _linear(mlp.fc2))
    return LrpEmbed("map", _layer_norm(tower.post_layernorm), weight, probe=probe)


def _layer_norm(m: Any) -> nn.Module:
    if not isinstance(m, nn.LayerNorm):
        raise TypeError(f"a {type(m).__name__} norm in the read-out (LayerNorm only)")
    return m


def lrp_model(model: Any) -> LrpModel:
    """The rules' view of ``model`` (a `VitModel`, spec or module), or a one-line `VitscopeError` saying why
    the model is not supported."""
    from vitscope.adapters import as_vit

    vit = as_vit(model)
    if vit.info.windowed_layers:
        raise _refuse(vit, "windowed attention")
    if vit.info.num_suffix_tokens:
        raise _refuse(vit, "suffix tokens")
    try:
        embed = _embedding(vit)
        norm, heads = (None, []) if embed is not None else _readout(vit)
        blocks = [_block(vit, i) for i in range(vit.info.num_layers)]
    except (TypeError, AttributeError) as exc:
        raise _refuse(vit, str(exc).split("\n")[0]) from None
    return LrpModel(vit.sites[0].block, blocks, norm, heads, vit.info.num_prefix_tokens, embed)


# ------------------------------------------------------------------------------------------ forward, in f64


def _f64(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().double()


def _lin(x: torch.Tensor, m: nn.Linear) -> torch.Tensor:
    return F.linear(x, m.weight.double(), _f64(m.bias))


def _norm(m: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    if m is None:
        return x
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, _f64(m.weight), _f64(m.bias), m.eps)
    raise TypeError(f"a {type(m).__name__} norm (LayerNorm only)")


@dataclass
class _BlockRecord:
    x: torch.Tensor  # block input (B, N, D)
    h1: torch.Tensor  # norm1(x)
    q: torch.Tensor  # (B, H, N, d)
    k: torch.Tensor
    v: torch.Tensor
    attn: torch.Tensor  # (B, H, N, N), in the graph (its gradient is the method's ∇A)
    o: torch.Tensor  # A v merged (B, N, D)
    a: torch.Tensor  # the attention branch's output (after layer scale)
    x1: torch.Tensor  # x + a
    h2: torch.Tensor  # norm2(x1)
    u: torch.Tensor  # fc1(h2)
    g: torch.Tensor  # act(u)
    m: torch.Tensor  # the MLP branch's output (after layer scale)


@dataclass
class _ProbeRecord:
    probe: torch.Tensor  # the probe query's input (B, 1, D)
    q: torch.Tensor  # (B, H, 1, d)
    k: torch.Tensor  # (B, H, N, d)
    v: torch.Tensor
    attn: torch.Tensor  # (B, H, 1, N)
    o: torch.Tensor  # A v merged (B, 1, D)
    a: torch.Tensor  # out_proj(o) (B, 1, D)
    h: torch.Tensor  # norm(a)
    g: torch.Tensor  # act(fc1(h))
    m: torch.Tensor  # fc2(g)


@dataclass
class _Record:
    blocks: list[_BlockRecord] = field(default_factory=list)
    final: torch.Tensor | None = None  # norm(x_L) (B, N, D); for an embedding, the tokens pooled
    head_in: list[torch.Tensor] = field(default_factory=list)  # each head's input (B, D or 2D)
    head_out: list[torch.Tensor] = field(default_factory=list)  # each head's share of the logits (B, C)
    logits: torch.Tensor | None = None  # (B, C); for a token target its scores (B,)
    pooled: torch.Tensor | None = None  # the pooled feature (B, D), before a norm after pooling
    probe: _ProbeRecord | None = None
    emb: torch.Tensor | None = None  # the image embedding (B, E)


def _probe_pool(p: LrpProbe, y: torch.Tensor) -> tuple[torch.Tensor, _ProbeRecord]:
    """SigLIP's MAP head on tokens ``y`` ``(B, N, D)`` -> the pooled feature ``(B, D)`` and its record."""
    B, N, D = y.shape
    H = p.num_heads
    probe = p.probe.detach().double().expand(B, 1, D)  # (B, 1, D)
    w, bias = p.qkv[0].double(), _f64(p.qkv[1])
    wq, wk, wv = w.chunk(3)
    bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
    q = F.linear(probe, wq, bq).reshape(B, 1, H, -1).transpose(1, 2)  # (B, H, 1, d)
    k = F.linear(y, wk, bk).reshape(B, N, H, -1).transpose(1, 2)  # (B, H, N, d)
    v = F.linear(y, wv, bv).reshape(B, N, H, -1).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, 1, N)
    o = (attn @ v).transpose(1, 2).reshape(B, 1, D)
    a = _lin(o, p.proj)
    h = _norm(p.norm, a)
    g = p.act(_lin(h, p.fc1))
    m = _lin(g, p.fc2)
    return (a + m)[:, 0], _ProbeRecord(probe, q, k, v, attn, o, a, h, g, m)


def _embed_run(e: LrpEmbed, x: torch.Tensor, rec: _Record) -> torch.Tensor:
    """The image embedding ``(B, E)`` from the last block's tokens ``x`` ``(B, N, D)``, recorded in ``rec``."""
    y = x if e.norm_after_pool else _norm(e.norm, x)
    rec.final = y
    if e.pool == "map":
        assert e.probe is not None
        pooled, rec.probe = _probe_pool(e.probe, y)
    else:
        pooled = y[:, 0] if e.pool == "cls" else y[:, e.start:].mean(dim=1)  # (B, D)
    rec.pooled = pooled
    if e.norm_after_pool:
        pooled = _norm(e.norm, pooled)
    rec.emb = pooled if e.proj is None else F.linear(pooled, e.proj.double())  # (B, E)
    return rec.emb


def _run(lm: LrpModel, x: torch.Tensor, token: TokenScore | None = None) -> _Record:
    """The explicit forward from the tokens entering block 0 ``(B, N, D)`` (float64, autograd on); a token
    target is scored on the re-run's image embedding."""
    rec = _Record()
    for b in lm.blocks:
        B, N, _ = x.shape
        H = b.num_heads
        h1 = _norm(b.norm1, x)
        qkv = F.linear(h1, b.qkv[0].double(), _f64(b.qkv[1]))  # (B, N, 3D)
        q, k, v = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
        attn = torch.softmax(q @ k.transpose(-2, -1) * b.scale, dim=-1)  # (B, H, N, N)
        o = (attn @ v).transpose(1, 2).reshape(B, N, -1)  # (B, N, D)
        a = _lin(o, b.proj)
        if b.ls1 is not None:
            a = a * b.ls1.double()
        x1 = x + a
        h2 = _norm(b.norm2, x1)
        u = _lin(h2, b.fc1)
        g = b.act(u)
        m = _lin(g, b.fc2)
        if b.ls2 is not None:
            m = m * b.ls2.double()
        rec.blocks.append(_BlockRecord(x, h1, q, k, v, attn, o, a, x1, h2, u, g, m))
        x = x1 + m
    if lm.embed is not None:
        assert token is not None and token.of_embedding is not None
        rec.logits = token.of_embedding(_embed_run(lm.embed, x, rec))  # (B,)
        return rec
    final = _norm(lm.norm, x)
    rec.final = final
    for head in lm.heads:
        hin = _read(final, head, lm.num_prefix)
        rec.head_in.append(hin)
        rec.head_out.append(_lin(hin, head.linear) / len(lm.heads))
    rec.logits = torch.stack(rec.head_out).sum(dim=0)
    return rec


def _read(final: torch.Tensor, head: LrpHead, num_prefix: int) -> torch.Tensor:
    if head.read == "cls":
        return final[:, 0]
    if head.read == "dist":
        return final[:, 1]
    if head.read == "cls+mean":
        return torch.cat([final[:, 0], final[:, num_prefix:].mean(dim=1)], dim=1)
    return final[:, head.start:].mean(dim=1)


# ---------------------------------------------------------------------------------------------- the rules


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` stabilised as Chefer et al. do: ``b + 1e-9`` (``1e-9`` again where that is 0), and 0 where
    ``b == 0``."""
    den = b + _EPS
    den = den + (den == 0).to(den.dtype) * _EPS
    return a / den * (b != 0).to(b.dtype)


def zplus(r: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The alpha-beta rule with ``alpha=1, beta=0`` for ``x @ w.T`` (bias ignored): ``r`` ``(..., out)`` ->
    relevance of ``x`` ``(..., in)``."""
    wp, wn = w.clamp_min(0.0), w.clamp_max(0.0)
    xp, xn = x.clamp_min(0.0), x.clamp_max(0.0)
    s = safe_divide(r, xp @ wp.T + xn @ wn.T)  # (..., out)
    return xp * (s @ wp) + xn * (s @ wn)


def add_rule(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of the two terms of ``a + b`` (per image, dim 0): shares ``a ⊙ R/Z``, ``b ⊙ R/Z``, rescaled so
    their sums stand as ``|Σa|:|Σb|`` and add up to ``Σ R``."""
    s = safe_divide(r, a + b)
    ra, rb = a * s, b * s
    dims = tuple(range(1, r.dim()))
    sa, sb, total = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True), r.sum(dims, keepdim=True)
    fa = safe_divide(sa.abs(), sa.abs() + sb.abs()) * total
    fb = safe_divide(sb.abs(), sa.abs() + sb.abs()) * total
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


def matmul_rule(r: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of both operands of ``z = x @ y`` from ``r`` ``(..., n, m)``, each halved."""
    s = safe_divide(r, x @ y)  # (..., n, m)
    return x * (s @ y.transpose(-2, -1)) / 2, y * (x.transpose(-2, -1) @ s) / 2


@dataclass
class Relevance:
    """What the propagation gives, per layer and at the bottom (float64)."""

    attn: list[torch.Tensor]  # R^A per layer (B, H, N, N)
    grads: list[torch.Tensor]  # ∂y_c/∂A per layer (B, H, N, N)
    tokens: torch.Tensor  # relevance of the tokens entering block 0 (B, N, D)
    logits: torch.Tensor  # the re-run's logits (B, C), or a token target's scores (B,)
    absorbed: torch.Tensor | None = None  # relevance taken by a constant input (SigLIP's probe) (B,)


def _probe_rule(p: LrpProbe, pr: _ProbeRecord, y: torch.Tensor, r: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MAP head's rules: relevance ``r`` ``(B, D)`` of the pooled feature -> that of the tokens ``y``
    ``(B, N, D)`` and the probe's share ``(B,)`` (the probe is a constant: what reaches it stays there)."""
    B, _, D = y.shape  # (B, N, D)
    H = p.num_heads
    r_a, r_m = add_rule(r[:, None], pr.a, pr.m)  # a + mlp(norm(a))
    r_m = zplus(r_m, pr.g, p.fc2.weight.double())  # the activation: identity
    r_m = zplus(r_m, pr.h, p.fc1.weight.double())  # the norm: identity
    r_a = r_a + r_m  # the copy of a into both terms
    r_o = zplus(r_a, pr.o, p.proj.weight.double()).reshape(B, 1, H, -1).transpose(1, 2)  # (B, H, 1, d)
    r_att, r_v = matmul_rule(r_o, pr.attn, pr.v)  # A v; softmax: identity
    r_q, r_k = matmul_rule(r_att, pr.q, pr.k.transpose(-2, -1))  # q k^T
    wq, wk, wv = p.qkv[0].double().chunk(3)
    merge = lambda t: t.transpose(1, 2).reshape(B, t.shape[2], D)  # noqa: E731  (B, H, n, d) -> (B, n, D)
    r_probe = zplus(merge(r_q), pr.probe, wq)  # (B, 1, D)
    r_y = zplus(merge(r_k.transpose(-2, -1)), y, wk) + zplus(merge(r_v), y, wv)  # k and v: copies of y
    return r_y, r_probe.sum(dim=(1, 2))


def _embed_rule(lm: LrpModel, rec: _Record, token: TokenScore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Relevance of the tokens pooled ``(B, N, D)`` (and the probe's share) from the one-hot start at the
    target's similarity: z+ with the normalised target embedding as the classifier row, the image embedding's
    normalisation and the logit scale/bias as scalings (identity), the projection under z+, the post norm
    identity, then the pooling."""
    e, y = lm.embed, rec.final
    assert e is not None and y is not None and rec.emb is not None and rec.pooled is not None
    assert token.embedding is not None
    B = y.shape[0]
    row = F.normalize(token.embedding.detach().double().to(y.device), dim=-1)[None]  # (1, E)
    emb = F.normalize(rec.emb, dim=-1)  # (B, E)
    r = zplus(torch.ones(B, 1, dtype=y.dtype, device=y.device), emb, row)  # (B, E); normalisation: identity
    if e.proj is not None:
        r = zplus(r, rec.pooled if not e.norm_after_pool else _norm(e.norm, rec.pooled), e.proj.double())
    r_y = torch.zeros_like(y)  # (B, N, D)
    if e.pool == "cls":
        r_y[:, 0] = r
        return r_y, None
    if e.pool == "avg":
        tokens = y[:, e.start:]  # the mean of these: each token's share x_i / n * R / mean
        r_y[:, e.start:] = tokens / tokens.shape[1] * safe_divide(r, tokens.mean(dim=1))[:, None]
        return r_y, None
    assert e.probe is not None and rec.probe is not None
    return _probe_rule(e.probe, rec.probe, y, r)


def propagate(lm: LrpModel, x0: torch.Tensor, classes: torch.Tensor | None,
              token: TokenScore | None = None) -> Relevance:
    """LRP (the rules of the module docstring) from one-hot ``classes`` ``(B,)`` (or, for a dual encoder, a
    text/image ``token`` target's similarity) down to block 0's input tokens ``x0`` ``(B, N, D)``, and the
    attention gradients of the target logits (scores)."""
    with torch.inference_mode(False), torch.enable_grad():
        rec = _run(lm, x0.detach().double(), token)
        assert rec.logits is not None and rec.final is not None
        if token is not None:
            score = rec.logits.sum()
        else:
            assert classes is not None
            score = rec.logits.gather(1, classes[:, None]).sum()
        grads = torch.autograd.grad(score, [b.attn for b in rec.blocks])
    with torch.no_grad():
        absorbed = None
        if token is not None:
            r_final, absorbed = _embed_rule(lm, rec, token)
        else:
            assert classes is not None
            r_final = _head_rule(lm, rec, classes)
        r = r_final  # the final norm: identity
        cams: list[torch.Tensor] = []
        for b, br in zip(reversed(lm.blocks), reversed(rec.blocks), strict=True):
            B, N, D = br.x.shape
            r_skip, r_mlp = add_rule(r, br.x1, br.m)  # layer scale: identity
            r_mlp = zplus(r_mlp, br.g, b.fc2.weight.double())  # the activation: identity
            r_mlp = zplus(r_mlp, br.h2, b.fc1.weight.double())  # norm2: identity
            r = r_skip + r_mlp  # the copy of x1 into both branches
            r_skip, r_attn = add_rule(r, br.x, br.a)
            r_o = zplus(r_attn, br.o, b.proj.weight.double())  # (B, N, D)
            r_o = r_o.reshape(B, N, b.num_heads, -1).transpose(1, 2)  # (B, H, N, d)
            r_a, r_v = matmul_rule(r_o, br.attn.detach(), br.v)  # A v
            cams.append(r_a)  # softmax: identity
            r_q, r_k = matmul_rule(r_a, br.q, br.k.transpose(-2, -1))  # q k^T (the scale is no layer)
            r_qkv = torch.stack([r_q, r_k.transpose(-2, -1), r_v])  # (3, B, H, N, d)
            r_qkv = r_qkv.permute(1, 3, 0, 2, 4).reshape(B, N, 3 * D)  # 'qkv b h n d -> b n (qkv h d)'
            r_h = zplus(r_qkv, br.h1, b.qkv[0].double())  # norm1: identity
            r = r_skip + r_h
    return Relevance(attn=cams[::-1], grads=list(grads), tokens=r, logits=rec.logits.detach(),
                     absorbed=absorbed)


def _head_rule(lm: LrpModel, rec: _Record, classes: torch.Tensor) -> torch.Tensor:
    """Relevance of the final-norm tokens ``(B, N, D)`` from the one-hot start at the class logits."""
    assert rec.logits is not None and rec.final is not None
    r_logits = F.one_hot(classes, rec.logits.shape[1]).double()  # (B, C)
    final = rec.final
    r_final = torch.zeros_like(final)  # (B, N, D)
    shares = [r_logits]
    if len(lm.heads) == 2:  # (h1 + h2) / 2: the add rule between the two heads' shares
        shares = list(add_rule(r_logits, rec.head_out[0], rec.head_out[1]))
    for head, hin, share in zip(lm.heads, rec.head_in, shares, strict=True):
        r_in = zplus(share, hin, head.linear.weight.double())  # (B, D) or (B, 2D)
        if head.read in ("cls", "dist"):
            r_final[:, 0 if head.read == "cls" else 1] += r_in
            continue
        start = lm.num_prefix if head.read == "cls+mean" else head.start
        if head.read == "cls+mean":
            D = final.shape[-1]
            r_final[:, 0] += r_in[:, :D]
            r_in = r_in[:, D:]
        tokens = final[:, start:]  # the mean of these: each token's share x_i / n * R / mean
        r_final[:, start:] += tokens / tokens.shape[1] * safe_divide(r_in, tokens.mean(dim=1))[:, None]
    return r_final


# ------------------------------------------------------------------------------------------------- method


def check_rerun(vit: VitModel, rerun: torch.Tensor, own: torch.Tensor) -> None:
    """The explicit forward must give the model's own logits (or, for a text/image target, its own similarity
    score), else its blocks or read-out do something the rules do not model: a one-line error naming the gap."""
    own = own.detach().double()
    gap = float((rerun - own).abs().max())
    tol = 1e-3 * max(1.0, float(own.abs().max()))
    if not gap <= tol:
        what = "logits" if rerun.dim() == 2 else "target scores"
        raise _refuse(vit, f"re-running its blocks with the LRP rules' modules gives {what} {gap:.3g} away from "
                      "the model's own (its blocks or read-out compute something more: q/k norms, rotary or "
                      "relative positions, a gated MLP, ...)")


def first_tokens(vit: VitModel, pixels: torch.Tensor, lm: LrpModel,
                 ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """The tokens entering block 0 ``(B, N, D)``, the output and (for a dual encoder) the last block's output
    tokens ``(B, N, D)``, from the model's own forward (no autograd)."""
    seen: list[torch.Tensor] = []
    last: list[torch.Tensor] = []

    def grab(_m: nn.Module, args: Any, kwargs: Any) -> None:
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        seen.append(x.detach())

    def grab_last(_m: nn.Module, _args: Any, out: Any) -> None:
        last.append(_first_tensor(out).detach())

    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(eval_mode(vit.module))
        handles = stack.enter_context(hooks_removed_on_exit())
        handles.append(lm.first.register_forward_pre_hook(this_thread_only(grab), with_kwargs=True))
        if lm.embed is not None:
            handles.append(vit.sites[-1].block.register_forward_hook(this_thread_only(grab_last)))
        output = vit(pixels)
    if len(seen) != 1 or seen[0].dim() != 3:
        raise _refuse(vit, "its first block is not called once on (batch, tokens, dim) tokens")
    return seen[0], output, (last[-1] if last else None)


def lrp_target(vit: VitModel, lm: LrpModel, target: Target) -> TokenScore | None:
    """The `TokenScore` a dual encoder's relevance starts at (``None`` for a class target on a classifier), or
    a one-line error for a target the rules cannot start from."""
    if isinstance(target, list) and len(target) == 1 and isinstance(target[0], TokenScore):
        target = target[0]
    if isinstance(target, TokenScore):
        if target.embedding is None or target.of_embedding is None:
            raise VitscopeError("target", f"transformer_attribution starts its relevance at a class logit or a "
                                f"text/image similarity, not a {target.kind} target",
                                "pass 'text:<prompt>' or 'image:<path>' (dual encoders), or a class index")
        if lm.embed is None:
            raise VitscopeError("target", f"transformer_attribution has no rules for {type(vit.module).__name__}'s "
                                "image embedding (a text/image target needs a CLIP/SigLIP/open_clip image tower)",
                                "pass a class index or name, or use the 'chefer' method")
        return target
    if callable(target) and not isinstance(target, torch.Tensor):
        raise VitscopeError("target", "transformer_attribution starts its relevance at one class logit (or a "
                            "text/image similarity), not a callable",
                            "pass a class index (one per image), or None for the predicted class")
    if lm.embed is not None:
        from vitscope.methods.targets import _works

        raise VitscopeError("target", f"{vit.info.name} is a dual encoder's image tower: transformer_attribution "
                            "starts at a text or image similarity", _works(vit))
    return None


def lrp_relevance(model: Any, images: Any, target: Target = None, *, policy: SizePolicy | None = None,
              size: int | tuple[int, int] | None = None) -> tuple[Relevance, VitModel, torch.Tensor]:
    """The LRP pass of `transformer_attribution`: its `Relevance`, the model and the pixels."""
    from vitscope.capture.prepare import prepare

    vit, pixels = prepare(model, images, policy=policy, size=size)
    lm = lrp_model(vit)
    token = lrp_target(vit, lm, target)
    x0, output, last = first_tokens(vit, pixels, lm)
    if token is not None:
        assert last is not None
        grid = vit.grid_for((int(pixels.shape[-2]), int(pixels.shape[-1])))
        own = token.score(last, grid)  # the model's own score: its read-out (VitModel.embed) on its own tokens
        rel = propagate(lm, x0, None, token)
    else:
        classes = resolve_classes(vit, output, target)
        logits = vit.logits(output)
        assert classes is not None and logits is not None
        own = logits
        rel = propagate(lm, x0, classes.to(x0.device))
    check_rerun(vit, rel.logits, own)
    return rel, vit, pixels


@per_target
@grad_enabled
def transformer_attribution(
    model: Any,
    images: Any,
    target: Target = None,
    *,
    start_layer: int = 0,
    query: Query = None,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Transformer Attribution map ``(batch, rows, cols)`` (Chefer et al. CVPR 2021); see the module docstring.

    Args:
        model: a `VitModel`, spec or module of a supported classifier or dual encoder (left unchanged).
        images: anything `vitscope.capture` takes.
        target: class index or name (default the predicted class), or one per image; for a dual encoder
            (CLIP, SigLIP, open_clip) ``"text:<prompt>"`` or ``"image:<path>"`` (several: one map each,
            ``(B * T, rows, cols)`` image-major).
        start_layer: first layer of the rollout (default 0: all layers).
        query: row of the rollout giving the map (default [CLS], else the mean over patch rows; the mean over
            patch rows too for an open_clip tower with 'avg' pooling).
        policy, size: preprocessing (see `vitscope.capture`).
    """
    from vitscope.adapters import as_vit

    layers = layers_from(as_vit(model), start_layer)
    rel, vit, pixels = lrp_relevance(model, images, target, policy=policy, size=size)
    embed = lrp_model(vit).embed
    if query is None and embed is not None and embed.pool == "avg":
        query = "mean"  # the read-out averages the patches, not [CLS]: their rows are the ones it reads
    return attribution_map(rel, vit, pixels, layers, query)


def attribution_map(rel: Relevance, vit: VitModel, pixels: torch.Tensor, layers: Sequence[int],
                    query: Query = None) -> torch.Tensor:
    """``mean_h((∇A ⊙ R^A)^+)`` rolled out as ``Π (Ā + I)`` over ``layers``, the query row over the patches."""
    B, _, N, _ = rel.attn[0].shape
    c = torch.eye(N, dtype=torch.float64, device=rel.attn[0].device).expand(B, N, N).clone()
    for i in layers:
        a_bar = (rel.grads[i] * rel.attn[i]).clamp_min(0.0).mean(dim=1)  # (B, N, N)
        c = c + a_bar @ c  # (Ā + I) C
    grid = vit.grid_for((int(pixels.shape[-2]), int(pixels.shape[-1])))
    return map_from_matrix(c, vit.info.prefix, grid, query, vit.info.suffix).float().detach()


def _compute(ctx: MapContext, *, target: Target = None, start_layer: int = 0, query: Query = None) -> MapResult:
    classes = ctx.classes(target)
    grid_map = transformer_attribution(ctx.vit, ctx.pixels, classes, start_layer=start_layer, query=query)
    return MapResult(map=grid_map, meta={"target": target_meta(classes)})


def class_targets(ctx: MapContext, target: Target, method: str) -> Any:
    """``ctx.classes(target)``, refusing the targets an LRP method cannot start from (text prompts, reference
    images, patches, callables: the relevance starts at one class logit)."""
    from vitscope.methods.targets import TokenScore

    classes: Any = ctx.classes(target)
    if (isinstance(classes, list) and classes and isinstance(classes[0], TokenScore)) or callable(classes):
        kind = classes[0].kind if isinstance(classes, list) else "callable"
        raise VitscopeError("target", f"{method} starts its relevance at one class logit, not a {kind} target",
                            "pass a class index or name (one per image), or None for the predicted class")
    return classes


register(Method(
    name="transformer_attribution", compute=_compute, needs="gradients", check=lrp_model,
    summary="Transformer Attribution: LRP relevance of each attention x its gradient, positive, head mean, "
            "rollout of A + I (not 'chefer')",
    paper="Chefer, Gur & Wolf, Transformer Interpretability Beyond Attention Visualization, CVPR 2021",
))
