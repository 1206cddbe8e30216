"""Adapter for timm's ViTs: ``VisionTransformer`` (DeiT incl. distilled, registers, qk-norm), ``Eva`` (EVA-02,
DINOv3, ``vit_*_rope_*``), ``Beit``, ``VisionTransformerRelPos`` and ``NaFlexVit``.

The adapter only says which module computes each layer's attention (``blocks[i].attn``), what the prefix tokens
are and how pixels are prepared; capture intercepts the attention inside that module (SDPA with its RoPE'd q/k
and relative-position bias as ``attn_mask``, or the explicit softmax when ``fused_attn`` is off), so no flag is
touched and outputs are bit-identical. Windowed models (Swin, Hiera, SAM's windowed blocks) are refused.

Prefix tokens are read from the model, never assumed: ``[CLS]`` if ``cls_token`` is set, then
``reg_token`` registers (``[CLS, reg..., patches]``), or ``[CLS, DIST]`` for ``VisionTransformerDistilled``;
NaFlexViT keeps them on its ``embeds`` module.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import (
    AttentionSite,
    ModelInfo,
    Preprocess,
    VitModel,
    choose_weights,
    import_optional,
    window_of,
    with_weights,
)
from vitscope.errors import CheckpointError, NotAViTError, VitscopeError

_RESAMPLE_NAMES = ("nearest", "bilinear", "bicubic", "lanczos")
_WRAP_HINT = (
    "vitscope reads timm's VisionTransformer, Eva, Beit, RelPos and NaFlexViT; another global-attention ViT can be "
    "declared with vitscope.wrap(model, blocks=..., num_heads=..., patch_size=...)"
)




def _token_owner(model: nn.Module) -> nn.Module:
    """The module holding the prefix tokens: the model itself, or NaFlexViT's ``embeds``."""
    embeds = getattr(model, "embeds", None)
    return embeds if isinstance(embeds, nn.Module) and not hasattr(model, "cls_token") else model


def _prefix_kinds(model: nn.Module) -> tuple[str, ...]:
    """Kinds of the prefix tokens in token order, checked against the model's ``num_prefix_tokens``."""
    n = int(getattr(model, "num_prefix_tokens", 0))
    model = _token_owner(model)
    if getattr(model, "dist_token", None) is not None:
        kinds: tuple[str, ...] = ("cls", "dist")  # VisionTransformerDistilled: [CLS, DIST, patches]
    else:
        has_cls = getattr(model, "cls_token", None) is not None and getattr(model, "has_class_token", True)
        reg = getattr(model, "reg_token", None)
        kinds = ("cls",) * bool(has_cls) + ("register",) * (int(reg.shape[1]) if reg is not None else 0)
    if len(kinds) != n:
        raise NotAViTError(
            "model", f"{type(model).__name__} says num_prefix_tokens={n} but has the tokens {kinds}",
            "this timm variant lays out its tokens differently; declare it with vitscope.wrap(..., prefix=...)",
        )
    return kinds


def _patch_embed(model: nn.Module) -> Any:
    pe = getattr(model, "patch_embed", None) or getattr(model, "embeds", None)
    if not isinstance(pe, nn.Module) or getattr(pe, "patch_size", None) is None:
        raise NotAViTError("model", f"{type(model).__name__} has no patch embedding vitscope recognises", _WRAP_HINT)
    return pe


def _vit_holder(model: nn.Module) -> nn.Module:
    """The module holding the patch embedding and the blocks: the model itself, or the one child that does
    (the VLM towers ``qwen3_vit_*``, ``gemma4_vit_*``, ``deepseek_vit_*`` keep them on ``model.encoder``)."""
    def holds(m: nn.Module) -> bool:
        blocks = getattr(m, "blocks", None)
        return isinstance(blocks, nn.Module) and len(list(blocks.children())) > 0 and (
            isinstance(getattr(m, "patch_embed", None), nn.Module) or isinstance(getattr(m, "embeds", None), nn.Module))

    if holds(model):
        return model
    inner = [child for child in model.children() if holds(child)]
    if len(inner) == 1:
        return inner[0]
    if not isinstance(getattr(model, "blocks", None), nn.Module):
        raise NotAViTError("model", f"timm model {type(model).__name__} has no transformer blocks", _WRAP_HINT)
    return model


