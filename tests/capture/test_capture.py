"""`vitscope.capture` on vitscope's own ViT: exact against the unfused path and a hand-computed example."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitscope
from tests.conftest import KernelQueries, make_tiny_vit
from vitscope.attentions import Attentions
from vitscope.capture import capture_full
from vitscope.capture.intercept import sample_rows
from vitscope.errors import VitscopeError
from vitscope.methods.rollout import rollout


def _sharp_vit(num_registers: int = 0, image_size: tuple[int, int] = (32, 32), seed: int = 0,
               depth: int = 2) -> nn.Module:
    """Tiny ViT (``depth`` layers, 4 heads, dim 32, patch 8) with peaked attention (the default init is
    near-uniform)."""
    model = make_tiny_vit(num_registers=num_registers, image_size=image_size, seed=seed, depth=depth)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.copy_(torch.randn(blk.attn.qkv.weight.shape, generator=g) * 0.35)
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=g))
        if model.reg_token is not None:
            model.reg_token.copy_(torch.randn(model.reg_token.shape, generator=g))
    return model.eval()


def unfused_reference(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The model's own explicit branch (``set_fused_attn(False)``), probabilities read where they are formed."""
    ref = copy.deepcopy(model).eval()
    ref.set_fused_attn(False)
    probs: list[torch.Tensor] = []
    for blk in ref.blocks:
        blk.attn.attn_drop.register_forward_pre_hook(lambda _m, inp: probs.append(inp[0].clone()))
    with torch.no_grad():
        ref(pixels)
    return torch.stack(probs)  # (L, B, H, N, N)


