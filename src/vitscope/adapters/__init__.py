"""Where models come from. `load` turns a spec (or a module) into a `VitModel`.

Specs:
    ``"vitscope:shapes"``          a model bundled with vitscope
    ``"hf:<hub id or folder>"``    Hugging Face transformers (ViT, DeiT, DINO, DINOv2 (+registers), CLIP, SigLIP)
    ``"timm:<model name>"``        a timm ViT: VisionTransformer, Eva (EVA-02, DINOv3, RoPE), Beit, RelPos, NaFlexViT
    ``"torchvision:<name>"``       a torchvision VisionTransformer (``vit_b_16``...)
    ``"open_clip:<name>"``         an open_clip ViT image tower (``ViT-B-32``...)
    ``"dino:<file.pth>"``          a facebookresearch/dino checkpoint (also any ``.pth``/``.pt`` path)
    a folder                       written by ``vitscope train`` (config.json + model.safetensors), or an HF folder
    an ``nn.Module``               vitscope ViT, transformers or timm model; others via `wrap` with a declaration

Weights, one rule (the ``vitscope`` command follows it too): an architecture named by its library (``timm:``,
``torchvision:``, ``open_clip:``) gets that library's pretrained weights (downloaded, or from the local cache
offline), unless ``checkpoint=`` gives a local file or ``random_weights=True`` opts out. Random weights are always
announced (a `VitscopeWarning`; ``info.describe()`` says "random weights"). ``info.weights`` says which.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from vitscope.adapters.base import (
    AttentionSite,
    ModelInfo,
    Preprocess,
    Tap,
    VitModel,
    refuse_compiled,
    with_weights,
)
from vitscope.errors import CheckpointError, NotAViTError, VitscopeError

__all__ = ["AttentionSite", "ModelInfo", "Preprocess", "Tap", "VitModel", "as_vit", "load", "wrap"]

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")
#: schemes whose names are architectures of a library: its pretrained weights, or `checkpoint=`/`random_weights=`
NAMED_SCHEMES = ("timm", "torchvision", "open_clip", "openclip")


def _module_root(obj: object) -> str:
    return type(obj).__module__.split(".", 1)[0]


def wrap(module: nn.Module, **declaration: Any) -> VitModel:
    """Describe an ``nn.Module``: detected for vitscope, transformers and timm models, else by declaration.

    See `vitscope.adapters.custom.wrap_custom` for the declaration's keywords.
    """
    if isinstance(module, VitModel):
        return module
    if declaration:
        from vitscope.adapters.custom import wrap_custom

        return wrap_custom(module, **declaration)
    from vitscope.models.vit import ViT

    if isinstance(module, ViT):
        from vitscope.adapters.vitscope_vit import from_vit

        return from_vit(module)
    if hasattr(module, "_orig_mod"):  # torch.compile: attention runs in a graph vitscope cannot see
        refuse_compiled(module)
    root = _module_root(module)
    if root == "torchvision":
        from vitscope.adapters.torchvision import from_torchvision_model

        return from_torchvision_model(module)
    if root == "open_clip":
        from vitscope.adapters.openclip import from_open_clip_model

        return from_open_clip_model(module)
    if root == "transformers":
        from vitscope.adapters.hf import from_hf_model

        return from_hf_model(module)
    if root == "timm":
        from vitscope.adapters.timm import from_timm_model

        return from_timm_model(module)
    if not isinstance(module, nn.Module):
        raise NotAViTError("model", f"{type(module).__name__} is not an nn.Module", "pass a model or a spec string")
    raise NotAViTError(
        "model", f"{type(module).__name__} is not a ViT vitscope recognises (no attention blocks found)",
        "declare them: vitscope.wrap(model, blocks='blocks.*', qkv='attn.qkv', num_heads=..., patch_size=...)",
    )


def as_vit(model: Any) -> VitModel:
    """A `VitModel` from a `VitModel`, a spec string/path, or an ``nn.Module``."""
    if isinstance(model, VitModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        try:
            return load(model)
        except VitscopeError as exc:  # what the spec's file decides (num_heads, path, ...): the caller gave `model`
            if exc.argument == "model":
                raise
            raise type(exc)("model", exc.problem, exc.fix) from None
    if isinstance(model, nn.Module):
        return wrap(model)
    raise NotAViTError("model", f"cannot use a {type(model).__name__} as a model", "pass vitscope.load(...) or a spec")


def _load_path(path: Path, **kwargs: Any) -> VitModel:
    if path.is_dir():
        from vitscope.models.vit import read_config

        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError("model", f"folder {path} has no config.json", "pass a saved model folder")
        cfg = read_config(cfg_file)
        if cfg.get("architecture") == "vitscope.ViT":
            from vitscope.adapters.vitscope_vit import load_folder

            return load_folder(path)
        from vitscope.adapters.hf import load_hf

        return load_hf(str(path), **kwargs)
    if path.suffix in _CHECKPOINT_SUFFIXES:
        from vitscope.adapters.checkpoint import load_dino_checkpoint

        return load_dino_checkpoint(path, **kwargs)
    raise CheckpointError("model", f"don't know how to load {path}", "pass a model folder or a .pth checkpoint")


def _check_weights_arguments(spec: str, scheme: str, kwargs: dict[str, Any]) -> None:
    """``checkpoint=`` and ``random_weights=`` choose the weights of a library-named architecture only."""
    if scheme in NAMED_SCHEMES:
        return
    if kwargs.get("checkpoint") is not None:
        raise VitscopeError(
            "checkpoint", f"only applies to timm:, torchvision: or open_clip: architectures, not {spec!r}",
            "for transformers pass the fine-tuned folder as `model='hf:<folder>'`; for DINO as "
            "`model='dino:<file.pth>'`",
        )
    if kwargs.get("random_weights"):
        raise VitscopeError("random_weights", f"only applies to timm:, torchvision: or open_clip: models, not {spec!r}",
                            "leave it out: this model's weights are the ones in its file")
    kwargs.pop("checkpoint", None)
    kwargs.pop("random_weights", None)


def load(spec: str | os.PathLike[str] | nn.Module | VitModel, **kwargs: Any) -> VitModel:
    """Load a ViT and describe it. See the module docstring for the accepted specs and the rule for weights.

    Keywords go to the family's loader; for ``timm:``, ``torchvision:`` and ``open_clip:`` names,
    ``checkpoint=`` (a local state dict) or ``random_weights=True`` (untrained, announced) replace the library's
    pretrained weights.

    Example:
        >>> vit = vitscope.load("vitscope:shapes")  # doctest: +SKIP
        >>> vit.info.prefix, vit.info.num_layers  # doctest: +SKIP
        >>> vitscope.load("timm:vit_small_patch16_224").info.weights  # doctest: +SKIP
        'pretrained'
    """
    if isinstance(spec, (VitModel, nn.Module)):
        return wrap(spec, **kwargs) if not isinstance(spec, VitModel) else spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise VitscopeError("model", f"invalid model spec {spec!r}", "e.g. 'vitscope:shapes', 'hf:facebook/dinov2-small'")
    scheme, sep, rest = spec.partition(":")
    if not (sep and len(scheme) > 1):  # (a Windows drive letter is one character)
        scheme = ""
    _check_weights_arguments(spec, scheme, kwargs)
    if scheme:
        if scheme == "vitscope":
            from vitscope.adapters.vitscope_vit import bundled_path, load_folder

            return with_weights(load_folder(bundled_path(rest), name=f"vitscope:{rest}"), "pretrained")
        if scheme == "hf":
            from vitscope.adapters.hf import load_hf

            folder = Path(rest).expanduser()
            return with_weights(load_hf(rest, **kwargs), f"checkpoint {rest}" if folder.is_dir() else "pretrained")
        if scheme == "timm":
            from vitscope.adapters.timm import load_timm

            return load_timm(rest, **kwargs)
        if scheme == "torchvision":
            from vitscope.adapters.torchvision import load_torchvision

            return load_torchvision(rest, **kwargs)
        if scheme in ("open_clip", "openclip"):
            from vitscope.adapters.openclip import load_open_clip

            return load_open_clip(rest, **kwargs)
        if scheme == "dino":
            from vitscope.adapters.checkpoint import load_dino_checkpoint

            return with_weights(load_dino_checkpoint(Path(rest), **kwargs), f"checkpoint {rest}")
        if scheme not in ("file",):
            raise VitscopeError(
                "model", f"unknown scheme {scheme!r} in {spec!r}", "use vitscope:, hf:, timm:, torchvision:, open_clip:, dino: or a path"
            )
        spec = rest
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(
            "model", f"{spec!r} is neither an existing path nor a known spec",
            "pass a folder/.pth file, or 'vitscope:shapes', 'hf:<id>', 'timm:<name>'",
        )
    return with_weights(_load_path(path, **kwargs), f"checkpoint {spec}")