def _in_channels(patch_embed: nn.Module) -> int | None:
    """The image channels: the first convolution's input (a hybrid's ResNet stem, not its 1x1 projection)."""
    conv = next((m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else None


def _measured_patch(patch_embed: nn.Module, channels: int, size: tuple[int, int], declared: tuple[int, int]
                    ) -> tuple[int, int]:
    """Pixels per token, measured: the patch embedding run on a blank image of the model's size, its token
    grid read from the output (``(B, rows, cols, D)``, or ``(B, rows*cols, D)`` with ``grid_size`` or a square
    probe). A hybrid ViT's ResNet stem (``vit_*_r26_*``, ``vit_*_r50_*``, ViTamin, MCi) declares patch 1 (its
    1x1 projection) but each token covers 16 or 32 pixels."""
    from vitscope._hooks import eval_mode

    device = next((p.device for p in patch_embed.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in patch_embed.parameters() if p.is_floating_point()), torch.float32)

    def run(h: int, w: int) -> torch.Tensor:
        with torch.no_grad(), eval_mode(patch_embed):
            out = patch_embed(torch.zeros(1, channels, h, w, device=device, dtype=dtype))
        return out[0] if isinstance(out, (tuple, list)) else out

    H, W = size
    try:
        out = run(H, W)
        if out.dim() == 4:  # (B, rows, cols, D)
            rows, cols = int(out.shape[1]), int(out.shape[2])
        else:
            n = int(out.shape[1])
            grid = getattr(patch_embed, "grid_size", None)
            if grid is not None and int(grid[0]) * int(grid[1]) == n:
                rows, cols = int(grid[0]), int(grid[1])
            elif H == W and round(n ** 0.5) ** 2 == n:
                rows = cols = round(n ** 0.5)
            else:
                return declared
    except Exception:  # a stem that refuses a blank probe: keep the declared patch size
        return declared
    if rows <= 0 or cols <= 0 or H % rows or W % cols:
        raise NotAViTError("model", f"the patch embedding turns a {H}x{W} image into a {rows}x{cols} grid: not a "
                           "whole number of pixels per token", _WRAP_HINT)
    return (H // rows, W // cols)


def _preprocess(model: nn.Module, dynamic: bool) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch_embed: Any = _patch_embed(model)
    channels = _in_channels(patch_embed) or int(getattr(patch_embed, "in_chans", 3) or 3)
    img_size = getattr(patch_embed, "img_size", None) or getattr(patch_embed, "default_img_size", None)
    if img_size is None:
        img_size = tuple(cfg.get("input_size", (channels, 224, 224)))[1:]
    mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
    if len(mean) < channels or len(std) < channels:
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    interpolation = str(cfg.get("interpolation", "bicubic"))
    return Preprocess(
        image_size=(int(img_size[0]), int(img_size[1])), mean=mean, std=std,  # type: ignore[arg-type]
        policy="resize", resample=interpolation if interpolation in _RESAMPLE_NAMES else "bicubic",
        dynamic_size=dynamic, channels=channels,
    )


def _labels(model: nn.Module, num_classes: int) -> tuple[str, ...] | None:
    """ImageNet class names when the classifier has an ImageNet subset's size (timm ships the names)."""
    if num_classes <= 0:
        return None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return None
        info = ImageNetInfo(subset)
        if info.num_classes() != num_classes:
            return None
        return tuple(info.index_to_description(i) for i in range(num_classes))
    except Exception:  # label names are a convenience; never fail a load over them
        return None


#: timm classes whose attention is windowed or pooled per stage in every layer: refused with this reason
_WINDOWED = {
    "SwinTransformer": "Swin", "SwinTransformerV2": "Swin V2", "SwinTransformerV2Cr": "Swin V2", "Hiera": "Hiera",
    "HieraDet": "SAM2's Hiera", "MaxxVit": "MaxViT", "MaxxVitV2": "MaxViT", "DaVit": "DaViT",
    "EfficientVit": "EfficientViT", "NextViT": "Next-ViT", "GcVit": "GC ViT", "Twins": "Twins",
    "PoolFormer": "PoolFormer", "MViT": "MViT",
}


def _refuse_windowed(module: nn.Module) -> None:
    name = type(module).__name__
    if name in _WINDOWED:
        raise NotAViTError(
            "model", f"{name} ({_WINDOWED[name]}) attends within local windows or pooled stages, not over every "
            "patch: there is no global attention map to capture",
            "use a global-attention ViT (ViT, DeiT, EVA, DINOv2/v3, BEiT, ...)",
        )


def from_timm_model(module: nn.Module, name: str | None = None) -> VitModel:
    """Describe a timm ViT: ``VisionTransformer`` (DeiT incl. distilled), ``Eva`` (EVA-02, DINOv3, RoPE ViTs),
    ``Beit``, ``VisionTransformerRelPos`` or ``NaFlexVit``: any timm model with ``blocks[i].attn`` and a patch
    embedding. Capture reads each block's attention where ``blocks[i].attn`` computes it, so RoPE, relative
    position biases and qk-norm are included.

    The module is used as given (its ``fused_attn`` flags, ``training`` flags and weights are not changed).
    """
    import_optional("timm", "'vitscope[timm]'")
    _refuse_windowed(module)
    holder = _vit_holder(module)
    _refuse_windowed(holder)
    blocks = getattr(holder, "blocks", None)
    if not isinstance(blocks, nn.Module) or not len(blocks):  # type: ignore[arg-type]
        raise NotAViTError("model", f"timm model {type(module).__name__} has no transformer blocks", _WRAP_HINT)
    _patch_embed(holder)
    prefix = _prefix_kinds(holder)
    sites = []
    kinds = []
    for i, blk in enumerate(list(blocks.children())):
        attn = getattr(blk, "attn", None)
        heads = getattr(attn, "num_heads", None)
        if not isinstance(attn, nn.Module) or not isinstance(heads, int):
            raise NotAViTError(
                "model", f"block {i} of {type(module).__name__} has no attention module with num_heads", _WRAP_HINT,
            )
        sites.append(AttentionSite(layer=i, block=blk, attn=attn, num_heads=heads))
        kinds.append("windowed" if window_of(blk) > 0 else "global")
    if "global" not in kinds:
        raise NotAViTError(
            "model", f"every block of {type(module).__name__} attends within local windows (window_size="
            f"{window_of(sites[0].block)}): no layer has a global attention map", "use a global-attention ViT",
        )
    pe = _patch_embed(holder)
    ps = pe.patch_size
    declared = (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))
    # any size: timm's dynamic_img_size, NaFlexViT, a patch embedding that does not insist on its size (the VLM
    # towers resample their position table per input) or that has none (Gemma4's positions come from coordinates)
    dynamic = (bool(getattr(holder, "dynamic_img_size", False)) or type(holder).__name__ == "NaFlexVit"
               or getattr(pe, "strict_img_size", True) is False or not hasattr(pe, "img_size"))
    prep = _preprocess(holder, dynamic)
    patch = declared if type(holder).__name__ == "NaFlexVit" else _measured_patch(
        pe, prep.channels, prep.image_size, declared)
    num_classes = int(getattr(module, "num_classes", 0) or 0)
    cfg = getattr(module, "pretrained_cfg", None) or {}
    info = ModelInfo(
        name=name or str(cfg.get("architecture") or type(module).__name__), family="timm",
        num_layers=len(sites), num_heads=sites[0].num_heads,
        embed_dim=int(getattr(holder, "embed_dim", 0) or getattr(holder, "num_features", 0)),
        patch_size=(patch[0], patch[1]), prefix=prefix, preprocess=prep,
        num_classes=num_classes or None, labels=_labels(module, num_classes),
        layer_kinds=tuple(kinds) if "windowed" in kinds else (),
    )

    def forward(m: nn.Module, pixels: torch.Tensor) -> Any:
        if not prep.dynamic_size and tuple(pixels.shape[-2:]) != prep.image_size:
            h, w = prep.image_size
            raise VitscopeError(
                "images", f"this timm model was built for {h}x{w} inputs, got {pixels.shape[-2]}x{pixels.shape[-1]}",
                "create it with dynamic_img_size=True where the class accepts it (load_timm's default), or "
                f"resize the images to {h}x{w} (policy='resize')",
            )
        return m(pixels)

    def logits(output: Any) -> torch.Tensor | None:
        if num_classes and isinstance(output, torch.Tensor) and output.dim() == 2:
            return output
        return None

    norm, forward_head = getattr(module, "norm", None), getattr(module, "forward_head", None)
    readout = None
    if holder is module and isinstance(norm, nn.Module) and callable(forward_head):
        readout = lambda x: forward_head(norm(x))  # noqa: E731  (timm's own forward after the blocks)
    embed = None
    if readout is not None and isinstance(norm, nn.Module) and callable(forward_head) and \
            _accepts_pre_logits(forward_head):
        embed = lambda x: forward_head(norm(x), pre_logits=True)  # noqa: E731  (pooled features, no classifier)
    return VitModel(module, info, sites, forward=forward, logits=logits, readout=readout, embed=embed,
                    final_norm=norm if holder is module and isinstance(norm, nn.Module) else None)


def _accepts_pre_logits(fn: Any) -> bool:
    import inspect

    try:
        return "pre_logits" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _unknown_model(timm: Any, name: str) -> VitscopeError:
    base = name.split(".", 1)[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    fix = f"did you mean {', '.join(close)}?" if close else "timm's ViTs are named vit_*, deit_*, eva02_*, beit*, ..."
    return VitscopeError("model", f"timm has no model {name!r}", fix)


_NOT_VIT_FIX = "vitscope reads timm's global-attention ViTs: vit_*, deit_*, eva02_*, beit*, naflexvit_* names"
#: timm model modules whose classes vitscope reads (`from_timm_model`)
_VIT_MODULES = ("vision_transformer", "vision_transformer_relpos", "vision_transformer_hybrid", "deit", "eva",
                "beit", "naflexvit", "vitamin", "qwen3_vit", "gemma4_vit", "deepseek_vit", "vision_transformer_sam")
#: timm model modules with windowed / pooled attention in every layer: refused with that reason (SAM's image
#: encoder is read: its global blocks are capturable, its windowed ones refused per layer)
_WINDOWED_MODULES = {"swin_transformer": "Swin", "swin_transformer_v2": "Swin V2", "swin_transformer_v2_cr": "Swin V2",
                     "hiera": "Hiera", "hieradet_sam2": "SAM2's Hiera", "maxxvit": "MaxViT"}


def _check_is_vit(timm: Any, name: str) -> None:
    """Refuse, before creating or downloading anything, a timm name whose builder lives outside timm's ViT
    modules (``convnext_atto`` -> ``timm.models.convnext``)."""
    try:
        module = str(getattr(timm.models.model_entrypoint(name.split(".", 1)[0]), "__module__", ""))
    except Exception:  # unknown names are reported by create_model's path
        return
    family = module.rsplit(".", 1)[-1]
    if family in _WINDOWED_MODULES:
        raise NotAViTError(
            "model", f"timm model {name!r} ({_WINDOWED_MODULES[family]}) attends within local windows, not over "
            "every patch: there is no global attention map to capture", _NOT_VIT_FIX,
        )
    if family and family not in _VIT_MODULES:
        raise NotAViTError("model", f"timm model {name!r} is not a ViT (it is built by timm.models.{family})",
                           _NOT_VIT_FIX)


def _hub_id(timm: Any, name: str) -> str | None:
    try:
        hub = timm.models.get_pretrained_cfg(name).hf_hub_id
    except Exception:
        return None
    return str(hub) if hub else None


def _pretrained_fix(timm: Any, name: str) -> str:
    hub = _hub_id(timm, name)
    where = f"https://huggingface.co/{hub}" if hub else "the model's page"
    return (
        f"download model.safetensors from {where} on a connected machine and pass "
        "`checkpoint='path/to/model.safetensors'` (or load it once online: the Hugging Face cache is used offline), "
        "or pass `random_weights=True` for an untrained model"
    )


def _read_timm_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (unwrapped from timm's and other trainers' checkpoints), its shapes and size
    checked (`check_state`) before any model is created from it."""
    from vitscope.adapters.checkpoint import check_state, read_checkpoint

    obj = read_checkpoint(path, argument="checkpoint")
    if not isinstance(obj, Mapping):
        raise CheckpointError("checkpoint", f"{path} holds a {type(obj).__name__}, not a state dict",
                              "save model.state_dict()")
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm train.py / other trainers
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            k = str(k)
            state[k[len("module."):] if k.startswith("module.") else k] = v
    if not state:
        raise CheckpointError("checkpoint", f"no tensors in {path}", "pass a state dict saved from a timm model")
    check_state(state, path, "checkpoint")
    head = state.get("head.weight")  # (classes, D): decides num_classes, so checked before the model is built
    if head is not None and (head.dim() != 2 or 0 in head.shape):
        raise CheckpointError("checkpoint", f"{path}: head.weight has shape {tuple(head.shape)}, expected "
                              "(classes, embed_dim)", "pass a state dict saved from a timm model")
    return state


def load_timm(
    name: str, pretrained: bool | None = None, checkpoint: str | os.PathLike[str] | None = None,
    random_weights: bool = False, **timm_kwargs: Any
) -> VitModel:
    """Create a timm ViT by name and describe it.

    Args:
        name: a timm model name (``"vit_small_patch16_224"``, ``"deit_tiny_distilled_patch16_224"``,
            ``"vit_base_patch14_reg4_dinov2"``, optionally with a ``.tag``).
        pretrained: timm's published weights: the default unless ``checkpoint`` or ``random_weights`` is given
            (downloaded from the Hugging Face hub, or read from its local cache offline).
        checkpoint: a local ``.safetensors`` or ``.pth`` (read with ``weights_only=True``) state dict for this
            model, e.g. a timm hub ``model.safetensors`` or ``torch.save(model.state_dict())``; position
            embeddings are resampled to the model's size as timm does. ``num_classes`` is taken from the
            checkpoint's ``head.weight`` unless given.
        random_weights: build the architecture untrained (announced with a `VitscopeWarning`).
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``reg_tokens``, ``qk_norm``, ...).
            ``dynamic_img_size`` defaults to ``True`` so any multiple of the patch size works.

    Example:
        >>> vit = vitscope.load("timm:vit_small_patch16_224", checkpoint="vit_s16.safetensors")  # doctest: +SKIP
    """
    timm = import_optional("timm", "'vitscope[timm]'")
    _check_is_vit(timm, name)
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name.split(".", 1)[0]):
        raise _unknown_model(timm, name)  # before any download is tried
    weights = choose_weights(checkpoint, random_weights, pretrained)
    pretrained = weights == "pretrained"
    auto_dynamic = "dynamic_img_size" not in timm_kwargs
    timm_kwargs.setdefault("dynamic_img_size", True)
    if pretrained:
        from vitscope.adapters._hub import cached_file, offline_reason

        reason = offline_reason()
        if reason is not None:  # don't wait for the hub's retries: use the cache, or say so at once
            hub = _hub_id(timm, name)
            cached = cached_file(hub, "model.safetensors") if hub else None
            if cached is None:
                raise CheckpointError("model", f"cannot download timm's weights for {name!r}: offline ({reason})",
                                      _pretrained_fix(timm, name))
            pretrained, checkpoint = False, cached
    state = _read_timm_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None and "num_classes" not in timm_kwargs:
        head = state.get("head.weight")
        timm_kwargs["num_classes"] = int(head.shape[0]) if head is not None and head.dim() == 2 else 0
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
        except TypeError as exc:  # Beit, RelPos, NaFlexViT...: no dynamic_img_size (fixed size or native)
            if "dynamic_img_size" not in str(exc) or not auto_dynamic:
                raise
            timm_kwargs.pop("dynamic_img_size")
            model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise _unknown_model(timm, name) from None
        if pretrained:
            raise CheckpointError("model", f"could not load timm's weights for {name!r} ({_one_line(exc)})",
                                  _pretrained_fix(timm, name)) from None
        raise
    except TypeError as exc:
        if "dynamic_img_size" in str(exc):  # only timm's ViTs take it: this architecture is something else
            raise NotAViTError("model", f"timm model {name!r} is not a ViT ({exc})", _NOT_VIT_FIX) from None
        raise VitscopeError("timm_kwargs", f"timm.create_model({name!r}) rejected an argument: {exc}",
                            "pass only keyword arguments the model accepts") from None
    except Exception as exc:
        if not pretrained:
            raise
        # Offline, huggingface_hub raises LocalEntryNotFoundError/OSError (after its retries).
        raise CheckpointError(
            "model", f"could not download timm's weights for {name!r} ({type(exc).__name__})",
            _pretrained_fix(timm, name),
        ) from None
    if state is not None:
        _load_into(model, state, name, checkpoint)
    return with_weights(from_timm_model(model.eval(), name=name),
                        f"checkpoint {checkpoint}" if weights == "checkpoint" else weights)  # (cached: pretrained)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Any) -> None:
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    fix = "create the model with the arguments the checkpoint was made with (img_size, patch_size, embed_dim, depth, " \
          "num_heads, reg_tokens, class_token, ...)"
    own = model.state_dict()
    for key, value in state.items():  # ranks and dtypes against the model before timm converts anything
        target = own.get(key)
        if target is None:
            continue
        # timm converts a flattened (JAX) patch kernel and resamples pos_embed; every other rank must match
        flexible = key in ("patch_embed.proj.weight", "pos_embed")
        if (value.dim() != target.dim() and not flexible) or (flexible and not 1 < value.dim() <= 4) or (
            value.numel() == 0 and target.numel() != 0
        ):
            raise CheckpointError("checkpoint", f"{path}: {key} has shape {tuple(value.shape)}, {name} has "
                                  f"{tuple(target.shape)}", fix)
        if value.numel() > 64 * target.numel() + 2**20:  # resampling a giant (e.g. a zero-stride view) would allocate it
            raise CheckpointError("checkpoint", f"{path}: {key} has shape {tuple(value.shape)}, far larger than "
                                  f"{name}'s {tuple(target.shape)}", fix)
        if target.is_floating_point() and not value.is_floating_point():
            raise CheckpointError("checkpoint", f"{path}: {key} holds {value.dtype} values, not weights", fix)
    if isinstance(model, VisionTransformer):
        try:  # resamples pos_embed, converts original JAX/DeiT layouts
            state = checkpoint_filter_fn(state, model)
        except Exception as exc:  # any failure converting the file's tensors is the file's fault
            first = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise CheckpointError("checkpoint", f"{path} does not fit {name}: {first}", fix) from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        mismatch = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:200])
        raise CheckpointError("checkpoint", f"{path} does not fit {name}: {mismatch}", fix) from None
    if missing or unexpected:
        parts = ([f"missing {sorted(missing)[:4]}"] if missing else []) + (
            [f"unexpected {sorted(unexpected)[:4]}"] if unexpected else [])
        raise CheckpointError("checkpoint", f"{path} does not fit {name}: {'; '.join(parts)}", fix)
