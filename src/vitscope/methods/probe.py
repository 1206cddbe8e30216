"""SigLIP's attention-pooling probe: the closest thing a [CLS]-less model has to a [CLS] row."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import SizePolicy
from vitscope.errors import VitscopeError


def probe_attention(
    model: Any,
    images: Any,
    *,
    policy: SizePolicy | None = None,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention of SigLIP's pooling probe over the patches: ``(B, heads, rows, cols)``, float32, rows sum to 1.

    SigLIP/SigLIP2 pool the image with one learned query ``p`` (``head.probe``) attending to the final,
    post-layernorm tokens ``X`` through ``nn.MultiheadAttention``:
    ``A_h = softmax((p W_q^h + b_q^h)(X W_k^h + b_k^h)^T / sqrt(d))`` (Zhai et al., 2023, "Sigmoid Loss for
    Language Image Pre-Training"). It plays the role of a [CLS] row for these [CLS]-less models. The head's input
    is read by a hook, so the model runs unchanged.

    Example:
        >>> a = probe_attention(vitscope.load("hf:google/siglip-base-patch16-224"), "cat.png")  # doctest: +SKIP
        >>> a.mean(1)[0]  # (rows, cols) map  # doctest: +SKIP
    """
    from vitscope._hooks import eval_mode, hooks_removed_on_exit
    from vitscope.adapters.hf import _tower
    from vitscope.capture.hooks import this_thread_only
    from vitscope.capture.prepare import prepare

    vit, pixels = prepare(model, images, policy=policy, size=size)
    head = getattr(_tower(vit.module), "head", None)
    mha = getattr(head, "attention", None)
    probe = getattr(head, "probe", None)
    if not isinstance(mha, nn.MultiheadAttention) or not isinstance(probe, torch.Tensor):
        raise VitscopeError(
            "model", f"{vit.info.name} has no attention-pooling head (SigLIP's head.probe)",
            "use a SigLIP/SigLIP2 vision tower with vision_use_head=True, or vitscope.capture for the layers",
        )
    B, _, Hpx, Wpx = pixels.shape
    rows, cols = vit.grid_for((Hpx, Wpx))
    seen: list[torch.Tensor] = []

    def grab(_m: nn.Module, inp: Any) -> None:
        seen.append(inp[0].detach())

    with hooks_removed_on_exit() as handles, eval_mode(vit.module), torch.no_grad():
        handles.append(head.register_forward_pre_hook(this_thread_only(grab)))  # type: ignore[union-attr]
        vit(pixels)
    if not seen:
        raise VitscopeError("model", "the pooling head did not run", "check vision_use_head in the config")
    x = seen[-1].float()  # (B, N, D)
    D, H = mha.embed_dim, mha.num_heads
    d = D // H
    if mha.in_proj_weight is not None:
        w_q, w_k = mha.in_proj_weight[:D].float(), mha.in_proj_weight[D : 2 * D].float()
    else:
        w_q, w_k = mha.q_proj_weight.float(), mha.k_proj_weight.float()
    bias = mha.in_proj_bias.float() if mha.in_proj_bias is not None else torch.zeros(3 * D, device=x.device)
    q = probe.detach().float().reshape(1, 1, D) @ w_q.T + bias[:D]  # (1, 1, D)
    k = x @ w_k.T + bias[D : 2 * D]  # (B, N, D)
    q = q.reshape(1, 1, H, d).transpose(1, 2)  # (1, H, 1, d)
    k = k.reshape(B, -1, H, d).transpose(1, 2)  # (B, H, N, d)
    attn = (q @ k.transpose(-2, -1) * d**-0.5).softmax(dim=-1)  # (B, H, 1, N)
    P0 = vit.info.num_prefix_tokens  # the patch columns: after the prefix, before any suffix tokens
    return attn[:, :, 0, P0 : P0 + rows * cols].reshape(B, H, rows, cols)
