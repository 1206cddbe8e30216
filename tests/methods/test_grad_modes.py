"""Gradient methods turn autograd on themselves: inside ``torch.no_grad()`` / ``torch.inference_mode()`` their
maps equal the maps computed with grad mode on (issue 16)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

import vitscope
from tests.conftest import make_tiny_vit
from tests.conftest import make_tiny_vit as _tiny
from vitscope.adapters import as_vit
from vitscope.methods.api import supported_methods
from vitscope.methods.registry import REGISTRY

# (attnlrp is refused on vitscope's ViT: lxt patches torchvision's; its own tests run it in these modes' terms)
GRADIENT_METHODS = [name for name in supported_methods(as_vit(_tiny())) if REGISTRY[name].needs == "gradients"]
MODES: dict[str, Callable[[], AbstractContextManager[object]]] = {
    "no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
}


def test_the_registry_has_gradient_methods() -> None:
    assert {"grad_rollout", "chefer", "legrad", "attn_gradcam", "transformer_attribution"} <= set(GRADIENT_METHODS)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_method_inside_a_no_grad_block_equals_the_normal_map(name: str, mode: str) -> None:
    model = make_tiny_vit(num_registers=1, image_size=(16, 24), seed=5)
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    expected = vitscope.maps(model, x, name, target=1).map
    with MODES[mode]():
        x_in = x.clone()  # under inference_mode: an inference tensor, as a caller's own pixels would be
        got = vitscope.maps(model, x_in, name, target=1).map
    assert float(expected.abs().max()) > 0  # the comparison is not between zeros
    assert torch.equal(got, expected)
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())