def manual_reference(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) from the qkv weights, written out independently of the model's Attention."""
    out = []
    with torch.no_grad():
        x = model.tokens(pixels)
        for blk in model.blocks:
            B, N, D = x.shape
            H = blk.attn.heads
            d = D // H
            qkv = blk.norm1(x) @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # (B, N, 3*D)
            q, k = qkv[..., :D], qkv[..., D : 2 * D]
            q = q.reshape(B, N, H, d).permute(0, 2, 1, 3)  # (B, H, N, d)
            k = k.reshape(B, N, H, d).permute(0, 2, 1, 3)
            out.append(torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d), dim=-1))
            x = blk(x)
    return torch.stack(out)


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["square", "32x48"])
@pytest.mark.parametrize("num_registers", [0, 4])
def test_capture_matches_unfused_and_manual(num_registers: int, size: tuple[int, int]) -> None:
    model = _sharp_vit(num_registers)
    pixels = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(5))
    res = capture_full(model, pixels)
    attn = res.attentions
    unfused, manual = unfused_reference(model, pixels), manual_reference(model, pixels)
    assert unfused.amax() > 0.5  # peaked rows
    torch.testing.assert_close(attn.weights, unfused, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn.weights, manual, atol=1e-5, rtol=0)
    assert attn.prefix == ("cls",) + ("register",) * num_registers
    assert attn.grid == (size[0] // 8, size[1] // 8)
    assert attn.image_size == size and attn.weights.shape == (2, 3, 4, attn.num_tokens, attn.num_tokens)
    with torch.no_grad():
        assert torch.equal(res.output, model(pixels))  # outputs bit-identical to an uncaptured run


class _Block(nn.Module):
    qkv: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return HandAttention.block_forward(self, x)


class HandAttention(nn.Module):
    """One head, d=2, three tokens X = [[1, 0], [0, 1], [1, 1]]; q = k = v = X (the qkv Linear is [I; I; I])."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("X", torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        self.block = _Block()
        self.block.qkv = nn.Linear(2, 6, bias=False)
        with torch.no_grad():
            self.block.qkv.weight.copy_(torch.cat([torch.eye(2)] * 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.X.expand(pixels.shape[0], -1, -1)  # (B, 3, 2): [CLS] + a 1x2 grid of patches
        return self.block(x)

    @staticmethod
    def block_forward(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        q, k, v = blk.qkv(x)[:, None].chunk(3, dim=-1)  # each (B, 1, 3, 2): one head
        return F.scaled_dot_product_attention(q, k, v, scale=0.5)


def test_three_token_hand_example() -> None:
    vit = vitscope.wrap(HandAttention(), blocks="block", qkv="qkv", num_heads=1, scale=0.5, patch_size=1, prefix=("cls",),
                        image_size=(1, 2), channels=1, mean=(0.0,), std=(1.0,))
    attn = vitscope.capture(vit, torch.zeros(1, 1, 1, 2))
    e = math.exp(0.5)  # logits = X X^T * 0.5 = [[.5, 0, .5], [0, .5, .5], [.5, .5, 1]]
    expected = torch.tensor([
        [e / (2 * e + 1), 1 / (2 * e + 1), e / (2 * e + 1)],
        [1 / (2 * e + 1), e / (2 * e + 1), e / (2 * e + 1)],
        [e / (2 * e + e * e), e / (2 * e + e * e), e * e / (2 * e + e * e)],
    ])
    assert attn.weights.shape == (1, 1, 1, 3, 3)
    torch.testing.assert_close(attn.weights[0, 0, 0], expected, atol=1e-6, rtol=0)
    cls_row = vitscope.capture(vit, torch.zeros(1, 1, 1, 2), queries="cls").weights
    torch.testing.assert_close(cls_row[0, 0, 0, 0], expected[0], atol=1e-6, rtol=0)


def test_selections_equal_slices_of_the_reference() -> None:
    model = _sharp_vit(num_registers=4, image_size=(32, 48))
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(6))
    ref = unfused_reference(model, pixels)  # (L, B, H, N, N); N = 1 + 4 + 4*6
    cls = vitscope.capture(model, pixels, queries="cls")
    assert cls.queries == (0,)
    torch.testing.assert_close(cls.weights[:, :, :, 0], ref[:, :, :, 0], atol=1e-5, rtol=0)
    patch = vitscope.capture(model, pixels, queries=[(2, 5), (0, 1)])
    assert patch.queries == (5 + 2 * 6 + 5, 5 + 0 * 6 + 1)  # 5 prefix tokens, 6 columns, row-major
    torch.testing.assert_close(patch.weights, ref[:, :, :, [22, 6]], atol=1e-5, rtol=0)
    mean = vitscope.capture(model, pixels, heads="mean")
    assert mean.heads == "mean" and mean.weights.shape[2] == 1
    torch.testing.assert_close(mean.weights[:, :, 0], ref.mean(dim=2), atol=1e-5, rtol=0)
    some = vitscope.capture(model, pixels, heads=[0, 2])
    torch.testing.assert_close(some.weights, ref[:, :, [0, 2]], atol=1e-5, rtol=0)
    last = vitscope.capture(model, pixels, layers=[-1], queries="register:3")
    assert last.layers == (1,) and last.queries == (4,)
    torch.testing.assert_close(last.weights[0, :, :, 0], ref[1, :, :, 4], atol=1e-5, rtol=0)
    rows = some.weights.sum(dim=-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


def test_small_chunks_give_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscope.capture import intercept

    model = _sharp_vit()
    pixels = torch.randn(2, 3, 32, 32)
    whole = vitscope.capture(model, pixels).weights
    monkeypatch.setattr(intercept, "CHUNK_BYTES", 1)  # one query row per chunk
    torch.testing.assert_close(vitscope.capture(model, pixels).weights, whole, atol=1e-6, rtol=0)


def test_token_norms_are_block_outputs() -> None:
    model = _sharp_vit(num_registers=4)
    pixels = torch.randn(1, 3, 32, 32)
    attn = vitscope.capture(model, pixels, layers=[0], token_norms=True)
    assert attn.token_norms is not None
    with torch.no_grad():
        x = model.tokens(pixels)
        for i, blk in enumerate(model.blocks):
            x = blk(x)
            torch.testing.assert_close(attn.token_norms[i], x.norm(dim=-1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"layers": [2]}, "layers"), ({"layers": [-3]}, "layers"), ({"layers": []}, "layers"),
     ({"heads": [4]}, "heads"), ({"heads": [0, -5]}, "heads"), ({"heads": "max"}, "heads"),
     ({"queries": (4, 0)}, "queries"), ({"queries": "dist"}, "queries")],
)
def test_out_of_range_selections_name_the_argument(kwargs: dict[str, object], argument: str) -> None:
    model = _sharp_vit()
    with pytest.raises(VitscopeError, match=rf"^{argument}: ") as err:
        vitscope.capture(model, torch.randn(1, 3, 32, 32), **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
    assert _hook_count(model) == 0


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in block 1")


def test_exception_in_forward_removes_hooks_and_restores_flags() -> None:
    model = _sharp_vit(num_registers=4)
    model.blocks[1].mlp = _Boom()  # raises after layer 0's q/k were captured, before layer 1's
    model.train()
    model.blocks[0].eval()
    model.blocks[0].attn.fused_attn = False
    training = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match=r"boom in block 1"):
        vitscope.capture(model, torch.randn(1, 3, 32, 32), token_norms=True)
    assert _hook_count(model) == 0
    assert {n: m.training for n, m in model.named_modules()} == training
    assert [b.attn.fused_attn for b in model.blocks] == [False, True]


def test_success_leaves_no_hooks_and_keeps_training_flags() -> None:
    model = _sharp_vit()
    model.train()
    vitscope.capture(model, torch.randn(1, 3, 32, 32), token_norms=True)
    assert _hook_count(model) == 0
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("variant", ["full", "mean-cls"])
def test_save_load_round_trip_is_exact(tmp_path: Path, variant: str) -> None:
    model = _sharp_vit(num_registers=4, image_size=(32, 48))
    pixels = torch.randn(2, 3, 32, 48)
    if variant == "full":
        attn = vitscope.capture(model, pixels, token_norms=True)
    else:
        attn = vitscope.capture(model, pixels, heads="mean", queries=["cls", (1, 2)], layers=[-1])
    attn.meta["note"] = "round trip"
    path = attn.save(tmp_path / "attn.npz")
    back = Attentions.load(path)
    assert torch.equal(back.weights, attn.weights)
    if attn.token_norms is None:
        assert back.token_norms is None
    else:
        assert back.token_norms is not None and torch.equal(back.token_norms, attn.token_norms)
    for field in ("prefix", "grid", "patch_size", "image_size", "layers", "heads", "queries", "num_layers",
                  "num_heads", "meta"):
        assert getattr(back, field) == getattr(attn, field), field


# ------------------------------------------------------------------------------------------------ early end
def _swallowing(block: nn.Module) -> None:
    """Make ``block`` run its own forward under ``except Exception`` (vitscope's stop must not be swallowed)."""
    inner = block.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        try:
            return inner(x)
        except Exception:  # the point of the test: a model that swallows errors
            return x

    block.forward = forward  # type: ignore[method-assign]


@pytest.mark.parametrize("layers", [[1], [0, 2], None], ids=["middle", "two", "all"])
def test_capture_ends_the_pass_after_the_last_wanted_layer(layers: list[int] | None) -> None:
    """`capture` returns no model output, so the pass ends once the last requested layer's attention is in hand:
    later blocks, the final norm and the head do not run; the rows equal a full pass's (`capture_full`), and the
    model is left without hooks and works as before."""
    model = _sharp_vit(seed=3, depth=4)
    _swallowing(model.blocks[2])
    ran: list[str] = []
    for name, m in [(f"block{i}", b) for i, b in enumerate(model.blocks)] + [("norm", model.norm), ("head", model.head)]:
        m.register_forward_hook(lambda _m, _i, _o, name=name: ran.append(name))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_out = model(x)
    capture_full(model, x, layers=layers, queries="cls")  # the layout and batch-axis probes run (once per model)
    ran.clear()
    full = capture_full(model, x, layers=layers, queries="cls")
    assert ran == ["block0", "block1", "block2", "block3", "norm", "head"]
    assert full.attentions.weights.amax(-1).mean() > 0.2  # peaked: a wrong row cannot pass as near-uniform
    torch.testing.assert_close(full.output, want_out, atol=0, rtol=0)
    ran.clear()
    attn = vitscope.capture(model, x, layers=layers, queries="cls")
    last = 3 if layers is None else max(layers)
    # the last wanted block's attention ran, its MLP did not, so the block's own hook never fired
    assert ran == [f"block{i}" for i in range(last)]
    torch.testing.assert_close(attn.weights, full.attentions.weights, atol=0, rtol=0)
    assert _hook_count(model) == 6  # only the test's own hooks are left
    ran.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want_out, atol=0, rtol=0)
    assert ran == ["block0", "block1", "block2", "block3", "norm", "head"]
    assert torch._C._len_torch_function_stack() == 0


def test_rollout_ends_the_pass_at_the_last_layer_and_equals_the_full_pass() -> None:
    model = _sharp_vit(seed=4, depth=3)
    ran: list[str] = []
    model.norm.register_forward_hook(lambda *_: ran.append("norm"))
    model.head.register_forward_hook(lambda *_: ran.append("head"))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    vitscope.maps(model, x, "rollout")  # the layout and batch-axis probes run (once per model)
    ran.clear()
    got = vitscope.maps(model, x, "rollout")
    assert ran == []  # neither the final norm nor the head ran
    attn = capture_full(model, x).attentions  # every row of every layer, a whole pass
    assert attn.weights.amax(-1).mean() > 0.2  # peaked
    torch.testing.assert_close(got.map, rollout(attn), atol=1e-6, rtol=0)


def _attention_variant(attn: nn.Module, variant: str, gen: torch.Generator) -> None:
    """Give the tiny ViT's attention module ``attn`` another kind of SDPA call: an additive bias with a query
    axis (BEiT's relative position bias), a boolean key mask (one key hidden from image 1), heads folded into
    the batch (SAM's layout), or a causal flag."""
    table = torch.randn(attn.heads, 64, 64, generator=gen) * 2  # (H, 64, 64): a bias for up to 64 tokens
    base = attn.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, d = attn.heads, attn.head_dim
        qkv = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv.unbind(0)
        if variant == "bias":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=table[None, :, :N, :N], scale=attn.scale)
        elif variant == "key mask":
            keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
            keep[-1, ..., N - 1] = False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=attn.scale)
        elif variant == "folded":
            q, k, v = (t.reshape(B * H, N, d) for t in (q, k, v))  # (B*H, N, d), batch-major
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).reshape(B, H, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
        return attn.proj(out.transpose(1, 2).reshape(B, N, C))

    attn.forward = base if variant == "plain" else forward  # type: ignore[method-assign]


@pytest.mark.parametrize(("variant", "queries"), [
    ("plain", "cls"), ("plain", None), ("plain", [3, 9, (3, 2)]), ("bias", "cls"), ("bias", None),
    ("key mask", "cls"), ("folded", "cls"), ("causal", "cls"),
])
def test_the_last_wanted_layer_computes_only_the_rows_it_proves(variant: str, queries: Any) -> None:
    """The pass ends at the last wanted layer's kernel call: torch's SDPA runs there on the rows the verification
    reads only (row 0, a few spread rows, the caller's when few), so neither the rest of that layer's kernel nor
    its projection runs; the captured rows equal a whole pass's (`capture_full`) bitwise for every kind of call
    (a bias or mask sliced to those rows, heads folded into the batch). A causal call, whose rows depend on how
    many queries it gets, runs whole."""
    model = _sharp_vit(seed=7, depth=3)
    gen = torch.Generator().manual_seed(8)
    for blk in model.blocks:
        _attention_variant(blk.attn, variant, gen)
    proj_ran: list[int] = []
    for i, blk in enumerate(model.blocks):
        blk.attn.proj.register_forward_hook(lambda *_, i=i: proj_ran.append(i))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want = capture_full(model, x, layers=[0, 2], queries=queries).attentions  # whole pass, whole kernels
    assert want.weights.amax(-1).mean() > 0.2  # peaked: a wrong row cannot pass as near-uniform
    proj_ran.clear()
    with KernelQueries() as seen:
        got = vitscope.capture(model, x, layers=[0, 2], queries=queries)
    torch.testing.assert_close(got.weights, want.weights, atol=0, rtol=0)
    N = want.num_tokens
    asked = None if want.queries is None else list(want.queries)
    rows = N if variant == "causal" else len(sample_rows(N, asked))
    B, H = 2, 4
    full = (B * H, N, 8) if variant == "folded" else (B, H, N, 8)
    last = (B * H, rows, 8) if variant == "folded" else (B, H, rows, 8)
    assert seen.queries == [full, full, last]
    assert proj_ran == ([0, 1, 2] if variant == "causal" else [0, 1])
