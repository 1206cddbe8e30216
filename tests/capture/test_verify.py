"""Self-verification (issue 17): every captured call proves ``A_rows @ V == O_rows`` against the kernel's own
output, the weights multiplied with V are the softmax output, and batch and heads come from the kernel call.

One table of toy attention blocks (4 heads, 16 px images of 4 px patches: [CLS] + 4x4 tokens, q/k projections
drawn with std 0.6 so attention is peaked: mean row max > 0.2, asserted) that vitscope must capture exactly, and
one table with a row per guard that must refuse with a one-line `CaptureError`. Every guard row fails on the code
before issue 17 (a silently wrong map or a raw IndexError/RuntimeError).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function_variadic

import vitscope
from vitscope.capture.core import capture_full
from vitscope.capture.intercept import CaptureError

HEADS, DIM, PATCH, SIZE = 4, 16, 4, 16


def _softmax64(logits: torch.Tensor) -> torch.Tensor:
    """Reference softmax in float64 written with exp/sum (no softmax call the interceptor would see)."""
    x = logits.detach().double()
    e = (x - x.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


class Block(nn.Module):
    """One attention block computing attention the ``kind`` way; ``ref`` holds the softmax(q k^T / sqrt(d)) it
    computed on its last forward, ``(B, H, N, N)`` float64."""

    def __init__(self, kind: str, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.randn(3 * DIM, DIM, generator=g) * 0.6)  # peaked attention
        self.mix = nn.Parameter(torch.eye(HEADS) + 0.5 * torch.randn(HEADS, HEADS, generator=g))  # talking heads
        if kind.startswith("mha"):
            self.mha = (ScaledMHA if kind == "mha_scaled" else nn.MultiheadAttention)(DIM, HEADS, batch_first=True)
            with torch.no_grad():
                self.mha.in_proj_weight.copy_(torch.randn(3 * DIM, DIM, generator=g) * 0.6)
        self.ref: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, d = HEADS, C // HEADS
        kind = self.kind
        if kind.startswith("mha"):
            q, k, _ = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).reshape(B, N, 3, H, d).permute(
                2, 0, 3, 1, 4)
            self.ref = _softmax64(q.double() @ k.double().transpose(-2, -1) * d**-0.5)
            return x + self.mha(x, x, x, need_weights=False)[0]
        q, k, v = self.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
        if kind == "gqa":  # 2 key/value heads, each serving 2 query heads
            k, v = k[:, ::2], v[:, ::2]  # (B, 2, N, d)
            self.ref = _softmax64(q.double() @ k.repeat_interleave(2, dim=1).double().transpose(-2, -1) * d**-0.5)
        else:
            self.ref = _softmax64(q.double() @ k.double().transpose(-2, -1) * d**-0.5)
        keymask = (torch.arange(N) % 3 != 1).to(x.dtype)  # (N,): hides every third key after the softmax
        if kind in ("sdpa", "sdpa_plus"):
            o = F.scaled_dot_product_attention(q, k, v)
            if kind == "sdpa_plus":  # the module changes the kernel's output afterwards: not the attention's business
                o = o + 1.0
        elif kind == "gqa":
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif kind == "heads_first":  # q, k, v laid out (H, B, N, d): the kernel's "batch" is the heads
            qh, kh, vh = (t.transpose(0, 1) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qh, kh, vh).transpose(0, 1)
        elif kind.startswith("fold_"):  # heads folded into the batch, 3-d (SAM, ViTDet); batch- or heads-major
            major = "heads" if kind.endswith("heads_major") else "batch"
            if kind == "fold_twice":  # images x 2 copies x heads: not images x heads
                q, k, v = (torch.cat([t, t.flip(2)]) for t in (q, k, v))
            L = q.shape[0] * H
            qf, kf, vf = (t.transpose(0, 1) if major == "heads" else t for t in (q, k, v))
            qf, kf, vf = (t.reshape(L, N, d) for t in (qf, kf, vf))  # (B*H, N, d) or (H*B, N, d)
            if kind.startswith("fold_eager"):
                of = (qf @ kf.transpose(-2, -1) * d**-0.5).softmax(dim=-1) @ vf  # softmax of (B*H, N, N)
            else:
                of = F.scaled_dot_product_attention(qf, kf, vf)
            of = of.reshape(H, L // H, N, d).transpose(0, 1) if major == "heads" else of.reshape(L // H, H, N, d)
            o = of[:B]
        elif kind == "per_head":  # one kernel call per head
            o = torch.cat([F.scaled_dot_product_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1])
                           for h in range(H)], dim=1)
        elif kind == "windowed":  # the first 2w tokens in 2 windows of w folded into the batch (the rest kept)
            w = N // 2
            qw, kw, vw = (t[:, :, :2 * w].reshape(B, H, 2, w, d).transpose(1, 2).reshape(2 * B, H, w, d)
                          for t in (q, k, v))  # (B*2, H, w, d)
            ow = F.scaled_dot_product_attention(qw, kw, vw).reshape(B, 2, H, w, d).transpose(1, 2)
            o = torch.cat([ow.reshape(B, H, 2 * w, d), v[:, :, 2 * w:]], dim=2)
        elif kind == "fold":  # extra entries folded into the batch (a flipped copy of the tokens)
            o = F.scaled_dot_product_attention(*(torch.cat([t, t.flip(2)]) for t in (q, k, v)))[:B]
        else:
            logits = q @ k.transpose(-2, -1) * d**-0.5  # (B, H, N, N)
            self.ref = _softmax64(logits)  # what the model's own softmax gets (its logits rounded to its dtype)
            if kind == "eager_cast":  # transformers' eager: float32 softmax cast back, eval-mode dropout
                p = F.dropout(F.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype), p=0.1, training=False)
            else:
                p = logits.softmax(dim=-1)
            if kind == "eager":
                o = p @ v
            elif kind == "eager_cast":
                o = torch.matmul(p, v)
            elif kind == "eager_bmm":
                o = torch.bmm(p.reshape(B * H, N, N), v.reshape(B * H, N, d)).reshape(B, H, N, d)
            elif kind == "einsum":
                o = torch.einsum("bhij,bhjd->bhid", p, v)
            elif kind == "talking":  # heads mixed after the softmax (CaiT's proj_w)
                o = torch.einsum("bhij,hg->bgij", p, self.mix) @ v
            elif kind == "postmask":
                o = (p * keymask) @ v
            elif kind == "renorm":
                pm = p * keymask
                o = (pm / pm.sum(-1, keepdim=True)) @ v
            elif kind == "noproduct":  # A V without a product call vitscope can see
                o = (p.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
            else:
                raise ValueError(kind)
        return x + self.proj(o.transpose(1, 2).reshape(B, N, C))


class ScaledMHA(nn.MultiheadAttention):
    """An nn.MultiheadAttention whose output is not out_proj(A V) (scaled afterwards)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        y, w = super().forward(*args, **kwargs)
        return y * 1.5, w


