"""Transformer Attribution (Chefer et al. CVPR 2021) against a reference written here from the paper and the
authors' code description (hila-chefer/Transformer-Explainability, baselines/ViT: ``layers_ours.py``,
``ViT_LRP.py``, ``ViT_explanation_generator.py``): LRP layers that each keep their forward input and propagate
relevance with autograd (``gradprop``) the way those layers do, on a hand-built ViT holding the model's weights,
one image at a time (as the authors run it), then ``(grad * cam).clamp(min=0).mean(heads)`` per layer and the
rollout of ``cam + I`` (``compute_rollout_attention``), [CLS] row over the patch columns.

The model families come from one table; each model is sharpened (q/k scaled, prefix tokens and position tables
redrawn: tests/capture/families.py `sharpen`) so attention is peaked (mean row max > 0.2, asserted), and its
classifier redrawn (torchvision and timm start it at zero, which leaves no relevance to propagate).

Dual encoders (second table, `DUALS`: transformers CLIP/SigLIP with text prompts, open_clip 'tok'/'avg', towers
alone with reference images; q/k sharpened x6, mean row max > 0.2 asserted): the same reference, started at the
one-hot among the targets' similarity scores (`RefEmbed`: the normalised target embeddings as classifier rows;
SigLIP's MAP head by `RefProbe`), its read-out weights taken from the model's own attributes and its scores
checked against the model's own API (``logits_per_image``, ``encode_image``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitscope
from tests.capture.families import sharpen
from vitscope.errors import VitscopeError
from vitscope.methods.transformer_attribution import lrp_model, lrp_relevance, transformer_attribution

SIZE, PATCH, DIM, CLASSES = 32, 8, 32, 5
_HF = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
           patch_size=PATCH)


# ------------------------------------------------------------------------------------ the reference (Chefer)


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """As published (layers_ours.py)."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def simple(fn: Callable[..., torch.Tensor], xs: list[torch.Tensor], r: torch.Tensor) -> list[torch.Tensor]:
    """RelPropSimple: ``Z = fn(X); S = R / Z; C = dZ/dX^T S; R_X = X * C`` for each input."""
    xs = [_leaf(x) for x in xs]
    z = fn(*xs)
    c = torch.autograd.grad(z, xs, safe_divide(r, z))
    return [x.detach() * g for x, g in zip(xs, c, strict=True)]


