"""The capture guards: what vitscope cannot capture exactly is a one-line error, never a silently wrong map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitscope
from tests.conftest import make_tiny_vit
from vitscope.capture.intercept import CaptureError


def _no_state_left(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    assert torch._C._len_torch_function_stack() == 0


def _rope(x: torch.Tensor) -> torch.Tensor:
    """A rotary embedding over token positions (pairs of channels rotated by position-dependent angles)."""
    _, _, N, d = x.shape  # (B, H, N, d)
    pos = torch.arange(N, dtype=x.dtype)[:, None]
    freq = 1.0 / (10.0 ** (torch.arange(0, d, 2, dtype=x.dtype) / d))
    ang = pos * freq  # (N, d/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class RopeBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, kernel: str = "sdpa") -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads, self.kernel = heads, kernel
        nn.init.normal_(self.qkv.weight, std=0.6)  # peaked attention (mean row max ~0.5, measured)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q), _rope(k)  # after the projection: a q/k tap at qkv would miss it
        if self.kernel == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.kernel == "custom":  # an exp/sum softmax: no op vitscope can see
            logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            e = (logits - logits.amax(-1, keepdim=True)).exp()
            o = (e / e.sum(-1, keepdim=True)) @ v
        elif self.kernel == "twice":
            o = F.scaled_dot_product_attention(q, k, v) + 0 * F.scaled_dot_product_attention(q, k, v)
        elif self.kernel == "twice when large":  # a second kernel call above 17 tokens only
            o = F.scaled_dot_product_attention(q, k, v)
            if N > 17:
                o = o + 0 * F.scaled_dot_product_attention(q, k, v)
        else:  # "masked": a mask that hides every key from query 0, so its row is 0/0
            mask = torch.ones(N, N, dtype=torch.bool)
            mask[0] = False
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + o.transpose(1, 2).reshape(B, N, C)


class RopeViT(nn.Module):
    def __init__(self, kernel: str = "sdpa", skip_last: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.blocks = nn.ModuleList([RopeBlock(kernel=kernel) for _ in range(2)])
        self.skip_last = skip_last

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks[:1] if self.skip_last else self.blocks:
            x = blk(x)
        return x


DECL = {"blocks": "blocks.*", "num_heads": 2, "patch_size": 4, "prefix": ("cls",), "image_size": 16}


def _reference(model: RopeViT, pixels: torch.Tensor) -> torch.Tensor:
    """Each block's softmax(rope(q) rope(k)^T / sqrt(d)), written out: (L, B, H, N, N)."""
    out = []
    with torch.no_grad():
        x = model.embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([model.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in model.blocks:
            B, N, C = x.shape
            q, k, _ = blk.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
            out.append((_rope(q) @ _rope(k).transpose(-2, -1) / math.sqrt(C // 2)).softmax(-1))
            x = blk(x)
    return torch.stack(out)


def _one_line_error(model: nn.Module, vit: vitscope.VitModel, match: str) -> None:
    with pytest.raises(CaptureError, match=match) as err:
        vitscope.capture(vit, torch.randn(2, 3, 16, 16))
    assert "\n" not in str(err.value)
    _no_state_left(model)


def test_rope_is_captured_after_the_rotation() -> None:
    model = RopeViT().eval()
    pixels = torch.randn(2, 3, 16, 16)
    ref = _reference(model, pixels)
    assert ref.amax(-1).mean() > 0.2  # peaked: a wrong capture cannot pass by accident
    attn = vitscope.capture(vitscope.wrap(model, **DECL), pixels)
    torch.testing.assert_close(attn.weights, ref, atol=1e-5, rtol=0)
    # the pre-RoPE q/k (what the old q/k taps read) give a clearly different map
    with torch.no_grad():
        x = torch.cat([model.cls.expand(2, -1, -1), model.embed(pixels).flatten(2).transpose(1, 2)], dim=1)
        q, k, _ = model.blocks[0].qkv(x).reshape(2, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)
        unrotated = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    assert (unrotated - ref[0]).abs().max() > 0.1


def test_rope_model_declared_the_old_way_is_refused() -> None:
    model = RopeViT().eval()
    _one_line_error(model, vitscope.wrap(model, qkv="qkv", **DECL), r"declared q/k differs from what the model")


def test_layer_that_never_reports_is_refused() -> None:
    model = RopeViT(skip_last=True).eval()
    _one_line_error(model, vitscope.wrap(model, **DECL), r"^model: layer 1 reported attention 0 times")


def test_attention_vitscope_cannot_see_is_refused() -> None:
    model = RopeViT(kernel="custom").eval()
    _one_line_error(model, vitscope.wrap(model, **DECL), r"^model: layer 0: its attention module ran but made no")


def test_two_kernels_in_one_layer_are_refused() -> None:
    model = RopeViT(kernel="twice").eval()
    _one_line_error(model, vitscope.wrap(model, **DECL), r"^model: layer 0 computed attention 2 times")


def test_a_second_kernel_call_at_a_new_size_is_refused_when_the_pass_would_end_at_the_first() -> None:
    """`capture` ends the pass at the last wanted layer's kernel call only at token counts where a whole run of
    that module was seen to make one call: a module that makes a second call at a larger size only is still
    refused there (ending at its first call would hand back rows the module then recomputes)."""
    model = RopeViT(kernel="twice when large").eval()
    vit = vitscope.wrap(model, **DECL)
    small = torch.randn(2, 3, 16, 16)  # 17 tokens: one call
    first = vitscope.capture(vit, small, layers=[-1], queries="cls")  # a whole run of the last module
    again = vitscope.capture(vit, small, layers=[-1], queries="cls")  # ends at its kernel call
    torch.testing.assert_close(again.weights, first.weights, atol=0, rtol=0)
    torch.testing.assert_close(again.weights[0, :, :, 0], _reference(model, small)[-1][:, :, 0], atol=1e-5, rtol=0)
    with pytest.raises(CaptureError, match=r"^model: layer 1 computed attention 2 times") as err:
        vitscope.capture(vit, torch.randn(2, 3, 20, 20), layers=[-1], queries="cls")  # 26 tokens
    assert "\n" not in str(err.value)
    _no_state_left(model)


def test_rows_that_do_not_sum_to_one_are_refused() -> None:
    model = RopeViT(kernel="masked").eval()
    _one_line_error(model, vitscope.wrap(model, **DECL), r"^model: layer 0: captured attention rows do not sum to 1")


def test_compiled_module_is_refused() -> None:
    model = make_tiny_vit()
    compiled = torch.compile(model)
    with pytest.raises(CaptureError, match=r"torch\.compile'd") as err:
        vitscope.capture(compiled, torch.randn(1, 3, 32, 32))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("where", ["attn.proj", "mlp"])  # inside layer 1's attention module / after it
def test_state_restored_after_an_exception_inside_forward(where: str) -> None:
    from vitscope.capture import capture_full

    model = make_tiny_vit()
    vit = vitscope.wrap(model)
    pixels = torch.ones(1, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixels)

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    handle = model.blocks[1].get_submodule(where).register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_full(vit, pixels)  # the whole pass (`capture` would end before layer 1's MLP)
        assert torch._C._len_torch_function_stack() == 0
    finally:
        handle.remove()
    _no_state_left(model)
    assert torch.equal(capture_full(vit, pixels).output, plain)