class Toy(nn.Module):
    def __init__(self, kinds: tuple[str, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, DIM, kernel_size=PATCH, stride=PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.ModuleList([Block(kind, seed=i) for i, kind in enumerate(kinds)])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x


DECL: dict[str, Any] = {"blocks": "blocks.*", "num_heads": HEADS, "patch_size": PATCH, "prefix": ("cls",),
                        "image_size": SIZE}


def _toy(kind: str, dtype: torch.dtype = torch.float32, **decl: Any) -> tuple[nn.Module, vitscope.VitModel]:
    model = Toy((kind, kind)).eval().to(dtype)
    return model, vitscope.wrap(model, **{**DECL, **decl})


def _no_state_left(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    assert torch._C._len_torch_function_stack() == 0


def _pixels(batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch)).to(dtype)


# ------------------------------------------------------------------------------------------------ exact paths
EXACT = ["sdpa", "sdpa_plus", "gqa", "eager", "eager_cast", "eager_bmm", "einsum", "mha", "fold_sdpa", "fold_eager"]


_HALF_OK = ("sdpa", "gqa", "eager_cast", "mha")  # bf16 eager softmax outputs fail the row-sum check (1e-4) anyway


@pytest.mark.parametrize(("kind", "dtype"), [(k, torch.float32) for k in EXACT]
                         + [(k, torch.bfloat16) for k in _HALF_OK], ids=lambda x: str(x).replace("torch.", ""))
def test_verified_paths_capture_exactly(kind: str, dtype: torch.dtype) -> None:
    """Every kernel form that multiplies the softmax output with V passes verification, in half precision too,
    and the map equals the block's own softmax(q k^T / sqrt(d)) (batch 3, all rows)."""
    model, vit = _toy(kind, dtype)
    pixels = _pixels(3, dtype)
    attn = vitscope.capture(vit, pixels)
    ref = torch.stack([blk.ref for blk in model.blocks]).float()  # (L, B, H, N, N)
    assert ref.amax(-1).mean() > 0.2  # peaked: a wrong capture cannot pass by accident
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # bf16: softmax of the same bf16 q, k, in float32 vs float64
    torch.testing.assert_close(attn.weights, ref, atol=tol, rtol=0)
    cls = vitscope.capture(vit, pixels, layers=[-1], queries="cls", heads="mean")  # the [CLS] + head-mean path
    torch.testing.assert_close(cls.weights[0, :, 0, 0], ref[-1, :, :, 0].mean(1), atol=tol, rtol=0)
    with torch.no_grad():
        assert torch.equal(capture_full(vit, pixels, layers=[0]).output, model(pixels))  # bit-identical
    _no_state_left(model)


# ------------------------------------------------------------------------------------------------ guards
def _patched_sdpa(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A stand-in for F.scaled_dot_product_attention (dispatching through torch functions like the real one)
    whose output is ``fn(q, k, v, scale)`` instead of softmax(q k^T * scale) V."""

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> Any:
        if has_torch_function_variadic(query, key, value):
            return handle_torch_function(sdpa, (query, key, value), query, key, value, attn_mask=attn_mask,
                                         dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return fn(query, key, value, scale if scale is not None else query.shape[-1] ** -0.5)

    return sdpa


_REAL_SDPA = F.scaled_dot_product_attention


def _sigmoid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.sigmoid(q @ k.transpose(-2, -1) * scale) @ v / k.shape[-2]


def _hidden_key_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    keep = (torch.arange(k.shape[-2]) % 4 != 3)[None, :]  # (1, Nk): a mask the kernel applies but never receives as attn_mask
    return _REAL_SDPA(q, k, v, attn_mask=keep, scale=scale)


@contextmanager
def _kernel(fn: Callable[..., torch.Tensor] | None) -> Iterator[None]:
    if fn is None:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", _patched_sdpa(fn))
        yield


def _cait() -> tuple[nn.Module, vitscope.VitModel]:
    timm = pytest.importorskip("timm")
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=SIZE * 2, depth=2, depth_token_only=1)
    model.eval()
    return model, vitscope.wrap(model, blocks="blocks.*", attn="attn", num_heads=4, patch_size=16, prefix=(),
                                image_size=SIZE * 2)


@dataclass(frozen=True)
class Guard:
    id: str
    build: Callable[[], tuple[nn.Module, vitscope.VitModel]]
    match: str
    batch: int = 2
    kernel: Callable[..., torch.Tensor] | None = None
    size: int = SIZE


_NOT_SOFTMAX = r"layer 0: the weights multiplied with V are not the softmax output \(a step after the softmax"
_NOT_AV = r"layer 0: the kernel's output is not softmax\(q k\^T\) V for the captured rows"
GUARDS = [
    Guard("talking-heads-timm-cait", _cait, _NOT_SOFTMAX, size=SIZE * 2),
    Guard("talking-heads-custom", lambda: _toy("talking"), _NOT_SOFTMAX),
    Guard("post-softmax-mask", lambda: _toy("postmask"), _NOT_SOFTMAX),
    Guard("renormalised-after-mask", lambda: _toy("renorm"), _NOT_SOFTMAX),
    Guard("no-product-with-v", lambda: _toy("noproduct"), r"layer 0: vitscope cannot see what multiplies V"),
    Guard("num-heads-2-on-4", lambda: _toy("sdpa", num_heads=2), r"computes 4 head\(s\) per call.*num_heads=2"),
    Guard("num-heads-8-on-4", lambda: _toy("sdpa", num_heads=8), r"computes 4 head\(s\) per call.*num_heads=8"),
    Guard("num-heads-2-on-4-eager", lambda: _toy("eager", num_heads=2), r"computes 4 head\(s\) per call"),
    Guard("num-heads-2-on-4-mha", lambda: _toy("mha", num_heads=2), r"computes 4 head\(s\) per call"),
    Guard("heads-first-batch-equals-heads", lambda: _toy("heads_first"), r"batch axis has 4 entries for 1 image",
          batch=HEADS),
    Guard("heads-first", lambda: _toy("heads_first"), r"layer 0: the attention kernel's batch axis has \d+ entries for \d+ image"),
    Guard("per-head-sdpa-loop", lambda: _toy("per_head"), r"computes 1 head\(s\) per call \(one kernel call per"),
    Guard("folded-into-batch", lambda: _toy("fold"), r"batch axis has \d+ entries for \d+ image"),
    Guard("windowed-by-measurement", lambda: _toy("windowed"),
          r"^layers: layer 0 attends within 2 local windows of \d+ tokens \(not over all \d+ tokens\)"),
    Guard("fold-heads-major-sdpa", lambda: _toy("fold_sdpa_heads_major"), r"layer 0: its attention folds heads "
          r"into the batch heads-major", batch=3),
    Guard("fold-heads-major-softmax", lambda: _toy("fold_eager_heads_major"), r"layer 0: its attention folds heads "
          r"into the batch heads-major", batch=2),
    Guard("fold-not-images-times-heads", lambda: _toy("fold_twice"), r"layer 0: scaled_dot_product_attention got "
          r"3-d queries"),
    Guard("kernel-sigmoid-attention", lambda: _toy("sdpa"), _NOT_AV, kernel=_sigmoid_attention),
    Guard("kernel-hidden-mask", lambda: _toy("sdpa"), _NOT_AV, kernel=_hidden_key_mask),
    Guard("mha-output-not-out-proj-av", lambda: _toy("mha_scaled"), _NOT_AV),
]


@pytest.mark.parametrize("guard", GUARDS, ids=[g.id for g in GUARDS])
def test_guard_fires_in_one_line(guard: Guard) -> None:
    model, vit = guard.build()
    pixels = torch.randn(guard.batch, 3, guard.size, guard.size, generator=torch.Generator().manual_seed(1))
    with _kernel(guard.kernel), pytest.raises(CaptureError, match=guard.match) as err:
        vitscope.capture(vit, pixels)
    assert "\n" not in str(err.value)
    _no_state_left(model)


@pytest.mark.parametrize("path", ["cls_maps", "fused", "gradients"])
def test_every_path_verifies(path: str) -> None:
    """The guards sit in the engine: streaming and gradient paths refuse the same kernel."""
    from vitscope.capture.streaming import fused_attention
    from vitscope.methods._gradients import trace

    model, vit = _toy("sdpa")
    pixels = _pixels(2)
    run: dict[str, Callable[[], Any]] = {
        "cls_maps": lambda: vitscope.capture(vit, pixels, layers=[-1], queries="cls", heads="mean"),
        "fused": lambda: fused_attention(vit, pixels),
        "gradients": lambda: trace(vit, pixels),
    }
    with _kernel(_sigmoid_attention), pytest.raises(CaptureError, match=r"the kernel's output is not softmax"):
        run[path]()
    _no_state_left(model)
    run[path]()  # the real kernel passes


def test_guard_mid_forward_leaves_nothing_hooked() -> None:
    """A guard firing in layer 1 (after layer 0 reported) leaves no hook and no torch function mode behind, and a
    normal capture of the same model afterwards is exact."""
    model = Toy(("sdpa", "talking")).eval()
    vit = vitscope.wrap(model, **DECL)
    pixels = _pixels(3)
    with pytest.raises(CaptureError, match=r"layer 1: the weights multiplied with V are not the softmax output"):
        vitscope.capture(vit, pixels)
    _no_state_left(model)
    attn = vitscope.capture(vit, pixels, layers=[0])
    ref = model.blocks[0].ref
    assert ref is not None and ref.amax(-1).mean() > 0.2
    torch.testing.assert_close(attn.weights[0], ref.float(), atol=1e-5, rtol=0)
    _no_state_left(model)


def test_heads_first_probe_runs_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """With batch == heads the batch axis is checked on one image, once: a model whose axis was seen to be the
    images' (a capture with batch != heads) is not probed again. (The layout probe's own stopped forward passes
    are switched off here: this counts the heads-first probe only.)"""
    from vitscope.capture import core, intercept, probe

    monkeypatch.setattr(probe, "check_layout", lambda *a, **k: None)
    monkeypatch.setattr(core, "check_token_axis", lambda *a, **k: None)

    model, vit = _toy("sdpa")
    calls: list[int] = []
    handle = model.embed.register_forward_hook(lambda _m, args, _o: calls.append(int(args[0].shape[0])))
    try:
        vitscope.capture(vit, _pixels(HEADS))  # never seen: probed on 1 image, then the batch
        assert calls == [1, HEADS]
        vitscope.capture(vit, _pixels(HEADS))
        assert calls == [1, HEADS, HEADS]
    finally:
        handle.remove()
        intercept._BATCH_AXIS_PROVEN.clear()


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
def test_folded_heads_give_the_same_gradients(kind: str) -> None:
    """A block folding its heads into the batch (``fold_<kind>``, batch-major) gives the gradient method the same
    maps as the same block unfolded (the gradient reaches the model's own 3-d tensor and is unfolded)."""
    from vitscope import methods

    pixels = _pixels(3)
    maps = []
    for k in (kind, f"fold_{kind}"):
        model, vit = _toy(k)
        maps.append(torch.as_tensor(methods.grad_rollout(vit, pixels, target=lambda o: o.float().flatten(1).sum(1))))
        _no_state_left(model)
    assert maps[0].abs().amax() > 0
    torch.testing.assert_close(maps[1], maps[0], atol=1e-6, rtol=0)
