"""Captures of one model from several threads at once each see their own forward pass only (issue 16): the
results equal sequential captures, and the model is left as found."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import vitscope
from tests.conftest import make_tiny_vit
from vitscope.models.vit import ViT, ViTConfig

ROUNDS = 6

RUNS: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "capture": lambda m, x: vitscope.capture(m, x, token_norms=True).weights,
    "capture_cls_mean": lambda m, x: vitscope.capture(m, x, queries="cls", heads="mean", layers=[0, -1]).weights,
    "rollout": lambda m, x: vitscope.maps(m, x, "rollout").map,
    "chefer": lambda m, x: vitscope.maps(m, x, "chefer", target=1).map,
    "legrad": lambda m, x: vitscope.maps(m, x, "legrad", target=2).map,
}


def _concurrently(model: Any, run: Callable[[Any, torch.Tensor], torch.Tensor], inputs: list[torch.Tensor],
                  ) -> tuple[list[list[torch.Tensor]], list[BaseException]]:
    results: list[list[torch.Tensor]] = [[] for _ in inputs]
    errors: list[BaseException] = []
    start = threading.Barrier(len(inputs))

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(ROUNDS):
                results[i].append(run(model, inputs[i]))
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return results, errors


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_threads_capturing_one_model_equal_sequential_captures(name: str) -> None:
    model = make_tiny_vit(num_registers=1, depth=3, seed=7)
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected = [RUNS[name](model, x) for x in inputs]  # sequential, one thread
    assert not torch.equal(expected[0], expected[1])  # the threads' results are told apart
    results, errors = _concurrently(model, RUNS[name], inputs)
    assert not errors, errors
    for got, want in zip(results, expected, strict=True):
        assert len(got) == ROUNDS
        assert all(torch.equal(g, want) for g in got)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    assert sum(hooks) == 0


def test_a_training_model_stays_in_eval_mode_until_the_last_thread_is_done() -> None:
    """Thread A switches a training model to eval mode; B starts while A runs and is held in the middle of its
    forward pass until A is done. B's second half must still run in eval mode (with training flags back on,
    its dropout is active and the capture is refused); the flags come back only after both are done."""
    torch.manual_seed(3)
    model = ViT(ViTConfig(image_size=(32, 32), patch_size=8, dim=32, depth=2, heads=4, num_classes=5,
                          dropout=0.5, attn_dropout=0.5))
    model.train()
    model.head.eval()  # a submodule's own flag, restored as it was
    inputs = {"A": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
              "B": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    run = RUNS["capture"]
    expected = {k: run(model, x) for k, x in inputs.items()}
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    def gate(_m: Any, _inp: Any) -> None:  # the order: A enters, B enters, A leaves, B leaves
        who = threading.current_thread().name
        if who == "A":
            a_inside.set()
            b_inside.wait(10)
        elif who == "B":
            b_inside.set()
            a_done.wait(10)

    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(who: str) -> None:
        try:
            if who == "B":
                a_inside.wait(10)
            got[who] = run(model, inputs[who])
        except BaseException as exc:
            errors.append(exc)
        finally:
            if who == "A":
                a_done.set()

    handle = model.blocks[1].register_forward_pre_hook(gate)
    try:
        threads = [threading.Thread(target=worker, args=(w,), name=w) for w in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        handle.remove()
    assert not errors, errors
    assert all(torch.equal(got[k], expected[k]) for k in inputs)
    assert model.training and not model.head.training
    assert all(m.training for name, m in model.named_modules() if not name.startswith("head"))
