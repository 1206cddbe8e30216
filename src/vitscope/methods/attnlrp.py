"""AttnLRP (Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek 2024, "AttnLRP: Attention-Aware
Layer-wise Relevance Propagation for Transformers", ICML), computed by the authors' ``lxt`` package.

An optional extra: ``pip install 'vitscope[lrp]'``. lxt is BSD-3 licensed, and its README notes that LRP is
a patented technology that may be used free of charge for personal and scientific purposes only: check that
before using this method commercially.

lxt's "efficient" implementation patches model classes so that Gradient x Input *is* LRP: the identity rule on
element-wise non-linearities (GELU) and on LayerNorm's variance (stop-gradient), and, inside attention, its
ViT table's CP-LRP variant (no relevance through the softmax: q and k are detached); linear and convolution
layers then follow the epsilon-LRP rule (with epsilon -> 0), i.e. the plain gradient. The relevance of the
input pixels is ``x ⊙ ∂y_c/∂x``; vitscope sums it over the colour channels and over each patch, so the map is
on the patch grid and its sum is the total input relevance. The epsilon rule conserves only approximately:
biases (and LayerNorm's shift) absorb part of the relevance, so ``map.sum()`` is close to, not equal to, the
target logit (`tests/methods/test_attnlrp.py` bounds the gap on random models).

Supported families: those lxt ships a patch table for. lxt 2.1 (the current release) has one vision table,
torchvision's ``VisionTransformer``; its other tables are text models (Llama, Qwen 2/3, Gemma 3, BERT, GPT-2).
Other ViT families are refused with that reason. lxt's tables patch classes *process-wide*
(``torch.nn.GELU``, ``torch.nn.LayerNorm``, ``torch.nn.MultiheadAttention``): vitscope applies them only while
the map is computed, under a lock, and puts the original methods back on exit (error or not); other threads
running those classes meanwhile would see the patched forward. lxt's tutorial for ViTs adds zennit's Gamma
rule to the linear and convolution layers for sharper maps; vitscope does not (the map is lxt's table alone).

lxt 2.1's model-table module imports a function transformers 5 removed (its BERT table), which makes
``import lxt.efficient`` fail under transformers 5; vitscope then loads lxt's rule, patch and torchvision-table
modules on their own (the same files, none of the text models' code).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitscope.adapters.base import SizePolicy, VitModel
from vitscope.capture.hooks import eval_mode
from vitscope.errors import VitscopeError
from vitscope.methods._gradients import Target, grad_enabled, resolve_classes
from vitscope.methods.registry import MapContext, MapResult, Method, register
from vitscope.methods.targets import target_meta
from vitscope.methods.transformer_attribution import class_targets

INSTALL = "pip install 'vitscope[lrp]'"
_LOCK = threading.Lock()  # lxt patches classes process-wide: one AttnLRP at a time
_LOADED: list[Any] = []  # lxt's torchvision table module, once loaded


def _efficient_modules() -> Any:
    """lxt's torchvision table module (``lxt.efficient.models.vit_torch``), or a one-line error."""
    try:
        import lxt
    except ImportError:
        raise VitscopeError("method", "attnlrp needs the lxt package (an optional extra)", INSTALL) from None
    if not _LOADED:
        _LOADED.append(_load_efficient(lxt))
    return _LOADED[0]


def _load_efficient(lxt: Any) -> Any:
    try:
        return importlib.import_module("lxt.efficient.models.vit_torch")
    except ImportError:  # lxt 2.1 under transformers 5: its table of text models fails to import
        pass
    base = Path(next(iter(lxt.__path__))) / "efficient"
    saved = sys.modules.get("lxt.efficient")
    package = types.ModuleType("lxt.efficient")  # the package without its __init__ (which imports every table)
    package.__path__ = [str(base)]
    sys.modules["lxt.efficient"] = package
    try:
        importlib.import_module("lxt.efficient.rules")
        importlib.import_module("lxt.efficient.patches")
        spec = importlib.util.spec_from_file_location("vitscope._lxt_vit_torch", base / "models" / "vit_torch.py")
        if spec is None or spec.loader is None:
            raise ImportError("no vit_torch.py in lxt")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError) as exc:
        raise VitscopeError("method", f"lxt's torchvision rules do not load ({exc})".replace("\n", " "),
                            f"{INSTALL} with the versions in constraints.txt") from None
    finally:
        if saved is None:
            sys.modules.pop("lxt.efficient", None)
        else:
            sys.modules["lxt.efficient"] = saved