def linear_ab(r: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Linear.relprop with alpha=1 (beta=0): activator relevances only, bias not in Z."""
    pw, nw, px, nx = w.clamp(min=0), w.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    x1, x2 = _leaf(px), _leaf(nx)
    z1, z2 = F.linear(x1, pw), F.linear(x2, nw)
    s = safe_divide(r, z1 + z2)
    c1 = torch.autograd.grad(z1, x1, s)[0]
    c2 = torch.autograd.grad(z2, x2, s)[0]
    return px * c1 + nx * c2


def add_rel(r: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add.relprop: the simple shares, rescaled by the absolute sums to carry R.sum()."""
    ra, rb = simple(lambda u, v: u + v, [a, b], r)
    a_sum, b_sum = ra.sum(), rb.sum()
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * r.sum()
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * r.sum()
    return ra * safe_divide(a_fact, ra.sum()), rb * safe_divide(b_fact, rb.sum())


def clone_rel(x: torch.Tensor, rs: list[torch.Tensor]) -> torch.Tensor:
    """Clone.relprop: ``X * sum_i dZ_i/dX^T (R_i / Z_i)`` with every ``Z_i = X``."""
    xl = _leaf(x)
    c = torch.autograd.grad([xl * 1.0 for _ in rs], xl, [safe_divide(r, x) for r in rs])[0]
    return x * c


@dataclass
class RefBlock:
    ln1: tuple[torch.Tensor, torch.Tensor, float]
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    heads: int
    scale: float
    wproj: torch.Tensor
    bproj: torch.Tensor
    ls1: torch.Tensor | None
    ln2: tuple[torch.Tensor, torch.Tensor, float]
    w1: torch.Tensor
    b1: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    w2: torch.Tensor
    b2: torch.Tensor
    ls2: torch.Tensor | None


def _ln(p: tuple[torch.Tensor, torch.Tensor, float] | None, x: torch.Tensor) -> torch.Tensor:
    return x if p is None else F.layer_norm(x, (x.shape[-1],), p[0], p[1], p[2])


@dataclass
class RefProbe:
    """SigLIP's attention-pooling head: ``a = MHA(probe, t, t)``, ``a + fc2(act(fc1(ln(a))))``, token 0."""

    probe: torch.Tensor  # (1, 1, D)
    w_in: torch.Tensor  # (3D, D) rows [q; k; v]
    b_in: torch.Tensor
    heads: int
    wo: torch.Tensor
    bo: torch.Tensor
    ln: tuple[torch.Tensor, torch.Tensor, float]
    w1: torch.Tensor
    b1: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    w2: torch.Tensor
    b2: torch.Tensor


@dataclass
class RefEmbed:
    """A dual encoder's read-out as a classifier over targets: pooling (``"cls"``, ``"avg"`` of tokens
    ``start:``, ``"map"``), the post norm (after pooling when ``norm_after_pool``), the projection ``(E, D)``,
    then ``scale * cos(e, row_t) + bias`` for each target embedding ``row_t`` (``rows`` ``(T, E)``)."""

    pool: str
    ln: tuple[torch.Tensor, torch.Tensor, float]
    proj: torch.Tensor | None
    rows: torch.Tensor
    scale: float = 1.0
    bias: float = 0.0
    start: int = 0
    norm_after_pool: bool = False
    probe: RefProbe | None = None
    absorbed: float = 0.0  # set by `reference`: the relevance the probe (a constant input) keeps


def _probe_forward(p: RefProbe, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    B, _, D = t.shape  # (B, N, D)
    probe = p.probe.expand(B, 1, D)
    (wq, wk, wv), (bq, bk, bv) = p.w_in.chunk(3), p.b_in.chunk(3)
    split = lambda z: z.reshape(B, z.shape[1], p.heads, -1).transpose(1, 2)  # noqa: E731  (B, H, n, d)
    q, k, v = split(F.linear(probe, wq, bq)), split(F.linear(t, wk, bk)), split(F.linear(t, wv, bv))
    attn = (torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, 1, N)
    out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(B, 1, D)
    a = F.linear(out, p.wo, p.bo)
    h = _ln(p.ln, a)
    g = p.act(F.linear(h, p.w1, p.b1))
    m = F.linear(g, p.w2, p.b2)
    return (a + m)[:, 0], dict(probe=probe, q=q, k=k, v=v, attn=attn, out=out, a=a, h=h, g=g, m=m)


def _probe_relevance(p: RefProbe, s: dict[str, torch.Tensor], t: torch.Tensor, r: torch.Tensor,
                     ) -> tuple[torch.Tensor, float]:
    """The rules on the MAP head (the paper's: add, z+ linear, identity norm/activation/softmax, halved matmul
    shares, clone sums): relevance of the tokens ``t`` and the probe's (a constant's) share."""
    d = {k: v.detach() for k, v in s.items()}
    B, _, D = d["a"].shape
    r1, r2 = add_rel(r[:, None], d["a"], d["m"])  # (a + m)[:, 0] of one query token: a reshape
    r2 = linear_ab(linear_ab(r2, d["g"], p.w2), d["h"], p.w1)
    r_a = clone_rel(d["a"], [r1, r2])
    r_o = linear_ab(r_a, d["out"], p.wo).reshape(B, 1, p.heads, -1).transpose(1, 2)
    cam, cam_v = simple(lambda a_, vv: torch.einsum("bhij,bhjd->bhid", a_, vv), [d["attn"], d["v"]], r_o)
    cam_q, cam_k = simple(lambda qq, kk: torch.einsum("bhid,bhjd->bhij", qq, kk), [d["q"], d["k"]], cam / 2)
    merge = lambda z: z.transpose(1, 2).reshape(B, z.shape[2], D)  # noqa: E731
    (wq, wk, wv) = p.w_in.chunk(3)
    absorbed = float(linear_ab(merge(cam_q / 2), d["probe"], wq).sum())
    r_t = clone_rel(t, [linear_ab(merge(cam_k / 2), t, wk), linear_ab(merge(cam_v / 2), t, wv)])
    return r_t, absorbed


def _embed_reference(e: RefEmbed, y: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dual encoder's scores ``(1, T)`` (``target``'s backpropagated) and the relevance of ``y``, the one-hot
    start at ``target`` among the normalised target rows (normalisation and logit scale/bias: identity)."""
    t = y if e.norm_after_pool else _ln(e.ln, y)
    saved: dict[str, torch.Tensor] = {}
    if e.pool == "map":
        assert e.probe is not None
        pooled, saved = _probe_forward(e.probe, t)
    else:
        pooled = t[:, 0] if e.pool == "cls" else t[:, e.start:].mean(dim=1)
    normed = _ln(e.ln, pooled) if e.norm_after_pool else pooled
    emb = normed if e.proj is None else F.linear(normed, e.proj)
    ehat, rows = F.normalize(emb, dim=-1), F.normalize(e.rows, dim=-1)
    logits = e.scale * ehat @ rows.t() + e.bias  # (1, T)
    logits[0, target].backward()
    r = linear_ab(F.one_hot(torch.tensor([target]), rows.shape[0]).double(), ehat.detach(), rows)
    if e.proj is not None:
        r = linear_ab(r, normed.detach(), e.proj)
    tdet = t.detach()
    if e.pool == "cls":
        return logits.detach(), simple(lambda u: u.index_select(1, torch.tensor([0])), [tdet], r[:, None])[0]
    if e.pool == "avg":
        return logits.detach(), simple(lambda u: u[:, e.start:].mean(dim=1), [tdet], r)[0]
    assert e.probe is not None
    r_t, e.absorbed = _probe_relevance(e.probe, saved, tdet, r)
    return logits.detach(), r_t


def _heads_reference(heads: list[tuple[torch.Tensor, torch.Tensor, str, int]], y: torch.Tensor, target: int,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier's logits ``(1, C)`` (``target``'s backpropagated) and the relevance of the final tokens ``y``
    from the one-hot start at ``target`` (the heads averaged)."""
    D = y.shape[-1]
    ins, outs = [], []
    for w, bias, read, start in heads:
        hin = {"cls": lambda t: t[:, 0], "dist": lambda t: t[:, 1],
               "cls+mean": lambda t, s=start: torch.cat([t[:, 0], t[:, s:].mean(dim=1)], dim=1),
               "mean": lambda t, s=start: t[:, s:].mean(dim=1)}[read](y)
        ins.append(hin)
        outs.append(F.linear(hin, w, bias) / len(heads))
    logits = sum(outs)
    assert isinstance(logits, torch.Tensor)
    logits[0, target].backward()  # one_hot * output, as generate_LRP does
    one_hot = F.one_hot(torch.tensor([target]), logits.shape[1]).double()
    shares = [one_hot] if len(heads) == 1 else list(add_rel(one_hot, outs[0].detach(), outs[1].detach()))
    ydet = y.detach()
    r = torch.zeros_like(ydet)
    for (w, _b, read, start), hin, share in zip(heads, ins, shares, strict=True):
        r_in = linear_ab(share, hin.detach(), w)
        if read in ("cls", "dist"):  # IndexSelect.relprop
            idx = torch.tensor([0 if read == "cls" else 1])
            r = r + simple(lambda t, i=idx: t.index_select(1, i), [ydet], r_in[:, None])[0]
            continue
        if read == "cls+mean":
            r = r + simple(lambda t: t.index_select(1, torch.tensor([0])), [ydet], r_in[:, None, :D])[0]
            r_in = r_in[:, D:]
        r = r + simple(lambda t, s=start: t[:, s:].mean(dim=1), [ydet], r_in)[0]
    return logits.detach(), r


def reference(blocks: list[RefBlock], final_ln: Any, heads: list[tuple[torch.Tensor, torch.Tensor, str, int]],
              x0: torch.Tensor, target: int, embed: RefEmbed | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One image ``x0`` ``(1, N, D)``: (logits, the transformer-attribution rollout matrix, the attentions).
    With ``embed`` (a dual encoder's image tower) the start is the one-hot ``target`` among its targets'
    similarity scores instead of the classifier ``heads``."""
    x = x0.double().requires_grad_(True)
    saved: list[dict[str, torch.Tensor]] = []
    for b in blocks:
        B, N, D = x.shape
        h1 = _ln(b.ln1, x)
        qkv = F.linear(h1, b.wqkv, b.bqkv)
        q, k, v = qkv.reshape(B, N, 3, b.heads, -1).permute(2, 0, 3, 1, 4)
        dots = torch.einsum("bhid,bhjd->bhij", q, k) * b.scale
        attn = dots.softmax(dim=-1)
        attn.retain_grad()
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(B, N, D)
        a = F.linear(out, b.wproj, b.bproj)
        a = a * b.ls1 if b.ls1 is not None else a
        x1 = x + a
        h2 = _ln(b.ln2, x1)
        u = F.linear(h2, b.w1, b.b1)
        g = b.act(u)
        m = F.linear(g, b.w2, b.b2)
        m = m * b.ls2 if b.ls2 is not None else m
        saved.append(dict(x=x, h1=h1, q=q, k=k, v=v, attn=attn, out=out, a=a, x1=x1, h2=h2, g=g, m=m))
        x = x1 + m
    y = _ln(final_ln, x)
    if embed is not None:
        logits, r = _embed_reference(embed, y, target)
    else:
        logits, r = _heads_reference(heads, y, target)
    cams = []
    for b, s in zip(reversed(blocks), reversed(saved), strict=True):
        d = {k: t.detach() for k, t in s.items()}
        r1, r2 = add_rel(r, d["x1"], d["m"])
        r2 = linear_ab(r2, d["g"], b.w2)
        r2 = linear_ab(r2, d["h2"], b.w1)
        r = clone_rel(d["x1"], [r1, r2])
        r1, r2 = add_rel(r, d["x"], d["a"])
        r2 = linear_ab(r2, d["out"], b.wproj)
        B, N, D = d["x"].shape
        r2 = r2.reshape(B, N, b.heads, -1).transpose(1, 2)
        cam1, cam_v = simple(lambda p, vv: torch.einsum("bhij,bhjd->bhid", p, vv), [d["attn"], d["v"]], r2)
        cam1, cam_v = cam1 / 2, cam_v / 2
        cams.append((cam1, s["attn"].grad))
        cam_q, cam_k = simple(lambda qq, kk: torch.einsum("bhid,bhjd->bhij", qq, kk), [d["q"], d["k"]], cam1)
        cam_q, cam_k = cam_q / 2, cam_k / 2
        cam_qkv = torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * D)
        r = clone_rel(d["x"], [r1, linear_ab(cam_qkv, d["h1"], b.wqkv)])
    mats = []
    for cam, grad in reversed(cams):
        mats.append((grad * cam).clamp(min=0).mean(dim=1))  # (1, N, N)
    eye = torch.eye(mats[0].shape[-1], dtype=torch.float64)[None]
    joint = mats[0] + eye
    for m_ in mats[1:]:
        joint = (m_ + eye).bmm(joint)
    return logits, joint, [s["attn"].detach() for s in saved]


# ------------------------------------------------------------------------------------------- the families


def _ln_of(m: Any) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    return None if m is None else (m.weight.double(), m.bias.double(), m.eps)


def _redraw_heads(module: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.split(".")[0] in ("head", "head_dist", "heads", "classifier", "cls_classifier",
                                      "distillation_classifier") and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _vitscope() -> nn.Module:
    from vitscope.models.vit import ViT, ViTConfig

    return ViT(ViTConfig(image_size=SIZE, patch_size=PATCH, dim=DIM, depth=2, heads=2, num_classes=CLASSES))


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, img_size=SIZE, patch_size=PATCH, depth=2,
                                 embed_dim=DIM, num_heads=2, **kw)

    return build


def _hf(cls: str, config: str, tower: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        if tower:  # CLIP / SigLIP image classifiers: the vision tower's config inside the joint one
            cfg = getattr(transformers, config)(vision_config=_HF, text_config=dict(
                hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
            cfg.num_labels = CLASSES
        else:
            cfg = getattr(transformers, config)(**_HF, num_labels=CLASSES)
        return getattr(transformers, cls)(cfg)

    return build


def _torchvision() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=2, num_heads=2,
                                                hidden_dim=DIM, mlp_dim=64, num_classes=CLASSES)


# (id, builder, q/k sharpening factor)
FAMILIES: list[tuple[str, Callable[[], nn.Module], float]] = [
    ("vitscope-vit", _vitscope, 16.0),
    ("timm-vit", _timm("vit_tiny_patch16_224"), 16.0),
    ("timm-dinov2-style", _timm("vit_tiny_patch16_224", init_values=0.5, reg_tokens=2), 16.0),  # layer scale
    ("timm-deit-distilled", _timm("deit_tiny_distilled_patch16_224"), 16.0),
    ("hf-vit", _hf("ViTForImageClassification", "ViTConfig"), 16.0),
    ("hf-deit-teacher", _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig"), 16.0),
    ("hf-dinov2", _hf("Dinov2ForImageClassification", "Dinov2Config"), 16.0),
    ("hf-clip", _hf("CLIPForImageClassification", "CLIPConfig", tower=True), 4.0),
    ("hf-siglip", _hf("SiglipForImageClassification", "SiglipConfig", tower=True), 2.0),
    ("torchvision-vit", _torchvision, 2.0),
]


def _model(build: Callable[[], nn.Module], factor: float) -> Any:
    torch.manual_seed(0)
    return vitscope.load(_redraw_heads(sharpen(build().eval(), factor)))


def _first_tokens(module: Callable[[torch.Tensor], Any], first: nn.Module, pixels: torch.Tensor,
                  ) -> tuple[torch.Tensor, Any]:
    """The test's own hook: the tokens entering block 0."""
    seen = []
    h = first.register_forward_pre_hook(lambda _m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).detach()),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            out = module(pixels)
    finally:
        h.remove()
    return seen[0], out


def _ref_from(vit: Any) -> tuple[list[RefBlock], Any, list[tuple[torch.Tensor, torch.Tensor, str, int]]]:
    """The reference's weights, taken from the modules vitscope found (the reference's logits are checked
    against the model's own, so a module found wrongly fails the test)."""
    lm = lrp_model(vit)
    blocks = [RefBlock(
        ln1=_ln_of(b.norm1), wqkv=b.qkv[0].detach().double(), bqkv=None if b.qkv[1] is None else b.qkv[1].detach().double(),  # type: ignore[arg-type]
        heads=b.num_heads, scale=b.scale, wproj=b.proj.weight.detach().double(), bproj=b.proj.bias.detach().double(),
        ls1=None if b.ls1 is None else b.ls1.detach().double(), ln2=_ln_of(b.norm2),  # type: ignore[arg-type]
        w1=b.fc1.weight.detach().double(), b1=b.fc1.bias.detach().double(), act=b.act,
        w2=b.fc2.weight.detach().double(), b2=b.fc2.bias.detach().double(),
        ls2=None if b.ls2 is None else b.ls2.detach().double(),
    ) for b in lm.blocks]
    heads = [(h.linear.weight.detach().double(), h.linear.bias.detach().double(), h.read, h.start) for h in lm.heads]
    return blocks, _ln_of(lm.norm), heads


def _assert_map_close(got: torch.Tensor, ref_map: torch.Tensor, fid: str) -> None:
    """``got`` (the float32 map) within 1e-4 of the reference map's range, plus float32's own rounding of each
    value (maps without [CLS] are the mean of the patch rows, ~1/P each, with a small range: a relative
    tolerance on the normalised values would be loose)."""
    span = float(ref_map.max() - ref_map.min())
    assert span > 1e-7, fid  # not a flat map
    atol = 1e-4 * span + 2.0**-23 * float(ref_map.abs().max())
    torch.testing.assert_close(got.double(), ref_map, atol=atol, rtol=0, msg=lambda m: f"{fid}: {m}")


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request: pytest.FixtureRequest) -> Any:
    fid, build, factor = request.param
    return fid, _model(build, factor)


def test_matches_chefers_procedure_and_conserves(family: Any) -> None:
    fid, vit = family
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    got = transformer_attribution(vit, pixels, target=[1, 3])  # (2, rows, cols)
    rel, _, _ = lrp_relevance(vit, pixels, target=[1, 3])
    blocks, final_ln, heads = _ref_from(vit)
    x0, out = _first_tokens(vit.module, lrp_model(vit).first, pixels)
    own = vit.logits(out)
    P0, (rows, cols) = vit.info.num_prefix_tokens, vit.grid_for((SIZE, SIZE))
    for i, target in enumerate([1, 3]):
        logits, joint, attns = reference(blocks, final_ln, heads, x0[i:i + 1], target)
        torch.testing.assert_close(logits[0].float(), own[i], atol=1e-4, rtol=1e-4)  # the re-run is the model
        if i == 0:  # peaked attention, or the test could not tell rules apart
            assert min(float(a.amax(dim=-1).mean()) for a in attns) > 0.2, fid
        patches = slice(P0, P0 + rows * cols)  # [CLS] row; without [CLS] (SigLIP) the mean of the patch rows
        row = joint[0, 0] if "cls" in vit.info.prefix else joint[0, patches].mean(dim=0)
        ref_map = row[patches].reshape(rows, cols)
        _assert_map_close(got[i], ref_map, fid)
    # conservation: the one-hot start (1 per image) reaches block 0's input tokens whole (z+ and the add rule
    # conserve; only the 1e-9 stabiliser and all-zero outputs lose any)
    torch.testing.assert_close(rel.tokens.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_differs_from_the_iccv_chefer_method() -> None:
    vit = _model(_vitscope, 16.0)
    pixels = torch.randn(1, 3, SIZE, SIZE)
    ta = transformer_attribution(vit, pixels, target=2)
    iccv = vitscope.methods.chefer_relevance(vit, pixels, target=2)
    assert float((ta - iccv).abs().max()) > 1e-3


def test_registered_and_reached_through_maps() -> None:
    vit = _model(_timm("vit_tiny_patch16_224"), 16.0)
    pixels = torch.randn(1, 3, SIZE, SIZE)
    res = vitscope.maps(vit, pixels, "transformer_attribution", target=4)
    torch.testing.assert_close(res.map, transformer_attribution(vit, pixels, target=4))


@pytest.mark.parametrize(("build", "words"), [
    (_timm("vit_tiny_patch16_224", qk_norm=True), "logits"),  # the re-run check: q/k norms are not modelled
    (_timm("vit_tiny_patch16_224", global_pool="avg"), "pooled head"),
    (_hf("CLIPVisionModel", "CLIPVisionConfig"), "image tower"),  # a class target on a tower (no classifier)
])
def test_unsupported_models_are_refused_in_one_line(build: Callable[[], nn.Module], words: str) -> None:
    vit = _model(build, 4.0)
    with pytest.raises(VitscopeError, match=words) as err:
        transformer_attribution(vit, torch.randn(1, 3, SIZE, SIZE), target=0)
    assert "\n" not in str(err.value) and err.value.argument in ("method", "target")


def test_a_callable_target_is_refused() -> None:
    vit = _model(_vitscope, 16.0)
    with pytest.raises(VitscopeError, match="one class logit"):
        transformer_attribution(vit, torch.randn(1, 3, SIZE, SIZE), target=lambda out: out[:, 0])


def test_supported_methods_leaves_out_a_refused_family() -> None:
    from vitscope.methods.api import supported_methods

    pooled = _model(_timm("vit_tiny_patch16_224", global_pool="avg"), 4.0)  # a pooled head: refused
    assert "transformer_attribution" not in supported_methods(pooled) and "chefer" in supported_methods(pooled)
    tower = _model(_hf("CLIPVisionModel", "CLIPVisionConfig"), 4.0)  # an image tower: image targets
    assert "transformer_attribution" in supported_methods(tower)


def test_token_targets_are_refused_and_class_names_accepted(tmp_path: Path) -> None:
    """Main's target vocabulary: a class name resolves to its index; a patch target, and a reference image on a
    classifier (whose embedding has no similarity start), are one line each."""
    vit = vitscope.load(_redraw_heads(sharpen(_vitscope().eval(), 16.0)))
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(VitscopeError, match="not a patch target") as err:
        vitscope.maps(vit, pixels, "transformer_attribution", target="patch:1,1")
    assert err.value.argument == "target" and "\n" not in str(err.value)
    hf_vit = _model(_hf("ViTForImageClassification", "ViTConfig"), 16.0)  # has an image embedding, no rules
    with pytest.raises(VitscopeError, match="image embedding") as err:
        vitscope.maps(hf_vit, pixels, "transformer_attribution", target=f"image:{_save_refs(tmp_path)[0]}")
    assert err.value.argument == "target" and "\n" not in str(err.value)
    named = vitscope.maps(vit, pixels, "transformer_attribution",
                          target=vitscope.methods.targets.ClassName("c", labels=list("abcde"))).map
    torch.testing.assert_close(named, transformer_attribution(vit, pixels, target=2))


# -------------------------------------------------- dual encoders: text / image targets (the similarity start)


@dataclass
class Dual:
    vit: Any
    targets: list[str]  # two targets: the reference's "classes"
    rows: torch.Tensor  # (T, E) the targets' embeddings, from the model's own API
    scale: float  # the score: scale * cos + bias (text: the model's logit scale and bias; image: 1, 0)
    bias: float
    api: Callable[[torch.Tensor], torch.Tensor]  # pixels -> (B, T) the model's own scores


def _save_refs(tmp: Path) -> list[str]:
    from PIL import Image

    paths = []
    for i in range(2):
        path = tmp / f"ref{i}.png"
        Image.fromarray(np.random.default_rng(20 + i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _image_targets(vit: Any, tmp: Path, embed: Callable[[torch.Tensor], torch.Tensor]) -> Dual:
    """``image:`` targets: two reference images, scored ``cos(embed(pixels), embed(ref))`` by the model's API."""
    from vitscope.capture.prepare import prepare

    paths = _save_refs(tmp)
    with torch.no_grad():
        rows = torch.cat([embed(prepare(vit, p)[1]) for p in paths]).double()  # (T, E)

    def api(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.cosine_similarity(embed(pixels).double()[:, None], rows[None], dim=-1)  # (B, T)

    return Dual(vit, [f"image:{p}" for p in paths], rows, 1.0, 0.0, api)


def _hf_text(kind: str) -> Callable[[Path], Dual]:
    def build(tmp: Path) -> Dual:
        from tests.methods import targetcases as tc

        vit = tc.hf_dual(tmp, kind).vit  # saved with its tokenizer, loaded from the folder (q/k sharpened x6)
        m: Any = vit.module
        prompts = ["a cat", "a dog"]
        inputs = vit.text.tokenize(prompts)
        with torch.no_grad():
            rows = vit.text.encode(inputs).double()
        bias = getattr(m, "logit_bias", None)

        def api(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return m(pixel_values=pixels, **inputs).logits_per_image.double()  # (B, T)

        return Dual(vit, [f"text:{p}" for p in prompts], rows, float(m.logit_scale.detach().exp()),
                    0.0 if bias is None else float(bias.detach()), api)

    return build


def _open_clip_text(tmp: Path) -> Dual:
    import open_clip

    from tests.methods import targetcases as tc

    m = tc.open_clip_model()  # 'tok' pooling, ln_post before pooling (q/k sharpened x6)
    vit = vitscope.load(m)
    prompts = ["a cat", "a dog"]
    with torch.no_grad():
        rows = m.encode_text(open_clip.tokenize(prompts)).double()
    scale = float(m.logit_scale.detach().exp())

    def api(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            img = F.normalize(m.encode_image(pixels).double(), dim=-1)
            return scale * img @ F.normalize(rows, dim=-1).t()

    return Dual(vit, [f"text:{p}" for p in prompts], rows, scale, 0.0, api)


def _open_clip_avg(tmp: Path) -> Dual:
    import open_clip

    torch.manual_seed(6)
    m = open_clip.CLIP(embed_dim=16, vision_cfg=open_clip.model.CLIPVisionCfg(
        layers=2, width=32, head_width=16, patch_size=PATCH, image_size=SIZE, mlp_ratio=2, pool_type="avg",
        final_ln_after_pool=True), text_cfg=open_clip.model.CLIPTextCfg(width=32, heads=2, layers=1))
    sharpen(m.visual, 6.0)
    return _image_targets(vitscope.load(m.eval()), tmp, m.encode_image)


def _hf_tower(cls: str, config: str) -> Callable[[Path], Dual]:
    """A vision tower alone (``...WithProjection`` or SigLIP's, its pooling head included): ``image:`` targets."""
    def build(tmp: Path) -> Dual:
        import transformers

        torch.manual_seed(7)
        extra = {"projection_dim": 16} if cls.startswith("CLIP") else {}
        m = sharpen(getattr(transformers, cls)(getattr(transformers, config)(**_HF, **extra)).eval(), 6.0)
        key = "image_embeds" if cls.startswith("CLIP") else "pooler_output"
        return _image_targets(vitscope.load(m), tmp, lambda px: getattr(m(pixel_values=px), key))

    return build


# (id, builder): transformers CLIP ([CLS], projection) and SigLIP (MAP head, logit bias -1.5) with text prompts;
# open_clip 'tok' with text prompts and 'avg' + LayerNorm after pooling with reference images; towers alone
DUALS: list[tuple[str, Callable[[Path], Dual]]] = [
    ("hf-clip-text", _hf_text("clip")),
    ("hf-siglip-text", _hf_text("siglip")),
    ("open-clip-tok-text", _open_clip_text),
    ("open-clip-avg-image", _open_clip_avg),
    ("hf-clip-projection-image", _hf_tower("CLIPVisionModelWithProjection", "CLIPVisionConfig")),
    ("hf-siglip-tower-image", _hf_tower("SiglipVisionModel", "SiglipVisionConfig")),
]


def _ref_embed(d: Dual) -> RefEmbed:
    """The read-out, taken from the model where its own code keeps it (not from vitscope's view of it)."""
    m: Any = d.vit.module
    f = lambda t: t.detach().double()  # noqa: E731
    if not hasattr(m, "visual"):  # transformers: a composite, or the tower itself
        tower, proj = getattr(m, "vision_model", m), getattr(m, "visual_projection", None)
        head = getattr(tower, "head", None)
        probe = None if head is None else RefProbe(
            f(head.probe), f(head.attention.in_proj_weight), f(head.attention.in_proj_bias), head.attention.num_heads,
            f(head.attention.out_proj.weight), f(head.attention.out_proj.bias), _ln_of(head.layernorm),  # type: ignore[arg-type]
            f(head.mlp.fc1.weight), f(head.mlp.fc1.bias), head.mlp.activation_fn, f(head.mlp.fc2.weight),
            f(head.mlp.fc2.bias))
        return RefEmbed("cls" if probe is None else "map", _ln_of(tower.post_layernorm),  # type: ignore[arg-type]
                        None if proj is None else f(proj.weight), d.rows, d.scale, d.bias, probe=probe)
    v = m.visual
    return RefEmbed("cls" if v.pool_type == "tok" else "avg", _ln_of(v.ln_post), f(v.proj).t(),  # type: ignore[arg-type]
                    d.rows, d.scale, d.bias, start=1, norm_after_pool=v.final_ln_after_pool)


@pytest.fixture(scope="module", params=DUALS, ids=[f[0] for f in DUALS])
def dual(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Dual]:
    fid, build = request.param
    return fid, build(tmp_path_factory.mktemp(fid))


def _check_against_reference(fid: str, d: Dual, pixels: torch.Tensor) -> None:
    """Each target's map (one-hot among the targets' similarities) equals the reference within 1e-4 of the map's
    range; the reference's scores are the model's own API scores (so the read-out it reads is the model's)."""
    vit = d.vit
    got = transformer_attribution(vit, pixels, d.targets)  # (B * T, rows, cols), image-major
    blocks, _, _ = _ref_from(vit)
    x0, _ = _first_tokens(vit, lrp_model(vit).first, pixels)  # the model's route (a dual encoder: its tower)
    own = d.api(pixels)  # (B, T)
    P0, (rows, cols) = vit.info.num_prefix_tokens, vit.grid_for((SIZE, SIZE))
    patches = slice(P0, P0 + rows * cols)
    emb = _ref_embed(d)
    T = len(d.targets)
    for i in range(pixels.shape[0]):
        for t in range(T):
            logits, joint, attns = reference(blocks, None, [], x0[i:i + 1], t, embed=emb)
            torch.testing.assert_close(logits[0], own[i], atol=1e-4, rtol=1e-4)  # the re-run is the model's score
            if i == t == 0:  # peaked attention, or the test could not tell rules apart
                assert min(float(a.amax(dim=-1).mean()) for a in attns) > 0.2, fid
            # [CLS] row where the read-out pools [CLS]; else (SigLIP, open_clip 'avg') the mean of the patch rows
            cls = "cls" in vit.info.prefix and emb.pool == "cls"
            row = joint[0, 0] if cls else joint[0, patches].mean(dim=0)
            ref_map = row[patches].reshape(rows, cols)
            _assert_map_close(got[i * T + t], ref_map, fid)


def test_text_and_image_targets_match_chefers_procedure_and_conserve(dual: tuple[str, Dual]) -> None:
    """The maps equal the reference (`_check_against_reference`); the relevance entering block 0 plus what
    SigLIP's probe keeps is the one-hot start (1 per image), the probe's share equal to the reference's."""
    from vitscope.methods.targets import resolve_target

    fid, d = dual
    vit = d.vit
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    _check_against_reference(fid, d, pixels)
    blocks, _, _ = _ref_from(vit)
    x0, _ = _first_tokens(vit, lrp_model(vit).first, pixels)
    emb = _ref_embed(d)
    for t, target in enumerate(resolve_target(vit, d.targets)):
        rel, _, _ = lrp_relevance(vit, pixels, target)
        kept = torch.zeros(2, dtype=torch.float64) if rel.absorbed is None else rel.absorbed
        torch.testing.assert_close(rel.tokens.sum(dim=(1, 2)) + kept, torch.ones(2, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        reference(blocks, None, [], x0[1:2], t, embed=emb)
        assert float(kept[1]) == pytest.approx(emb.absorbed, abs=1e-9)  # the probe's share, as the reference's
        assert (emb.probe is not None) == (float(kept[1]) > 0.1), fid  # SigLIP's probe keeps q's quarter


def test_a_broken_pooling_head_rule_fails_the_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Mutation: SigLIP's MAP head with its MLP term given no relevance (all of it to the residual) no longer
    matches the reference, so the reference test can tell the head's rule apart."""
    import dataclasses
    import importlib

    tam = importlib.import_module("vitscope.methods.transformer_attribution")  # the module, not the function

    d = _hf_text("siglip")(tmp_path)
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    _check_against_reference("hf-siglip-text", d, pixels)  # the unbroken rule passes
    rule = tam._probe_rule
    monkeypatch.setattr(tam, "_probe_rule", lambda p, pr, y, r: rule(p, dataclasses.replace(
        pr, m=torch.zeros_like(pr.m)), y, r))
    with pytest.raises(AssertionError):
        _check_against_reference("hf-siglip-text", d, pixels)


@pytest.mark.parametrize(("kind", "norm"), [("clip", "vision_model.post_layernorm"),
                                            ("siglip", "vision_model.head.layernorm")])
def test_a_read_out_the_rerun_does_not_reproduce_is_refused(kind: str, norm: str, tmp_path: Path) -> None:
    """A tower whose read-out computes something more than its modules say (here a hook adding an offset after
    a norm) gives a re-run score away from the model's own: refused in one line naming ``method``."""
    from tests.methods import targetcases as tc

    vit = tc.hf_dual(tmp_path, kind).vit
    pixels = torch.randn(1, 3, SIZE, SIZE)
    transformer_attribution(vit, pixels, "text:a cat")  # reproduced: no error
    handle = vit.module.get_submodule(norm).register_forward_hook(lambda _m, _i, out: out + 1.0)
    try:
        with pytest.raises(VitscopeError, match="target scores") as err:
            transformer_attribution(vit, pixels, "text:a cat")
    finally:
        handle.remove()
    assert "\n" not in str(err.value) and err.value.argument == "method"


def test_console_script_text_target(tmp_path: Path) -> None:
    """The installed script: ``maps IMG -m hf:<SigLIP folder> --method transformer_attribution --target
    "text:a cat"`` writes the library's map (and records the target); nothing else in the tree changes."""
    from PIL import Image

    from tests.hostile.harness import check_contained, run_script, tree_state
    from tests.methods import targetcases as tc

    vit = tc.hf_dual(tmp_path, "siglip").vit
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "cat.npz"
    before = tree_state(tmp_path)
    res = run_script(["maps", str(img), "-m", f"hf:{vit.info.name}", "--method", "transformer_attribution",
                      "--target", "text:a cat", "-o", str(out)], cwd=tmp_path, timeout=300)
    assert res.code == 0, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, outputs=[out, tmp_path / "cat.png"])
    with np.load(out) as data:
        got, meta = data["map"], str(data["meta_json"])
    want = vitscope.maps(vit, str(img), "transformer_attribution", target="text:a cat").map
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-9)
    assert "text:a cat" in meta and float(np.abs(got).max()) > 0
