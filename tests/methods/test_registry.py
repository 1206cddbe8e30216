"""Tests generated over the method registry (as timm and captum do for their model and attribution lists).

For every registered method: `vitscope.maps` equals an independent reference written here from the paper's
formula on the model's *unfused* path (explicit attention, plain autograd); the model is left as it was after
success and after an exception inside the forward pass; unknown parameters are one-line errors. A method
registered without a reference here fails `test_every_method_has_a_reference`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import vitscope
from tests.conftest import make_tiny_vit
from tests.methods.gradref import assert_unchanged, reference_forward, reference_grads, snapshot
from tests.methods.test_flow import _lp_max_flow
from tests.methods.test_grad_rollout import _loop_reference
from tests.methods.test_legrad import _reference as legrad_reference
from tests.methods.test_transformer_attribution import RefBlock
from tests.methods.test_transformer_attribution import reference as lrp_reference
from vitscope.errors import VitscopeError
from vitscope.methods import get_method, method_names
from vitscope.models.vit import ViT

P = 5  # [CLS] + 4 registers
GRID = (3, 5)
CLASSES = torch.tensor([1, 3])


def _model() -> ViT:
    """Tiny ViT, [CLS] + 4 registers, 24x40 input (3x5 grid), qkv drawn with spread so attention is peaked."""
    model = make_tiny_vit(num_registers=4, image_size=(24, 40), seed=3, depth=2)
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.copy_(torch.randn(blk.attn.qkv.weight.shape, generator=g) * 0.35)
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=g))
        assert model.reg_token is not None
        model.reg_token.copy_(torch.randn(model.reg_token.shape, generator=g))
    return model.eval()


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(8))


def _attn(model: ViT, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        _, attns, _ = reference_forward(model, x)
    return [a.double() for a in attns]  # (B, H, N, N) per layer


def _ref_cls(model: ViT, x: torch.Tensor) -> torch.Tensor:
    a = _attn(model, x)[-1]
    return a[:, :, 0, P:].mean(dim=1).reshape(2, *GRID)


def _ref_dino_mask(model: ViT, x: torch.Tensor) -> torch.Tensor:
    a = _attn(model, x)[-1][:, :, 0, P:]  # (B, H, patches)
    out = torch.zeros(a.shape, dtype=torch.float64)
    for b in range(a.shape[0]):
        for h in range(a.shape[1]):
            row = (a[b, h] / a[b, h].sum()).tolist()
            order = sorted(range(len(row)), key=lambda j: -row[j])
            mass = 0.0
            for j in order:  # keep cells while the mass before them is below tau
                if mass >= 0.6:
                    break
                out[b, h, j] = 1.0
                mass += row[j]
    return out.mean(dim=1).reshape(2, *GRID)


def _ahat(a: torch.Tensor) -> torch.Tensor:
    """``0.5 mean_h A + 0.5 I``, rows renormalised: (B, N, N)."""
    m = 0.5 * a.mean(dim=1) + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
    return m / m.sum(dim=-1, keepdim=True)


def _ref_rollout(model: ViT, x: torch.Tensor) -> torch.Tensor:
    r = None
    for a in _attn(model, x):
        r = _ahat(a) if r is None else _ahat(a) @ r
    assert r is not None
    return r[:, 0, P:].reshape(2, *GRID)


def _ref_flow(model: ViT, x: torch.Tensor) -> torch.Tensor:
    out = []
    for b in range(2):
        fs = [_ahat(a)[b].numpy() for a in _attn(model, x)]
        out.append([_lp_max_flow(fs[:-1], fs[-1][0], p) for p in range(P, P + GRID[0] * GRID[1])])
    return torch.tensor(out, dtype=torch.float64).reshape(2, *GRID)


def _ref_grad_rollout(model: ViT, x: torch.Tensor) -> torch.Tensor:
    attns, grads = reference_grads(model, x, CLASSES)
    return torch.from_numpy(_loop_reference(attns, grads, 0.9, 0.5, "fused", P)).reshape(2, *GRID)


def _ref_chefer(model: ViT, x: torch.Tensor) -> torch.Tensor:
    attns, grads = reference_grads(model, x, CLASSES)
    N = attns[0].shape[-1]
    r = torch.eye(N, dtype=torch.float64).expand(2, N, N)
    for a, g in zip(attns, grads, strict=True):  # R <- R + mean_h (grad * A)^+ R  (Chefer et al. 2021, eq. 13)
        r = r + (g.double() * a.double()).clamp_min(0).mean(dim=1) @ r
    return r[:, 0, P:].reshape(2, *GRID)


def _ref_legrad(model: ViT, x: torch.Tensor) -> torch.Tensor:
    return legrad_reference(model, x, CLASSES).detach().double()


def _ref_attn_gradcam(model: ViT, x: torch.Tensor) -> torch.Tensor:
    attns, grads = reference_grads(model, x, CLASSES)
    a, g = attns[-1][:, :, 0, P:].double(), grads[-1][:, :, 0, P:].double()  # (B, H, patches): the [CLS] row
    w = g.mean(dim=-1, keepdim=True)  # Chefer's generate_attn_gradcam: grad.mean over the map, per head
    return (w * a).mean(dim=1).clamp_min(0).reshape(2, *GRID)


def _features(model: ViT, x: torch.Tensor) -> np.ndarray:
    """The last block's patch tokens after the model's final norm, from the unfused copy: (B, rows, cols, D)."""
    with torch.no_grad():
        _, _, blocks = reference_forward(model, x)
        tokens = model.norm(blocks[-1])  # (B, N, D)
    return tokens[:, P:].double().numpy().reshape(2, *GRID, -1)


def _ref_pca(model: ViT, x: torch.Tensor) -> torch.Tensor:
    """First principal component of every patch of both images (numpy SVD), sign so the largest-magnitude
    score is positive, min-max scaled over all patches."""
    f = _features(model, x).reshape(-1, model.cfg.dim)
    xc = f - f.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    pc1 = xc @ vt[0]
    pc1 = pc1 * np.sign(pc1[np.argmax(np.abs(pc1))])
    return torch.from_numpy((pc1 - pc1.min()) / (pc1.max() - pc1.min())).reshape(2, *GRID)


def _ref_similarity(model: ViT, x: torch.Tensor) -> torch.Tensor:
    """Cosine of the patch (1, 3)'s feature to every patch, a loop over patches."""
    f = _features(model, x)
    out = np.zeros((2, *GRID))
    for b in range(2):
        q = f[b, 1, 3]
        for r in range(GRID[0]):
            for c in range(GRID[1]):
                p = f[b, r, c]
                out[b, r, c] = float(q @ p) / (np.sqrt(q @ q) * np.sqrt(p @ p))
    return torch.from_numpy(out)


