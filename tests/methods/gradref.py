"""Independent reference for gradient methods: the tiny vitscope ViT on its *unfused* path, with the explicit
attention tensor (output of ``attn_drop``) kept in the graph and differentiated by plain autograd."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from vitscope.models.vit import ViT


def reference_forward(model: ViT, pixels: torch.Tensor, edit: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(logits, attention per layer (B, H, N, N) in the graph, block outputs) from an unfused copy."""
    m = copy.deepcopy(model).eval()
    m.set_fused_attn(False)
    attns: list[torch.Tensor] = []
    blocks: list[torch.Tensor] = []
    handles = []
    for i, blk in enumerate(m.blocks):

        def grab(_mod: Any, _inp: Any, out: torch.Tensor, i: int = i) -> torch.Tensor:
            if edit is not None:
                out = edit(i, out)
            attns.append(out)
            return out

        handles.append(blk.attn.attn_drop.register_forward_hook(grab))
        handles.append(blk.register_forward_hook(lambda _m, _i, out: blocks.append(out)))
    try:
        logits = m(pixels)
    finally:
        for h in handles:
            h.remove()
    return logits, attns, blocks


def reference_grads(model: ViT, pixels: torch.Tensor, classes: torch.Tensor,
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Attention and d(logit of class)/dA per layer, by autograd on the explicit attention tensors."""
    logits, attns, _ = reference_forward(model, pixels)
    score = logits.gather(1, classes[:, None]).sum()
    grads = torch.autograd.grad(score, attns)
    return [a.detach() for a in attns], [g.detach() for g in grads]


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a gradient method must leave as it found it."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "fused": [getattr(m, "fused_attn", None) for m in model.modules()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert all(g is None for g in after["grads"]) == all(g is None for g in before["grads"])
    assert after["hooks"] == before["hooks"] == 0
    assert after["fused"] == before["fused"]
