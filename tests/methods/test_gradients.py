"""The shared machinery of gradient methods: exact A and dL/dA under fused attention."""

import pytest
import torch

from tests.conftest import make_tiny_vit
from tests.methods.gradref import assert_unchanged, reference_forward, reference_grads, snapshot
from vitscope.adapters import as_vit
from vitscope.errors import VitscopeError
from vitscope.methods._gradients import attention_grads, resolve_classes, scores, trace


@pytest.fixture
def model():
    return make_tiny_vit(num_registers=4, image_size=(24, 40), seed=3)  # [CLS] + 4 registers, 3x5 grid


def test_attention_and_grads_equal_unfused_autograd(model):
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    t = trace(model, x)
    classes = resolve_classes(t.vit, t.output, [1, 3])
    g = attention_grads(t, scores(t.vit, t.output, [1, 3], classes), list(t.layers))
    ref_a, ref_g = reference_grads(model, x, torch.tensor([1, 3]))
    for layer in range(2):
        torch.testing.assert_close(t.attn[layer], ref_a[layer], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g[layer], ref_g[layer], rtol=1e-3, atol=1e-6)
    assert float(ref_g[0].abs().max()) > 0  # the comparison is not between zeros
    assert_unchanged(model, before)


def test_dl_da_matches_finite_differences():
    model = make_tiny_vit(num_registers=1, image_size=(16, 24), seed=4).double()
    x = torch.randn(1, 3, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = trace(model, x)
    classes = torch.tensor([2])
    g = attention_grads(t, scores(t.vit, t.output, 2, classes), [0, 1])
    eps = 1e-6
    for layer, h, i, j in [(0, 0, 0, 3), (0, 2, 5, 1), (1, 3, 0, 0), (1, 1, 7, 4)]:

        def bump(sign: float, layer=layer, h=h, i=i, j=j):
            def edit(li: int, a: torch.Tensor) -> torch.Tensor:
                if li != layer:
                    return a
                a = a.clone()
                a[0, h, i, j] += sign * eps
                return a

            logits, _, _ = reference_forward(model, x, edit)
            return float(logits[0, 2].detach())

        fd = (bump(1.0) - bump(-1.0)) / (2 * eps)
        assert abs(fd - float(g[layer][0, h, i, j])) <= 1e-6 + 1e-5 * abs(fd), (layer, h, i, j, fd)


def test_frozen_training_model_is_left_as_found(model):
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    x = torch.randn(1, 3, 24, 40)
    t = trace(model, x)
    g = attention_grads(t, scores(t.vit, t.output, 0, resolve_classes(t.vit, t.output, 0)), [0, 1])
    assert float(g[1].abs().max()) > 0
    assert_unchanged(model, before)
    assert model.training


def test_hooks_removed_after_an_error(model):
    before = snapshot(model)
    with pytest.raises(VitscopeError, match="not a multiple of the"):
        trace(model, torch.randn(1, 3, 20, 40))  # refused before the forward pass
    assert_unchanged(model, before)

    def boom(*_: object) -> None:
        raise ValueError("boom")

    handle = model.blocks[-1].attn.proj.register_forward_pre_hook(boom)  # raises inside the traced forward
    try:
        with pytest.raises(ValueError, match="boom"):
            trace(model, torch.randn(1, 3, 24, 40))
    finally:
        handle.remove()
    assert_unchanged(model, before)
    assert torch._C._len_torch_function_stack() == 0


def test_targets(model):
    vit = as_vit(model)
    x = torch.randn(3, 3, 24, 40)
    t = trace(vit, x)
    logits = t.output.detach()
    assert resolve_classes(vit, t.output, None).tolist() == logits.argmax(-1).tolist()
    assert resolve_classes(vit, t.output, 2).tolist() == [2, 2, 2]
    assert resolve_classes(vit, t.output, torch.tensor([0, 1, 4])).tolist() == [0, 1, 4]
    s = scores(vit, t.output, lambda out: out[:, 1] - out[:, 0], None)
    torch.testing.assert_close(s.detach(), logits[:, 1] - logits[:, 0])
    with pytest.raises(VitscopeError, match="target"):
        resolve_classes(vit, t.output, 5)
    with pytest.raises(VitscopeError, match="target"):
        resolve_classes(vit, t.output, [0, 1])