def patch_table(vit: VitModel) -> dict[Any, Any]:
    """lxt's patch table for ``vit``'s family, or a one-line error saying lxt has none."""
    table = _efficient_modules()
    if vit.info.family != "torchvision":
        raise VitscopeError(
            "method", f"lxt has no AttnLRP rules for {type(vit.module).__name__} ({vit.info.family}): its only "
            "vision table is torchvision's VisionTransformer (the others are text models)",
            "load a torchvision ViT (torchvision:vit_b_16), or use 'transformer_attribution'",
        )
    return dict(table.cp_LRP)


@contextmanager
def patched(table: dict[Any, Any]) -> Iterator[None]:
    """lxt's patches applied to the table's classes, the classes' own methods restored on exit."""
    with _LOCK:
        saved = {cls: {k: cls.__dict__[k] for k in ("forward", "original_forward") if k in cls.__dict__}
                 for cls in table}
        try:
            for cls, patch in table.items():
                if not patch(cls):
                    raise VitscopeError("method", f"lxt could not patch {cls.__name__} (already patched?)",
                                        "restart Python without lxt's monkey_patch applied")
            yield
        finally:
            for cls, attrs in saved.items():
                for k in ("forward", "original_forward"):
                    if k in attrs:
                        setattr(cls, k, attrs[k])
                    elif k in cls.__dict__:
                        delattr(cls, k)


@grad_enabled
def attnlrp_relevance(model: Any, images: Any, target: Target = None, *, policy: SizePolicy | None = None,
                      size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, VitModel]:
    """Pixel relevance ``(B, C, H, W)`` of the target logits by lxt's AttnLRP, the logits ``(B,)`` and the model."""
    from vitscope.capture.prepare import prepare

    vit, pixels = prepare(model, images, policy=policy, size=size)
    table = patch_table(vit)
    if callable(target) and not isinstance(target, torch.Tensor):
        raise VitscopeError("target", "attnlrp starts its relevance at one class logit",
                            "pass a class index (one per image), or None for the predicted class")
    with torch.inference_mode(False):
        x = pixels.detach().clone().requires_grad_(True)
    with eval_mode(vit.module), patched(table), torch.enable_grad():
        output = vit(x)
        logits = vit.logits(output)
        classes = resolve_classes(vit, output, target)
        assert logits is not None and classes is not None
        chosen = logits.gather(1, classes[:, None])[:, 0]  # (B,)
        (grad,) = torch.autograd.grad(chosen.sum(), x)
    return (x * grad).detach(), chosen.detach(), vit


def attnlrp(model: Any, images: Any, target: Target = None, *, policy: SizePolicy | None = None,
            size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """AttnLRP map ``(batch, rows, cols)``: lxt's pixel relevance summed over channels and over each patch.

    Args:
        model: a `VitModel`, spec or module of a family lxt supports (torchvision ViT); left unchanged.
        images: anything `vitscope.capture` takes.
        target: class index (default the predicted class), or one per image.
        policy, size: preprocessing (see `vitscope.capture`).
    """
    rel, _logits, vit = attnlrp_relevance(model, images, target, policy=policy, size=size)
    ph, pw = vit.info.patch_size
    per_pixel = rel.sum(dim=1, keepdim=True)  # (B, 1, H, W)
    return (F.avg_pool2d(per_pixel, (ph, pw)) * (ph * pw))[:, 0].float()  # (B, rows, cols): sum per patch


def _compute(ctx: MapContext, *, target: Target = None) -> MapResult:
    classes = class_targets(ctx, target, "attnlrp")
    grid_map = attnlrp(ctx.vit, ctx.pixels, classes)
    return MapResult(map=grid_map, meta={"target": target_meta(classes)})


register(Method(
    name="attnlrp", compute=_compute, needs="gradients", check=patch_table,
    summary="AttnLRP via lxt (optional extra vitscope[lrp]; LRP is patented, see docs): pixel relevance per patch",
    paper="Achtibat et al., AttnLRP: Attention-Aware Layer-wise Relevance Propagation for Transformers, ICML 2024",
))
