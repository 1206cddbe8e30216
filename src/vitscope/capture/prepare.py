"""One preparation step for every entry point: the model described, the pixels made, on the model's device.

The device rule (the same for `vitscope.capture`, `vitscope.maps`, the streaming paths, gradient methods and
batch mode): **inputs follow the model, and a model you pass is never moved.** A model vitscope loads itself
from a spec string (``"timm:..."``, ``"hf:..."``, a folder) is loaded onto ``device=`` (``"auto"``: CUDA, then
Apple MPS, then CPU). For a model object (an ``nn.Module`` or `VitModel`), ``device=`` may only name the device it
is on; anything else is a one-line error telling you to move it yourself (``model.to(device)``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vitscope._hooks import submodules
from vitscope.adapters.base import SizePolicy, VitModel
from vitscope.errors import VitscopeError


def default_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DEVICE_FIX = "use 'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'"


def resolve_device(
    device: str | torch.device | None, fallback: torch.device, *, argument: str = "device",
) -> torch.device:
    """``None`` -> ``fallback``; ``"auto"`` -> `default_device`; else the named device, checked to be one vitscope
    runs on (CPU, CUDA, Apple MPS) and to exist here. ``argument`` names the option in errors (the CLI passes
    ``"--device"``)."""
    if device is None:
        return fallback
    if isinstance(device, str) and device == "auto":
        return default_device()
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise VitscopeError(argument, f"expected a device name, got {type(device).__name__}", _DEVICE_FIX)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise VitscopeError(argument, f"unknown device {device!r}", _DEVICE_FIX) from None
    if dev.type == "meta":
        raise VitscopeError(
            argument, "the meta device holds no weights and no data: nothing can run on it", _DEVICE_FIX,
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise VitscopeError(argument, f"vitscope does not run on {dev.type!r} devices", _DEVICE_FIX)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VitscopeError(argument, "CUDA is not available here", "use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise VitscopeError(argument, f"{dev} does not exist: this machine has {n} CUDA device(s)",
                                f"use an index in 0..{n - 1}, or 'auto'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VitscopeError(argument, "Apple MPS is not available here", "use 'cpu' or 'auto'")
    return dev


def check_loaded(vit: VitModel, argument: str = "model") -> None:
    """Refuse a model whose weights are on the meta device (built without data: nothing can run)."""
    tensors = (t for m in submodules(vit.module) for d in (m._parameters, m._buffers) for t in d.values())
    if any(t is not None and t.is_meta for t in tensors):
        raise VitscopeError(
            argument, "the model's weights are on the meta device (not loaded)",
            "materialise them first: model.to_empty(device='cpu') and load_state_dict(...), or vitscope.load(spec)",
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def prepare(
    model: Any, images: Any, *, policy: SizePolicy | None = None, size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None, max_tokens: int | None = None, layout: bool = True,
) -> tuple[VitModel, torch.Tensor]:
    """``(vit, pixels)``: the described model and its pixel values ``(B, C, H, W)`` on the model's device.

    ``layout``: measure the token layout (`vitscope.capture.probe.check_layout`, once per model and input
    geometry) and refuse a description that disagrees; a model wrapped without a layout takes the measured one.

    ``max_tokens`` (default `vitscope.limits`): images that would give more tokens are refused before they are
    resized, and so are pixel tensors given as is."""
    from vitscope.adapters import as_vit
    from vitscope.capture.budget import check_tokens
    from vitscope.limits import limits

    vit = as_vit(model)
    check_loaded(vit)
    if device is not None:
        dev = resolve_device(device, vit.device)
        if not _same_device(dev, vit.device):
            if not isinstance(model, (str, os.PathLike)):
                raise VitscopeError(
                    "device", f"the model is on {vit.device}, device={str(device)!r} asks for {dev}",
                    f"move it yourself (model.to('{dev}')): vitscope never moves a model you pass",
                )
            vit.module.to(dev)  # loaded here from a spec: nobody else holds it
    with limits(max_tokens=max_tokens):  # preprocessing refuses too many tokens before it resizes
        pixels = vit.preprocess(images, policy=policy, size=size).to(vit.device, vit.dtype)
    rows, cols = vit.grid_for((int(pixels.shape[-2]), int(pixels.shape[-1])))
    check_tokens(vit.info.num_prefix_tokens + rows * cols, (rows, cols), max_tokens)  # also for tensors given as is
    channels = vit.info.preprocess.channels
    got = int(pixels.shape[-3])  # (B, C, H, W), a video's (B, T, C, H, W)
    if got != channels:
        raise VitscopeError(
            "images", f"{got} channels but the model expects {channels}",
            "pass pixel values with the model's channel count",
        )
    if layout and vit.info.frames:  # a video: its time axis measured too (`vitscope.capture.video`)
        if not vit.info.windowed_layers:
            from vitscope.capture.video import check_video_layout

            check_video_layout(vit, pixels)
    elif layout and not vit.info.windowed_layers:  # windowed blocks take (B, h, w, C) windows: refused per layer
        from vitscope.capture.probe import check_layout

        check_layout(vit, pixels)  # measured (cached per model and geometry) against the description
    return vit, pixels