def _ref_transformer_attribution(model: ViT, x: torch.Tensor) -> torch.Tensor:
    """Chefer CVPR'21 (tests/methods/test_transformer_attribution.py's reference), its weights read here from
    vitscope's ViT by hand, one image at a time."""
    def ln(m: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (m.weight.detach().double(), m.bias.detach().double(), m.eps)

    def d(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double()

    blocks = [RefBlock(ln(b.norm1), d(b.attn.qkv.weight), d(b.attn.qkv.bias), b.attn.heads, b.attn.scale,
                       d(b.attn.proj.weight), d(b.attn.proj.bias), None, ln(b.norm2), d(b.mlp.fc1.weight),
                       d(b.mlp.fc1.bias), torch.nn.functional.gelu, d(b.mlp.fc2.weight), d(b.mlp.fc2.bias), None)
              for b in model.blocks]
    heads = [(d(model.head.weight), d(model.head.bias), "cls", 0)]
    with torch.no_grad():
        tokens = model.tokens(x)  # the tokens entering block 0
    maps = []
    for i, c in enumerate(CLASSES.tolist()):
        _, joint, _ = lrp_reference(blocks, ln(model.norm), heads, tokens[i:i + 1], c)
        maps.append(joint[0, 0, P:].reshape(*GRID))
    return torch.stack(maps)


#: methods this model's family is refused by, and a word of the one-line reason
REFUSED: dict[str, tuple[str, dict]] = {
    "attnlrp": ("lxt", {"target": CLASSES.tolist()}),  # lxt patches torchvision's ViT only (or is not installed)
}

#: method name -> (reference, parameters passed): the one table the generated tests run over.
REFERENCES: dict[str, tuple[Callable[[ViT, torch.Tensor], torch.Tensor], dict]] = {
    "cls": (_ref_cls, {}),
    "dino_mask": (_ref_dino_mask, {}),
    "rollout": (_ref_rollout, {}),
    "flow": (_ref_flow, {"approximate": False}),
    "grad_rollout": (_ref_grad_rollout, {"target": CLASSES.tolist()}),
    "chefer": (_ref_chefer, {"target": CLASSES.tolist()}),
    "legrad": (_ref_legrad, {"target": CLASSES.tolist()}),
    "attn_gradcam": (_ref_attn_gradcam, {"target": CLASSES.tolist()}),
    "pca": (_ref_pca, {}),
    "similarity": (_ref_similarity, {"query": (1, 3)}),
    "transformer_attribution": (_ref_transformer_attribution, {"target": CLASSES.tolist()}),
}


def test_every_method_has_a_reference() -> None:
    assert set(method_names()) == set(REFERENCES) | set(REFUSED)
    assert not set(REFERENCES) & set(REFUSED)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_methods_say_why_in_one_line_and_leave_the_model(name: str) -> None:
    model, x = _model(), _pixels()
    before = snapshot(model)
    word, params = REFUSED[name]
    with pytest.raises(VitscopeError, match=word) as err:
        vitscope.maps(model, x, name, **params)
    assert "\n" not in str(err.value)
    assert_unchanged(model, before)


def test_attention_is_peaked() -> None:
    a = _attn(_model(), _pixels())
    assert min(float(x.amax(-1).mean()) for x in a) > 0.2  # measured ~0.5: a wrong capture cannot hide


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_method_equals_its_reference(name: str) -> None:
    model, x = _model(), _pixels()
    before = snapshot(model)
    reference, params = REFERENCES[name]
    got = vitscope.maps(model, x, name, **params)
    ref = reference(model, x)
    assert got.map.shape == (2, *GRID) and got.map.dtype == torch.float32
    np.testing.assert_allclose(got.map.numpy(), ref.numpy(), rtol=2e-3, atol=1e-6)
    assert float(ref.std()) > 0  # the reference is not a constant map that anything would match
    assert got.meta["method"] == name
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_model_left_as_found_after_an_exception(name: str) -> None:
    model, x = _model(), _pixels()

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    handle = model.blocks[-1].attn.proj.register_forward_pre_hook(boom)  # inside the last attention module
    try:
        before = snapshot(model)
        before["hooks"] = 0
        with pytest.raises(RuntimeError, match="boom"):
            vitscope.maps(model, x, name, **REFERENCES[name][1])
    finally:
        handle.remove()
    assert torch._C._len_torch_function_stack() == 0
    assert_unchanged(model, before)


def test_unknown_method_and_parameter_are_one_line_errors() -> None:
    with pytest.raises(VitscopeError, match=r"^method: unknown method 'nope' \(use one of ") as err:
        vitscope.maps(_model(), _pixels(), "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(VitscopeError, match=r"^tau: method 'rollout' has no parameter 'tau'"):
        vitscope.maps(_model(), _pixels(), "rollout", tau=0.5)
    assert get_method("rollout").params["residual"] is None  # the preset's 0.5 unless given
    assert get_method("dino_mask").upsample == "nearest"


def test_rollout_streams_large_inputs_to_the_same_map(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscope.capture import budget

    model, x = _model(), _pixels()
    dense = vitscope.maps(model, x, "rollout")
    dense_max = vitscope.maps(model, x, "rollout", head_fusion="max")
    monkeypatch.setattr(budget, "DENSE_BYTES", 0)  # every input counts as large
    monkeypatch.setattr(budget, "MEAN_DENSE_BYTES", 0)
    streamed = vitscope.maps(model, x, "rollout")  # mean fusion: the fused kernel's products
    streamed_max = vitscope.maps(model, x, "rollout", head_fusion="max")  # max fusion: streamed
    assert [r.meta["strategy"] for r in (dense, dense_max, streamed, streamed_max)] == [
        "dense", "dense", "fused", "streaming"]
    torch.testing.assert_close(streamed.map, dense.map, atol=1e-6, rtol=0)
    torch.testing.assert_close(streamed_max.map, dense_max.map, atol=1e-6, rtol=0)
