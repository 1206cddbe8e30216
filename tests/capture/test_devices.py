"""Device names vitscope cannot run on, and models without weights: one `VitscopeError` naming the argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import vitscope
from tests.conftest import make_tiny_vit
from vitscope.capture.prepare import resolve_device
from vitscope.errors import VitscopeError
from vitscope.methods.grad_rollout import grad_rollout

CPU = torch.device("cpu")


@pytest.mark.parametrize("device", ["meta", "xla", "hpu", "ipu", "vulkan", "privateuseone", "bogus", "", "cuda:x",
                                    "cpu:-1", -1, 1.5, True, ["cpu"], torch.device("meta")])
@pytest.mark.parametrize("argument", ["device", "--device"])
def test_a_device_vitscope_cannot_run_on_is_one_error_naming_the_argument(device: Any, argument: str) -> None:
    with pytest.raises(VitscopeError) as info:
        resolve_device(device, CPU, argument=argument)
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}: ")


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu"), None])
def test_cpu_resolves(device: Any) -> None:
    assert resolve_device(device, CPU).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0])
def test_cuda_without_cuda_names_the_argument(device: Any) -> None:
    with pytest.raises(VitscopeError, match=r"^--device: CUDA is not available"):
        resolve_device(device, CPU, argument="--device")


CALLS: dict[str, Callable[[Any, torch.Tensor], Any]] = {
    "capture": lambda m, x: vitscope.capture(m, x),
    "capture_device": lambda m, x: vitscope.capture(m, x, device="cpu"),
    "maps_cls": lambda m, x: vitscope.maps(m, x, "cls"),
    "maps_chefer": lambda m, x: vitscope.maps(m, x, "chefer", target=0),
    "grad_rollout": lambda m, x: grad_rollout(m, x, 0),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_meta_device_model_is_one_error_naming_the_model(call: str) -> None:
    model = make_tiny_vit().to("meta")
    with pytest.raises(VitscopeError) as info:
        CALLS[call](model, torch.rand(1, 3, 32, 32))
    assert info.value.argument == "model"
    assert "meta device (not loaded)" in info.value.problem


def test_meta_device_request_for_a_model_is_refused_before_it_is_moved() -> None:
    model = make_tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VitscopeError, match=r"^device: the meta device"):
        vitscope.capture(model, torch.rand(1, 3, 32, 32), device="meta")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
