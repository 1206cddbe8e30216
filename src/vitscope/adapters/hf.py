"""Hugging Face ``transformers`` ViTs: any model whose vision transformer can be found (`_find_tower`).

The vision transformer is found by structure, not by class: a patch embedding and the layers after it whose
attention modules own q/k/v projections (separate or a fused ``qkv``). Composites (CLIP, SigLIP, BLIP/BLIP-2,
OWL-ViT/OWLv2, ChineseCLIP), VLM towers (Idefics3/SmolVLM, Pixtral), MLCD, DPT, VitPose, SAM's image encoder
and ViTDet are read that way; ``FAMILIES`` only gives preprocessing defaults and names. Layers that attend within
windows (SAM, ViTDet) are listed in ``ModelInfo.layer_kinds`` and refused per layer at capture.

The families below were read before the generic route and keep their details:

Supported classes (any head: base model, ``...ForImageClassification``, DeiT's ``...WithTeacher``):

=====================  =====================================================  ==============================
family                 classes                                                token layout (prefix, patches)
=====================  =====================================================  ==============================
``vit`` / ``dino``     ``ViTModel``, ``ViTForImageClassification``            ``[CLS, patches]``
                       (``facebook/dino-*`` are ``ViTModel`` checkpoints)
``deit``               ``DeiTModel``, ``DeiTForImageClassification(...)``     ``[CLS, DIST, patches]``
``dinov2``             ``Dinov2Model``, ``Dinov2ForImageClassification``      ``[CLS, patches]``
``dinov2``             ``Dinov2WithRegistersModel`` (...)                     ``[CLS, REG x R, patches]``
``clip``               ``CLIPVisionModel(WithProjection)``, ``CLIPModel``     ``[CLS, patches]``
``siglip``/``siglip2`` ``SiglipVisionModel``, ``SiglipModel``,                ``[patches]`` (no prefix)
                       ``Siglip2VisionModel``, ``Siglip2Model``
=====================  =====================================================  ==============================

For ``CLIPModel``/``SiglipModel``/``Siglip2Model`` only the vision tower runs (``model.vision_model``). The
prefix is read from the embedding module's parameters (``cls_token``/``class_embedding``,
``distillation_token``, ``register_tokens``), never assumed; layers, heads, patch size and image size come from
the (vision) config; mean/std/size/resample from the folder's ``preprocessor_config.json`` (or the
``image_processor`` entry of ``processor_config.json``), else the family's defaults.

How attention is read: each layer's attention module is the one owning separate ``q_proj``/``k_proj``/``v_proj``
Linears (``query``/``key``/``value`` in transformers 4.x). Capture intercepts the attention call made inside it
(`vitscope.capture.intercept`: the SDPA kernel's q, k, mask and scale, after DINOv3's RoPE or with BEiT's
relative position bias, or the eager softmax), so the model keeps its own attention implementation (SDPA by
default) and its outputs are bit-identical with and without capture. The forward pass uses ``interpolate_pos_encoding=True``
where the class accepts it (DINOv2 interpolates natively; SigLIP2 gets its patches and ``spatial_shapes`` built
from the pixel tensor), so any image size and aspect ratio works.

Models without [CLS] (SigLIP, SigLIP2) have ``prefix == ()``: ``queries="cls"`` is an error, and vitscope's
convention for their global map is the mean over all patch query rows (``weights.mean(dim=query)``). Their own
pooling is an attention-pooling head (a learned probe attending to every patch); `vitscope.methods.probe_attention` returns that
head's attention ``(B, heads, rows, cols)``, which is the closest thing they have to a [CLS] row.

Example:
    >>> vit = vitscope.load("hf:facebook/dinov2-small")                    # doctest: +SKIP
    >>> vit = vitscope.load("hf:/path/to/folder")  # after model.save_pretrained(folder)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import (
    AttentionSite,
    ModelInfo,
    PaddedRoute,
    Preprocess,
    TextTower,
    VitModel,
    import_optional,
    scaled_cosine,
    window_of,
)
from vitscope.errors import CheckpointError, NotAViTError, VitscopeError

__all__ = ["from_hf_model", "load_hf", "siglip2_inputs"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class _Family:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str
    default_class: str
    dynamic: bool = False  # any input size without interpolate_pos_encoding (RoPE, bucketed or resampled positions)


#: ``config.model_type`` -> family defaults (used when a folder has no preprocessor config).
FAMILIES: dict[str, _Family] = {
    "vit": _Family("vit", HALF, HALF, "bilinear", "ViTModel"),
    "deit": _Family("deit", IMAGENET_MEAN, IMAGENET_STD, "bicubic", "DeiTModel"),
    "dinov2": _Family("dinov2", IMAGENET_MEAN, IMAGENET_STD, "bicubic", "Dinov2Model"),
    "dinov2_with_registers": _Family(
        "dinov2", IMAGENET_MEAN, IMAGENET_STD, "bicubic", "Dinov2WithRegistersModel"
    ),
    "clip": _Family("clip", CLIP_MEAN, CLIP_STD, "bicubic", "CLIPModel"),
    "clip_vision_model": _Family("clip", CLIP_MEAN, CLIP_STD, "bicubic", "CLIPVisionModel"),
    "siglip": _Family("siglip", HALF, HALF, "bicubic", "SiglipModel"),
    "siglip_vision_model": _Family("siglip", HALF, HALF, "bicubic", "SiglipVisionModel"),
    "siglip2": _Family("siglip2", HALF, HALF, "bilinear", "Siglip2Model"),
    "siglip2_vision_model": _Family("siglip2", HALF, HALF, "bilinear", "Siglip2VisionModel"),
    "dinov3_vit": _Family("dinov3", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "DINOv3ViTModel"),
    "beit": _Family("beit", HALF, HALF, "bicubic", "BeitModel"),
    "data2vec-vision": _Family("data2vec-vision", HALF, HALF, "bicubic", "Data2VecVisionModel"),
    "vit_mae": _Family("vit_mae", IMAGENET_MEAN, IMAGENET_STD, "bicubic", "ViTMAEModel"),
    "vit_msn": _Family("vit_msn", IMAGENET_MEAN, IMAGENET_STD, "bicubic", "ViTMSNModel"),
    "ijepa": _Family("ijepa", IMAGENET_MEAN, IMAGENET_STD, "bicubic", "IJepaModel"),
    "aimv2_vision_model": _Family("aimv2", CLIP_MEAN, CLIP_STD, "bicubic", "Aimv2VisionModel"),
    "aimv2": _Family("aimv2", CLIP_MEAN, CLIP_STD, "bicubic", "Aimv2Model"),
    "yolos": _Family("yolos", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "YolosModel", dynamic=True),
    # found by structure (`_find_tower`): only their naming and preprocessing are family-specific
    "blip": _Family("blip", CLIP_MEAN, CLIP_STD, "bicubic", "BlipModel"),
    "blip_vision_model": _Family("blip", CLIP_MEAN, CLIP_STD, "bicubic", "BlipVisionModel"),
    "blip-2": _Family("blip-2", CLIP_MEAN, CLIP_STD, "bicubic", "Blip2Model"),
    "blip_2_vision_model": _Family("blip-2", CLIP_MEAN, CLIP_STD, "bicubic", "Blip2VisionModel"),
    "owlvit": _Family("owlvit", CLIP_MEAN, CLIP_STD, "bicubic", "OwlViTModel"),
    "owlvit_vision_model": _Family("owlvit", CLIP_MEAN, CLIP_STD, "bicubic", "OwlViTVisionModel"),
    "owlv2": _Family("owlv2", CLIP_MEAN, CLIP_STD, "bilinear", "Owlv2Model"),
    "owlv2_vision_model": _Family("owlv2", CLIP_MEAN, CLIP_STD, "bilinear", "Owlv2VisionModel"),
    "chinese_clip": _Family("chinese_clip", CLIP_MEAN, CLIP_STD, "bicubic", "ChineseCLIPModel"),
    "chinese_clip_vision_model": _Family("chinese_clip", CLIP_MEAN, CLIP_STD, "bicubic", "ChineseCLIPVisionModel"),
    "mlcd_vision_model": _Family("mlcd", CLIP_MEAN, CLIP_STD, "bicubic", "MLCDVisionModel", dynamic=True),
    "idefics3": _Family("idefics3", HALF, HALF, "lanczos", "Idefics3Model", dynamic=True),
    "idefics3_vision": _Family("idefics3", HALF, HALF, "lanczos", "Idefics3VisionTransformer", dynamic=True),
    "smolvlm": _Family("smolvlm", HALF, HALF, "lanczos", "SmolVLMModel", dynamic=True),
    "smolvlm_vision": _Family("smolvlm", HALF, HALF, "lanczos", "SmolVLMVisionTransformer", dynamic=True),
    "pixtral": _Family("pixtral", CLIP_MEAN, CLIP_STD, "bicubic", "PixtralVisionModel", dynamic=True),
    "dpt": _Family("dpt", HALF, HALF, "bicubic", "DPTModel", dynamic=True),
    "vitpose": _Family("vitpose", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "VitPoseForPoseEstimation"),
    "vitpose_backbone": _Family("vitpose", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "VitPoseBackbone"),
    "sam": _Family("sam", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "SamModel"),
    "sam_vision_model": _Family("sam", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "SamVisionModel"),
    "vitdet": _Family("vitdet", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "VitDetModel"),
    # video transformers (`_video_geometry`): pixels (B, T, C, H, W), tokens (T', rows, cols), fixed T and size
    "videomae": _Family("videomae", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "VideoMAEModel"),
    "vivit": _Family("vivit", HALF, HALF, "bilinear", "VivitModel"),
    "timesformer": _Family("timesformer", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "TimesformerModel"),
    "vjepa2": _Family("vjepa2", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "VJEPA2Model"),
}
#: Families whose attention is windowed (no global attention over every patch): refused with this reason.
#: SAM's image encoder and ViTDet are read: their global layers are capturable, their windowed ones refused per
#: layer (`ModelInfo.layer_kinds`).
WINDOWED = {
    "swin": "Swin", "swinv2": "Swin V2", "donut-swin": "Donut Swin", "hiera": "Hiera",
    "maskformer-swin": "MaskFormer Swin", "dinat": "DiNAT", "nat": "NAT",
}
_DINO = _Family("dino", IMAGENET_MEAN, IMAGENET_STD, "bicubic", "ViTModel")

# PIL's integer filter ids, as image processors store them.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
_CONFIG_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "subfolder")
_HUB_FIX = "run once with internet access, or save_pretrained(folder) on a machine that has it and pass 'hf:/path/to/folder'"


# ------------------------------------------------------------------------------------------- loading


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``/``, ``./``, ``~``, deeper paths) is a folder."""
    return (
        spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/")
        or (len(spec) > 1 and spec[1] == ":")
    )


def _hub_error(spec: str, exc: BaseException) -> CheckpointError:
    from huggingface_hub import constants

    reason = " ".join(str(exc).split())[:200]
    if constants.is_offline_mode():
        problem = f"cannot load {spec!r}: offline (HF_HUB_OFFLINE is set) and it is not in the local Hugging Face cache"
    else:
        problem = f"cannot download {spec!r} from the Hugging Face hub: offline or no such model ({reason})"
    return CheckpointError("model", problem, _HUB_FIX)


def _model_class(transformers: Any, config: Any, source: str) -> Any:
    """The class to instantiate: the checkpoint's own architecture (any transformers class: its vision
    transformer is found by structure afterwards), else the family's default, else ``AutoModel``."""
    model_type = getattr(config, "model_type", None)
    _refuse_windowed(str(model_type), source)
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(arch), None)
        cfg_cls = getattr(cls, "config_class", None)
        if cls is not None and getattr(cfg_cls, "model_type", None) == model_type:
            return cls
    family = FAMILIES.get(str(model_type))
    if family is not None:
        return getattr(transformers, family.default_class)
    return transformers.AutoModel


def _refuse_windowed(model_type: str, source: str) -> None:
    if model_type in WINDOWED:
        raise NotAViTError(
            "model", f"{source!r} is {WINDOWED[model_type]}: its attention is windowed (each token attends to a local "
            "window, not to every patch), so there is no global attention map to capture",
            "use a global-attention ViT (ViT, DeiT, DINOv2/v3, BEiT, CLIP, SigLIP, ...)",
        )


def _check_has_tower(cls: Any, config: Any) -> None:
    """Refuse, before any weight is read or downloaded, a model without a vision transformer (`_find_tower` on
    the class built on the meta device: no memory, no weights)."""
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)  # AutoModel: from_config
    except Exception:  # a class that cannot be built empty: from_pretrained's own errors decide
        return
    _find_tower(skeleton)


@contextmanager
def _quiet_local_load(transformers: Any, quiet: bool) -> Iterator[None]:
    """Hide transformers' "Loading weights" bar for local folders (downloads keep theirs); restore it after."""
    logging = transformers.utils.logging
    was_on = logging.is_progress_bar_enabled()
    if quiet and was_on:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            logging.enable_progress_bar()


def load_hf(id_or_folder: str, **kwargs: Any) -> VitModel:
    """Load a transformers ViT from a hub id (downloaded as ``from_pretrained`` does) or a local folder.

    Args:
        id_or_folder: ``"facebook/dinov2-small"`` or a folder written by ``model.save_pretrained(folder)``.
        **kwargs: passed to ``from_pretrained`` (``revision``, ``dtype``, ``cache_dir``, ``local_files_only``...).
            ``attn_implementation`` is left to transformers (SDPA when available): capture needs no eager mode.

    Raises:
        CheckpointError: the folder is missing/incomplete, or the hub id cannot be downloaded (offline, unknown).
        NotAViTError: the checkpoint is not one of the supported families.
    """
    transformers = import_optional("transformers", "'vitscope[hf]'")
    spec = str(id_or_folder).strip()
    if not spec:
        raise VitscopeError("model", "empty Hugging Face id", "e.g. 'hf:facebook/dinov2-small' or 'hf:/path/to/folder'")
    path = Path(spec).expanduser()
    folder: Path | None = None
    if path.exists():
        if not path.is_dir():
            raise CheckpointError("model", f"{path} is a file, not a model folder", "pass the folder save_pretrained wrote")
        if not (path / "config.json").exists():
            raise CheckpointError("model", f"folder {path} has no config.json", "pass a folder written by save_pretrained")
        folder = path
    elif _looks_like_path(spec):
        raise CheckpointError(
            "model", f"folder not found: {path}", "check the path to the save_pretrained folder, or pass a hub id like facebook/dinov2-small"
        )
    source = str(folder) if folder is not None else spec
    if folder is None and not kwargs.get("local_files_only"):
        from vitscope.adapters._hub import cached_file, offline_reason

        reason = offline_reason()
        if reason is not None:
            if cached_file(spec, "config.json", kwargs.get("cache_dir")) is None:
                raise CheckpointError(
                    "model", f"cannot download {spec!r}: offline ({reason}) and it is not in the local Hugging Face cache",
                    _HUB_FIX,
                )
            kwargs["local_files_only"] = True  # in the cache: load it without waiting for the hub's retries
    config_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **config_kwargs)
    except Exception as exc:  # a local file's fault whatever transformers raises (its field validation: TypeError)
        if folder is None and not isinstance(exc, (OSError, ValueError)):
            raise
        if folder is not None:
            raise CheckpointError(
                "model", f"cannot read {folder / 'config.json'}: {' '.join(str(exc).split())[:200]}",
                "pass a folder written by save_pretrained",
            ) from None
        raise _hub_error(spec, exc) from None
    cls = _model_class(transformers, config, spec)
    _check_config(config, folder / "config.json" if folder is not None else spec)
    _check_has_tower(cls, config)
    if folder is not None and "use_safetensors" not in kwargs and any(folder.glob("*.safetensors")):
        kwargs["use_safetensors"] = True  # never unpickle a .bin when safetensors weights are there
    import pickle

    from safetensors import SafetensorError

    from vitscope.adapters.checkpoint import _REFUSED_FIX, _refused_reason, quiet_unpickler, unpickle_detail

    held = _HeldReport()
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(held)
    try:
        with _quiet_local_load(transformers, folder is not None), quiet_unpickler():
            model = cls.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError as exc:  # transformers reads .bin with weights_only=True: refused, never run
        where = next((str(f) for f in sorted((folder or Path(".")).glob("*.bin"))), source) if folder else source
        reason = _refused_reason(exc)
        if reason is None:
            raise CheckpointError("model", f"{where} is not a readable PyTorch checkpoint ({unpickle_detail(exc)})",
                                  "save the model with save_pretrained (model.safetensors)") from None
        raise CheckpointError("model", f"refused to load {where}: unpickling it could run code ({reason})",
                              _REFUSED_FIX) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # missing, corrupt or mismatched weights
        if folder is not None:
            raise CheckpointError(
                "model", f"cannot load weights from {folder}: {held.mismatch() or _first_line(exc)}",
                "save the model with save_pretrained (model.safetensors)",
            ) from None
        raise _hub_error(spec, exc) from None
    except Exception as exc:  # any other failure on a local folder's files: the files' fault, said in one line
        if folder is None:
            raise
        raise CheckpointError(
            "model", f"cannot load weights from {folder} ({type(exc).__name__}: {_first_line(exc)})",
            "save the model with save_pretrained (model.safetensors)",
        ) from None
    finally:
        report_logger.removeFilter(held)
    for record in held.records:  # loaded: transformers' report (missing or unused weights) is worth seeing
        report_logger.handle(record)
    model.eval()
    return from_hf_model(model, name=spec, folder=folder)


class _HeldReport(logging.Filter):
    """Holds back transformers' multi-line "LOAD REPORT" warning while a model loads: shown after a successful
    load, summarised in the one-line error (its first size mismatch) when the load fails."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def mismatch(self) -> str | None:
        for record in self.records:
            for line in record.getMessage().splitlines():
                if "MISMATCH" in line and "|" in line:
                    return " ".join(line.replace("|", " ").split())[:200]
        return None


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


#: config sizes checked before a model is built from them (vision config names of the supported families)
_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "num_channels", "num_register_tokens", "num_labels")


def _check_config(config: Any, where: object) -> None:
    """The (vision) config's sizes are integers in range and the model they describe has at most
    `MAX_MODEL_BYTES` of parameters, before transformers allocates it (``hidden_size: 10**9`` in a 1 KB
    config.json would otherwise be a terabyte model)."""
    from vitscope.models.vit import MAX_DEPTH, MAX_MODEL_BYTES, MAX_MODEL_DIM, check_int

    vcfg = getattr(config, "vision_config", None) or config
    sizes: dict[str, int] = {}
    try:
        for name in _SIZE_FIELDS:
            value = getattr(vcfg, name, None)
            if name == "num_labels":
                value = getattr(config, name, None)
            if value is None:
                continue
            if name in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
                sides = [check_int(name, v, 1) for v in value]
                sizes[name] = max(sides) if name == "patch_size" else sides[0] * sides[-1]
                continue
            low = 0 if name in ("num_register_tokens", "num_labels") else 1
            n = check_int(name, value, low, MAX_DEPTH if name == "num_hidden_layers" else MAX_MODEL_DIM)
            sizes[name] = n * n if name == "image_size" else n
        d, heads = sizes.get("hidden_size", 1), sizes.get("num_attention_heads", 1)
        if heads > d:
            raise VitscopeError("num_attention_heads", f"{heads} heads for hidden_size {d}")
        layers, mlp = sizes.get("num_hidden_layers", 1), sizes.get("intermediate_size", 4 * d)
        tokens = sizes.get("image_size", 1) // max(1, sizes.get("patch_size", 1) ** 2) + 1
        params = layers * (4 * d * d + 2 * d * mlp) + tokens * d + sizes.get("num_labels", 0) * d
        if 4 * params > MAX_MODEL_BYTES:
            raise VitscopeError("hidden_size", f"the model it describes has {4 * params / 1e9:.3g} GB of parameters, "
                                f"more than vitscope builds ({MAX_MODEL_BYTES / 1e9:g} GB)")
    except VitscopeError as exc:
        raise CheckpointError("model", f"{where}: {exc.argument} {exc.problem}",
                              "pass a folder written by save_pretrained") from None


# ------------------------------------------------------------------------------------------- description
def _is_patch_embedding(name: str, m: nn.Module, root: nn.Module | None = None) -> bool:
    """A patch embedding: a strided convolution whose kernel is its stride (``Conv2d(3, D, p, stride=p)``), a
    Linear named as one (SigLIP2's NaFlex patches arrive flattened), or a hybrid's projection (a convolution
    beside a CNN ``backbone`` in the same embeddings module: DPT-hybrid's 1x1 ``projection`` after BiT)."""
    if isinstance(m, nn.Conv3d):  # a video's tubelet embedding (VideoMAE, ViViT, V-JEPA 2)
        return tuple(m.kernel_size) == tuple(m.stride) and max(m.kernel_size[1:]) > 1
    if isinstance(m, nn.Conv2d):
        if tuple(m.kernel_size) == tuple(m.stride) and max(m.kernel_size) > 1:
            return True
        parent = root.get_submodule(name.rsplit(".", 1)[0]) if root is not None and "." in name else None
        return tuple(m.kernel_size) == tuple(m.stride) and isinstance(getattr(parent, "backbone", None), nn.Module)
    return isinstance(m, nn.Linear) and "patch" in name.rsplit(".", 1)[-1]


def _find_tower(module: nn.Module) -> str:
    """Where the vision transformer sits in ``module``: the path of the smallest sub-module (``""`` for the
    module itself) holding a patch embedding and the attention modules after it.

    Found by structure, not by class: for each patch embedding, the nearest enclosing module that also holds
    attention modules (`_is_attention`) is a candidate; a candidate enclosing another is dropped (SAM's prompt
    encoder sits beside its image encoder; DPT's neck beside its ViT), and of the rest the one with the most
    attention layers wins. CLIP/SigLIP/BLIP/OWL-ViT/ChineseCLIP composites give ``vision_model``, VLMs
    ``model.vision_model`` / ``vision_tower``, DPT ``dpt``, VitPose ``backbone``.
    """
    names = [n for n, m in module.named_modules() if _is_attention(m)]
    found: dict[str, int] = {}
    for pname, m in module.named_modules():
        if not pname or not _is_patch_embedding(pname, m, module):
            continue
        parts = pname.split(".")
        for i in range(len(parts) - 1, -1, -1):
            anc = ".".join(parts[:i])
            inside = sum(1 for n in names if not anc or n.startswith(anc + "."))
            if inside:
                found[anc] = inside
                break
    minimal = [c for c in found if not any(o != c and (not c or o.startswith(c + ".")) for o in found)]
    if not minimal:
        raise NotAViTError(
            "model", f"{type(module).__name__} ({str(getattr(getattr(module, 'config', None), 'model_type', ''))!r}) has "
            "no vision transformer vitscope can find (a patch embedding followed by layers whose attention owns q/k/v "
            "projections)",
            "describe it with vitscope.wrap(model, blocks=..., num_heads=..., patch_size=...)",
        )
    return max(minimal, key=lambda c: (found[c], c.count(".")))


def _tower(module: nn.Module) -> nn.Module:
    """The module holding the vision embeddings and encoder (`_find_tower`)."""
    path = _find_tower(module)
    return module.get_submodule(path) if path else module


def _runs_tower(module: nn.Module, path: str) -> bool:
    """Whether the forward pass runs the tower alone: the model needs more than pixels (text, prompts, sizes)."""
    import inspect

    if not path:
        return False
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    if "pixel_values" not in params or "input_ids" in params:
        return True
    required = [p for p in params.values() if p.name != "pixel_values" and p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return bool(required)


def _vision_config(module: nn.Module, tower: nn.Module | None = None) -> Any:
    """The config describing the vision transformer: the tower's own, else the model's vision/backbone config."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        raise NotAViTError("model", f"{type(module).__name__} has no config", "pass a transformers PreTrainedModel")
    own = getattr(tower, "config", None) if tower is not None else None
    if own is not None and hasattr(own, "hidden_size"):
        return own
    for key in ("vision_config", "backbone_config"):
        sub = getattr(cfg, key, None)
        if sub is not None and hasattr(sub, "hidden_size"):
            return sub
    return cfg


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (list, tuple)):
        return (int(x[0]), int(x[1]))
    return (int(x), int(x))


def _linear(m: nn.Module, name: str) -> nn.Linear | None:
    sub = getattr(m, name, None)
    return sub if isinstance(sub, nn.Linear) else None


def _is_attention(m: nn.Module) -> bool:
    """An attention module: it owns separate q/k/v Linears (``q_proj``... or ``query``... in older layouts), or
    one fused ``qkv`` Linear (BLIP, BLIP-2)."""
    return _linear(m, "qkv") is not None or any(
        all(_linear(m, n) is not None for n in names) for names in (("q_proj", "k_proj", "v_proj"),
                                                                    ("query", "key", "value"))
    )


def _block_of(name: str, root: nn.Module) -> nn.Module:
    """The transformer block containing attention module ``name``: the path up to its last numeric component."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return root.get_submodule(".".join(parts[: i + 1]))
    return root.get_submodule(name)


def _heads_of(m: nn.Module, vcfg: Any) -> int:
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        value = getattr(m, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(vcfg.num_attention_heads)


def _sites(tower: nn.Module, vcfg: Any) -> list[AttentionSite]:
    """One site per encoder attention module, in depth order (pooling heads after the encoder are not layers)."""
    sites: list[AttentionSite] = []
    for name, m in tower.named_modules():
        if not _is_attention(m) or name.split(".", 1)[0] == "head":
            continue
        sites.append(AttentionSite(layer=len(sites), block=_block_of(name, tower), attn=m, num_heads=_heads_of(m, vcfg)))
    return sites


def _patch_size(tower: nn.Module, vcfg: Any) -> tuple[int, int]:
    """The patch size: the patch embedding's own kernel (a strided conv), else the config's ``patch_size``; a
    hybrid's (a CNN backbone, then a projection) is measured: its embeddings run on a blank image of the model's
    size, the projection's output grid read, cross-checked against the config."""
    found = [(n, m) for n, m in tower.named_modules()
             if n and isinstance(m, (nn.Conv2d, nn.Conv3d)) and _is_patch_embedding(n, m, tower)]
    if not found:
        return _pair(vcfg.patch_size)
    name, conv = found[0]
    if isinstance(conv, nn.Conv3d):
        _, kh, kw = conv.kernel_size  # (tubelet, height, width)
        return (int(kh), int(kw))
    owner = tower.get_submodule(name.rsplit(".", 1)[0]) if "." in name else tower
    if not isinstance(getattr(owner, "backbone", None), nn.Module):
        kh, kw = conv.kernel_size
        return (int(kh), int(kw))
    return _measured_hybrid_patch(owner, conv, vcfg)


def _measured_hybrid_patch(embeddings: nn.Module, conv: nn.Conv2d, vcfg: Any) -> tuple[int, int]:
    from vitscope._hooks import eval_mode

    H, W = _pair(getattr(vcfg, "image_size", 224))
    grids: list[tuple[int, int]] = []
    handle = conv.register_forward_hook(lambda _m, _i, out: grids.append((int(out.shape[-2]), int(out.shape[-1]))))
    param = next(embeddings.parameters(), None)
    try:
        with torch.no_grad(), eval_mode(embeddings):
            blank = torch.zeros(1, int(getattr(vcfg, "num_channels", 3)), H, W,
                                device=param.device if param is not None else None,
                                dtype=param.dtype if param is not None else None)
            embeddings(blank)
    except Exception:  # embeddings that need more than pixels: the config's patch size
        return _pair(vcfg.patch_size)
    finally:
        handle.remove()
    if not grids or H % grids[0][0] or W % grids[0][1]:
        return _pair(vcfg.patch_size)
    return (H // grids[0][0], W // grids[0][1])


def _prefix(tower: nn.Module, vcfg: Any) -> tuple[str, ...]:
    """Prefix token kinds in token order, from the embedding module's own parameters."""
    embed_attrs = ("cls_token", "class_embedding", "position_embedding", "position_embeddings", "patch_embed",
                   "patch_embeddings", "patch_embedding", "patch_conv")
    for name, m in tower.named_modules():
        if name.split(".", 1)[0] == "head":  # a pooling head's own query (AIMv2's cls_token) is not a token
            continue
        if not any(hasattr(m, a) for a in embed_attrs):
            continue
        prefix: list[str] = []
        if isinstance(getattr(m, "cls_token", None), torch.Tensor) or isinstance(
            getattr(m, "class_embedding", None), torch.Tensor
        ):
            prefix.append("cls")
        if isinstance(getattr(m, "distillation_token", None), torch.Tensor):
            prefix.append("dist")
        registers = getattr(m, "register_tokens", None)
        if isinstance(registers, torch.Tensor):
            prefix += ["register"] * int(registers.shape[1])  # (1, R, D)
        expected = getattr(vcfg, "num_register_tokens", None)
        if expected is not None and prefix.count("register") != int(expected):
            raise NotAViTError(
                "model", f"config says {expected} register tokens, the embeddings hold {prefix.count('register')}"
            )
        return tuple(prefix)
    raise NotAViTError("model", f"{type(tower).__name__} has no patch embedding module vitscope recognises")


def _suffix(tower: nn.Module) -> tuple[str, ...]:
    """Kinds of the tokens after the patches: YOLOS's detection tokens ``(1, K, D)``, else none."""
    for m in tower.modules():
        det = getattr(m, "detection_tokens", None)
        if isinstance(det, torch.Tensor):
            return ("det",) * int(det.shape[1])
    return ()


def _read_processor_config(folder: Path | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    pre = folder / "preprocessor_config.json"
    try:
        if pre.exists():
            data = json.loads(pre.read_text())
            return data if isinstance(data, dict) else None
        proc = folder / "processor_config.json"
        if proc.exists():
            data = json.loads(proc.read_text())
            sub = data.get("image_processor") if isinstance(data, dict) else None
            return sub if isinstance(sub, dict) else None
    except (OSError, ValueError, RecursionError) as exc:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise CheckpointError("model", f"cannot read the preprocessor config in {folder}: {_first_line(exc)}",
                              "fix or delete preprocessor_config.json") from None
    return None


def _size_from(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value:
            return (int(value["shortest_edge"]), int(value["shortest_edge"]))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    return None


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3  # type: ignore[return-value]
    if isinstance(value, (list, tuple)) and len(value) in (1, 3):
        vals = [float(x) for x in value] * (3 // len(value))
        return (vals[0], vals[1], vals[2])
    return default


def _preprocess(family: _Family, vcfg: Any, patch: tuple[int, int], folder: Path | None, dynamic: bool) -> Preprocess:
    max_patches = None
    if family.name == "siglip2":
        side = round(int(vcfg.num_patches) ** 0.5)
        size = (side * patch[0], side * patch[1])
        max_patches = int(vcfg.num_patches)  # NaFlex: each image at its own aspect ratio within this budget
    else:
        size = _pair(vcfg.image_size if hasattr(vcfg, "image_size") else vcfg.crop_size)  # (V-JEPA 2: crop_size)
    mean, std, resample = family.mean, family.std, family.resample
    proc = _read_processor_config(folder)
    if proc is not None:
        import math

        from vitscope.models.vit import check_int

        try:
            if proc.get("do_normalize", True):
                mean, std = _triple(proc.get("image_mean"), mean), _triple(proc.get("image_std"), std)
            else:
                mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
                raise ValueError(f"image_mean {mean} / image_std {std} must be finite, the std positive")
            crop = _size_from(proc.get("crop_size")) if proc.get("do_center_crop") else None
            size = crop or _size_from(proc.get("size")) or size
            size = (check_int("size", size[0], 1), check_int("size", size[1], 1))
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise CheckpointError("model", f"{folder}: preprocessor config: {_first_line(exc)}",
                                  "fix or delete preprocessor_config.json") from None
        r = proc.get("resample")
        if isinstance(r, int):
            resample = _PIL_RESAMPLE.get(r, resample)
        elif isinstance(r, str) and r.lower() in ("nearest", "bilinear", "bicubic", "lanczos"):
            resample = r.lower()
    return Preprocess(
        image_size=size, mean=mean, std=std, policy="native" if max_patches else "resize", resample=resample,
        dynamic_size=dynamic, channels=int(getattr(vcfg, "num_channels", getattr(vcfg, "in_chans", 3))),
        max_patches=max_patches,
    )


def _accepts(fn: Callable[..., Any], arg: str) -> bool:
    import inspect

    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def siglip2_inputs(pixel_values: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """SigLIP2 (NaFlex) inputs from pixels ``(B, C, H, W)``: patches ``(B, rows*cols, p*p*C)`` in the image
    processor's order (row-major patches, each flattened as ``(p, p, C)``), ``spatial_shapes`` ``(B, 2)`` and an
    all-ones ``pixel_attention_mask`` ``(B, rows*cols)``."""
    B, C, H, W = pixel_values.shape
    rows, cols = H // patch, W // patch
    x = pixel_values[:, :, : rows * patch, : cols * patch]
    x = x.reshape(B, C, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, p, p, C)
    patches = x.reshape(B, rows * cols, patch * patch * C)
    shapes = torch.tensor([[rows, cols]] * B, dtype=torch.long, device=pixel_values.device)
    mask = torch.ones(B, rows * cols, dtype=torch.int32, device=pixel_values.device)
    return {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": mask}


def siglip2_padded_inputs(pixels: Sequence[torch.Tensor], patch: int) -> dict[str, torch.Tensor]:
    """SigLIP2 inputs for images of different sizes in one padded batch, as its image processor builds them:
    each image ``(C, H_b, W_b)`` patchified on its own grid (`siglip2_inputs`), zero patches appended up to the
    longest image's count ``L``; ``spatial_shapes`` ``(B, 2)`` holds each grid, ``pixel_attention_mask``
    ``(B, L)`` is 1 on an image's patches and 0 on its padding."""
    one = [siglip2_inputs(p.unsqueeze(0), patch) for p in pixels]
    L = max(int(x["pixel_values"].shape[1]) for x in one)
    patches = torch.zeros(len(one), L, int(one[0]["pixel_values"].shape[2]), dtype=pixels[0].dtype,
                          device=pixels[0].device)  # (B, L, p*p*C)
    mask = torch.zeros(len(one), L, dtype=torch.int32, device=pixels[0].device)  # (B, L)
    for b, x in enumerate(one):
        n = int(x["pixel_values"].shape[1])
        patches[b, :n] = x["pixel_values"][0]
        mask[b, :n] = 1
    shapes = torch.cat([x["spatial_shapes"] for x in one])  # (B, 2): (rows, cols) per image
    return {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": mask}


def _make_forward(module: nn.Module, family: _Family, patch: tuple[int, int], path: str, vcfg: Any) -> tuple[
    Callable[[nn.Module, torch.Tensor], Any], bool
]:
    """The forward callable (built from the pixels alone) and whether it accepts any input size.

    ``path`` is where the vision transformer sits (`_find_tower`); it runs alone when the whole model needs
    more than pixels (`_runs_tower`: CLIP/SigLIP/BLIP text, OWL-ViT queries, a VLM's prompt).
    """
    runs_tower = _runs_tower(module, path)
    target = module.get_submodule(path) if runs_tower else module

    def run(m: nn.Module) -> nn.Module:
        return m.get_submodule(path) if runs_tower else m

    if family.name == "siglip2":

        def forward_siglip2(m: nn.Module, pixels: torch.Tensor) -> Any:
            return run(m)(**siglip2_inputs(pixels, patch[0]))

        return forward_siglip2, True
    if family.name == "vit_mae":

        def forward_mae(m: nn.Module, pixels: torch.Tensor) -> Any:
            return _mae_unmasked(run(m), pixels, patch)

        return forward_mae, True
    if _accepts(target.forward, "interpolate_pos_encoding"):

        def forward_interp(m: nn.Module, pixels: torch.Tensor) -> Any:
            return run(m)(pixel_values=pixels, interpolate_pos_encoding=True)

        return forward_interp, True

    def forward_plain(m: nn.Module, pixels: torch.Tensor) -> Any:
        return run(m)(pixel_values=pixels)

    # DINOv2 interpolates its position embeddings itself, DINOv3 uses RoPE, AIMv2 "native" sin-cos embeddings
    dynamic = family.dynamic or family.name in ("dinov2", "dinov3") or (
        family.name == "aimv2" and bool(getattr(vcfg, "is_native", False)))
    return forward_plain, dynamic


def _checked_forward(forward: Callable[[nn.Module, torch.Tensor], Any], family: _Family, prep: Preprocess, name: str,
                     max_batch: int | None = None) -> Callable[[nn.Module, torch.Tensor], Any]:
    """``forward`` refusing, in one line, the inputs the model cannot take: another size than the one its learned
    position table was built for (CLIPForImageClassification, AIMv2 with learned positions), more images than
    ``max_batch`` (`VitModel.max_batch`; Pixtral: 1, it packs a batch into one sequence)."""

    def checked(m: nn.Module, pixels: torch.Tensor) -> Any:
        B, (H, W) = int(pixels.shape[0]), pixels.shape[-2:]  # (B, C, H, W), a video's (B, T, C, H, W)
        if not prep.dynamic_size and prep.image_size != (H, W):
            h, w = prep.image_size
            raise VitscopeError(
                "size", f"{name} takes {h}x{w} inputs only (its learned position table is fixed and it cannot "
                f"interpolate it), got {H}x{W}", f"resize the images to {h}x{w} (size=({h}, {w}), --size {h} {w})",
            )
        if max_batch is not None and max_batch < B:
            why = " (Pixtral packs a batch into one sequence)" if family.name == "pixtral" else ""
            raise VitscopeError(
                "images", f"{name} takes at most {max_batch} image{'s' if max_batch > 1 else ''} per forward pass"
                f"{why}, got {B}", f"capture at most {max_batch} at a time (vitscope batch splits its batches itself)",
            )
        if prep.image_size == (H, W):
            return forward(m, pixels)
        try:
            return forward(m, pixels)
        except (RuntimeError, ValueError) as exc:  # vitscope's own errors are VitscopeErrors, not these
            if isinstance(exc, VitscopeError):
                raise
            h, w = prep.image_size  # e.g. DPT's depth neck folds the tokens back into a square grid
            raise VitscopeError(
                "size", f"{name} fails on {H}x{W} inputs ({type(exc).__name__}: {_first_line(exc)[:120]})",
                f"resize the images to its own size {h}x{w} (size=({h}, {w}), --size {h} {w})",
            ) from None

    return checked


def _mae_unmasked(model: nn.Module, pixels: torch.Tensor, patch: tuple[int, int]) -> Any:
    """ViTMAE without its random masking: ``mask_ratio = 0`` and increasing noise keep every patch in order.

    ViTMAE drops 75% of the patches in a random order on every call (``random_masking``), which would give a
    different map each time; vitscope runs it on all patches in their original order (deterministic), with the
    config's ``mask_ratio`` restored afterwards.
    """
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "mask_ratio", None)
    B, _, H, W = pixels.shape
    n = (H // patch[0]) * (W // patch[1])
    noise = torch.arange(n, dtype=torch.float32, device=pixels.device).expand(B, n)  # argsort = identity
    try:
        if cfg is not None:
            cfg.mask_ratio = 0.0
        return model(pixel_values=pixels, noise=noise, interpolate_pos_encoding=True)
    finally:
        if cfg is not None:
            cfg.mask_ratio = old


def _has_classifier(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, a, None), nn.Module) for a in ("classifier", "cls_classifier"))


def _logits(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor) and output.dim() == 2:  # a read-out's logits (`_readout`, LeGrad)
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def _no_logits(output: Any) -> torch.Tensor | None:
    return None


def _readout(module: nn.Module, num_prefix: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The classifier's own computation after the encoder, on block-output tokens ``(B, N, D)``.

    ViT / DeiT: ``classifier(layernorm(x)[:, 0])``; DeiT with teacher: the mean of the [CLS] and distillation
    heads; DINOv2 (+registers): ``classifier([cls, mean(patch tokens)])`` after the layernorm.
    """
    backbone = next((getattr(module, a) for a in ("vit", "deit", "dinov2", "dinov2_with_registers")
                     if isinstance(getattr(module, a, None), nn.Module)), None)
    norm = getattr(backbone, "layernorm", None)
    if not isinstance(norm, nn.Module):
        return None
    cls_head, dist_head = getattr(module, "cls_classifier", None), getattr(module, "distillation_classifier", None)
    if isinstance(cls_head, nn.Module) and isinstance(dist_head, nn.Module):
        return lambda x: (cls_head(norm(x)[:, 0]) + dist_head(norm(x)[:, 1])) / 2
    head = getattr(module, "classifier", None)
    if not isinstance(head, nn.Module):
        return None
    if backbone is getattr(module, "dinov2", None) or backbone is getattr(module, "dinov2_with_registers", None):

        def dinov2_head(x: torch.Tensor) -> torch.Tensor:
            y = norm(x)
            return head(torch.cat([y[:, 0], y[:, num_prefix:].mean(dim=1)], dim=1))

        return dinov2_head
    return lambda x: head(norm(x)[:, 0])


def _family_of(module: nn.Module, vcfg: Any) -> _Family:
    """The family (preprocessing defaults and naming) from the vision config's ``model_type``, else the model's;
    a model type vitscope has no table entry for gets neutral defaults (its preprocessor config wins anyway)."""
    cfg = getattr(module, "config", None)
    for model_type in (getattr(vcfg, "model_type", None), getattr(cfg, "model_type", None)):
        family = FAMILIES.get(str(model_type))
        if family is not None:
            return family
    name = str(getattr(vcfg, "model_type", None) or getattr(cfg, "model_type", None) or type(module).__name__)
    return _Family(name.removesuffix("_vision_model"), HALF, HALF, "bicubic", type(module).__name__)


def from_hf_model(module: nn.Module, name: str | None = None, folder: str | os.PathLike[str] | None = None) -> VitModel:
    """Describe a transformers model by its vision transformer, wherever it sits.

    Any transformers model (or sub-module) whose vision transformer can be found (`_find_tower`: a patch
    embedding and the layers after it whose attention owns q/k/v projections) is read: the families in the
    module docstring, composites (CLIP, SigLIP, BLIP/BLIP-2, OWL-ViT/OWLv2, ChineseCLIP), VLM towers
    (Idefics3/SmolVLM, Pixtral), MLCD, DPT and VitPose. Only preprocessing defaults and names are per family.

    Args:
        module: a loaded transformers model; it is used as is (attention implementation, dtype, device).
        name: display name; default the config's ``_name_or_path`` or the class name.
        folder: where to read ``preprocessor_config.json``; default ``config._name_or_path`` when it is a folder.
    """
    cfg = getattr(module, "config", None)
    if cfg is None:
        raise NotAViTError("model", f"{type(module).__name__} has no config", "pass a transformers PreTrainedModel")
    for model_type in (getattr(getattr(cfg, "vision_config", None), "model_type", None), cfg.model_type):
        _refuse_windowed(str(model_type), type(module).__name__)
    path = _find_tower(module)
    tower = module.get_submodule(path) if path else module
    vcfg = _vision_config(module, tower)
    family = _family_of(module, vcfg)
    source = str(getattr(cfg, "_name_or_path", "") or "")
    if family.name == "vit" and "dino" in (name or source).lower():
        family = _DINO
    if folder is None and source and Path(source).is_dir():
        folder = source
    sites = _sites(tower, vcfg)
    video = _video_geometry(tower, vcfg, type(module).__name__)  # (frames, tubelet) of a video model, else None
    if video is not None:  # TimeSformer's divided blocks: a temporal and a spatial attention; the spatial one named
        sites = [s for s in sites if "temporal_attention" not in _site_name(tower, s)]
        sites = [replace(s, layer=i) for i, s in enumerate(sites)]
    num_layers = getattr(vcfg, "num_hidden_layers", None)
    if num_layers is not None and len(sites) != int(num_layers):
        raise NotAViTError(
            "model", f"found {len(sites)} attention layers in {type(module).__name__}, config says {num_layers}",
            "describe it with vitscope.wrap(model, blocks=..., q=..., k=..., num_heads=..., patch_size=...)",
        )
    patch = _patch_size(tower, vcfg)
    if video is not None:
        forward, dynamic = _video_forward(module, path), False  # fixed frames and size (their position tables)
    else:
        forward, dynamic = _make_forward(module, family, patch, path, vcfg)
    classifier = _has_classifier(module)
    labels = None
    num_classes = None
    if classifier:
        num_classes = int(getattr(cfg, "num_labels", 0)) or None
        id2label = getattr(cfg, "id2label", None) or {}
        by_id = {int(k): str(v) for k, v in id2label.items()}
        if num_classes and all(i in by_id for i in range(num_classes)):
            labels = tuple(by_id[i] for i in range(num_classes))
    prep = _preprocess(family, vcfg, patch, Path(folder) if folder is not None else None, dynamic)
    display = name or source or type(module).__name__
    kinds = tuple("windowed" if window_of(site.block) > 0 else "global" for site in sites)
    if video is not None and str(getattr(vcfg, "attention_type", "")) == "divided_space_time":
        kinds = ("factorised",) * len(sites)  # TimeSformer: a temporal then a spatial attention per block
    if "global" not in kinds and "factorised" not in kinds:
        raise NotAViTError("model", f"every layer of {display} attends within local windows: no layer has a global "
                           "attention map", "use a global-attention ViT")
    info = ModelInfo(
        layer_kinds=kinds if "windowed" in kinds or "factorised" in kinds else (),
        frames=video[0] if video else 0, tubelet=video[1] if video else 1,
        name=display, family=family.name, num_layers=len(sites),
        num_heads=sites[0].num_heads, embed_dim=int(getattr(vcfg, "hidden_size", 0) or 0), patch_size=patch,
        prefix=_prefix(tower, vcfg), suffix=_suffix(tower), preprocess=prep, num_classes=num_classes, labels=labels,
    )
    max_batch = 1 if family.name == "pixtral" else None
    return VitModel(
        module, info, sites, forward=_checked_forward(forward, family, prep, display, max_batch),
        logits=_logits if classifier else _no_logits,
        readout=(_readout(module, info.num_prefix_tokens) if video is None else _video_readout(module))
        if classifier else None,
        max_batch=max_batch,
        embed=_embed(module, tower, info.prefix), final_norm=_final_norm(tower),
        text=_text_tower(module, family, Path(folder) if folder is not None else None),
        padded=_padded_route(module, path, patch) if family.name == "siglip2" else None,
    )


# ------------------------------------------------------------------------------------------- video
def _video_geometry(tower: nn.Module, vcfg: Any, name: str) -> tuple[int, int] | None:
    """``(frames, tubelet)`` of a video transformer (its config's ``num_frames`` / V-JEPA 2's ``frames_per_clip``;
    the tubelet is the depth of a Conv3d patch embedding, 1 for a Conv2d one run per frame: TimeSformer), else
    ``None``. A Conv3d patch embedding without a frame count is refused in one line."""
    frames = getattr(vcfg, "num_frames", None) or getattr(vcfg, "frames_per_clip", None)
    conv3d = [m for n, m in tower.named_modules() if isinstance(m, nn.Conv3d) and _is_patch_embedding(n, m, tower)]
    if not frames:
        if conv3d:
            raise NotAViTError("model", f"{name} embeds tubelets (a 3-d patch embedding) but its config gives no "
                               "frame count (num_frames)", "describe it with vitscope.wrap(...)")
        return None
    tubelet = int(conv3d[0].kernel_size[0]) if conv3d else 1
    if int(frames) % tubelet:
        raise NotAViTError("model", f"{name} takes {frames} frames, not a multiple of its tubelet of {tubelet}",
                           "set num_frames to a multiple of the tubelet size")
    return int(frames), tubelet


def _video_readout(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A video classifier's own head on block-output tokens ``(B, N, D)``: ViViT ``classifier(layernorm(x)[:, 0])``;
    VideoMAE with mean pooling ``classifier(fc_norm(mean_i x[:, i]))``, else ``classifier(layernorm(x)[:, 0])``;
    ``None`` for the others (V-JEPA 2's attentive pooler, TimeSformer)."""
    head = getattr(module, "classifier", None)
    if not isinstance(head, nn.Module):
        return None
    vivit, videomae = getattr(module, "vivit", None), getattr(module, "videomae", None)
    vivit_norm = getattr(vivit, "layernorm", None)
    if isinstance(vivit_norm, nn.Module):
        return lambda x: head(vivit_norm(x)[:, 0])
    if isinstance(videomae, nn.Module):
        fc_norm, mae_norm = getattr(module, "fc_norm", None), getattr(videomae, "layernorm", None)
        if isinstance(fc_norm, nn.Module):
            return lambda x: head(fc_norm(x.mean(dim=1)))
        if isinstance(mae_norm, nn.Module):
            return lambda x: head(mae_norm(x)[:, 0])
    return None


def _site_name(tower: nn.Module, site: AttentionSite) -> str:
    return next((n for n, m in tower.named_modules() if m is site.attn), "")


def _video_forward(module: nn.Module, path: str) -> Callable[[nn.Module, torch.Tensor], Any]:
    """The forward pass on pixels ``(B, T, C, H, W)``: the model's own keyword (``pixel_values``, V-JEPA 2's
    ``pixel_values_videos``); the tower alone when the model wants more (`_runs_tower`; V-JEPA 2's predictor
    and its masks are not the encoder's attention)."""
    whole = _has_classifier(module) and any(_accepts(module.forward, k) for k in ("pixel_values", "pixel_values_videos"))
    runs_tower = not whole and (_runs_tower(module, path) or (bool(path) and hasattr(module, "predictor")))
    target = module.get_submodule(path) if runs_tower else module
    key = "pixel_values_videos" if _accepts(target.forward, "pixel_values_videos") else "pixel_values"

    def forward_video(m: nn.Module, pixels: torch.Tensor) -> Any:
        return (m.get_submodule(path) if runs_tower else m)(**{key: pixels})

    return forward_video

def _final_norm(tower: nn.Module) -> nn.Module | None:
    """The vision transformer's last norm (applied to every token): ``post_layernorm`` (CLIP, SigLIP) or
    ``layernorm`` (ViT, DeiT, DINOv2)."""
    for name in ("post_layernorm", "layernorm"):
        norm = getattr(tower, name, None)
        if isinstance(norm, nn.Module):
            return norm
    return None


def _embed(module: nn.Module, tower: nn.Module, prefix: tuple[str, ...]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The model's image embedding from the last block's tokens ``(B, N, D)``, as the model computes it:
    SigLIP ``head(post_layernorm(x))``; CLIP ``post_layernorm(x[:, 0])`` then ``visual_projection`` where the
    model has one; ViT/DINOv2 ``layernorm(x)[:, 0]`` (their ``pooler_output``/[CLS] feature)."""
    post, head = getattr(tower, "post_layernorm", None), getattr(tower, "head", None)
    proj = getattr(module, "visual_projection", None)
    if isinstance(post, nn.Module) and isinstance(head, nn.Module) and getattr(tower, "use_head", True):
        return lambda x: head(post(x))  # type: ignore[no-any-return]
    if isinstance(post, nn.Module):
        if isinstance(proj, nn.Module):
            return lambda x: proj(post(x[:, 0]))  # type: ignore[no-any-return]
        return lambda x: post(x[:, 0])  # type: ignore[no-any-return]
    norm = getattr(tower, "layernorm", None)
    if isinstance(norm, nn.Module) and prefix[:1] == ("cls",):
        return lambda x: norm(x)[:, 0]  # type: ignore[no-any-return]
    return None


#: files save_pretrained writes for a tokenizer (one is enough)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def _text_tower(module: nn.Module, family: _Family, folder: Path | None) -> TextTower | None:
    """The text side of a transformers dual encoder (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``): the
    tokenizer saved in the model's folder (read at the first prompt, offline), ``get_text_features`` and the
    model's logit scale (and SigLIP's bias)."""
    if not callable(getattr(module, "get_text_features", None)) or getattr(module, "logit_scale", None) is None:
        return None
    tokenizer: list[Any] = []

    def tokenize(prompts: Any) -> Any:
        if not tokenizer:
            from transformers import AutoTokenizer

            if folder is None:
                raise VitscopeError("target", f"{type(module).__name__} was given without its folder, so its "
                                    "tokenizer is unknown", "load it from its folder (hf:<folder>), with the "
                                    "tokenizer saved there by save_pretrained")
            if not any((folder / f).exists() for f in _TOKENIZER_FILES):  # transformers would build an
                raise VitscopeError("target", f"no tokenizer in {folder}",  # empty vocabulary: every word unknown
                                    "save the processor (or tokenizer) into the model's folder with save_pretrained")
            try:
                tokenizer.append(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
            except Exception as exc:
                raise VitscopeError("target", f"no tokenizer in {folder} ({type(exc).__name__})",
                                    "save the processor (or tokenizer) into the model's folder with "
                                    "save_pretrained") from None
        siglip = family.name in ("siglip", "siglip2")  # trained on max_length padding (64 tokens)
        return dict(tokenizer[0](list(prompts), return_tensors="pt", truncation=True,
                                 padding="max_length" if siglip else True,
                                 **({"max_length": 64} if siglip else {})))

    def encode(inputs: Any) -> torch.Tensor:
        device = next(module.parameters()).device
        feats = module.get_text_features(**{k: v.to(device) for k, v in inputs.items()})  # type: ignore[operator]
        return feats if isinstance(feats, torch.Tensor) else feats.pooler_output

    bias = getattr(module, "logit_bias", None)
    scale = module.logit_scale
    assert isinstance(scale, torch.Tensor)
    return TextTower(tokenize=tokenize, encode=encode,
                     logits=scaled_cosine(scale, bias if isinstance(bias, torch.Tensor) else None))


def _padded_route(module: nn.Module, path: str, patch: tuple[int, int]) -> PaddedRoute:
    """SigLIP2 (NaFlex): images of different sizes in one padded batch (`siglip2_padded_inputs`)."""
    runs_tower = _runs_tower(module, path)

    def forward(m: nn.Module, pixels: list[torch.Tensor]) -> Any:
        return (m.get_submodule(path) if runs_tower else m)(**siglip2_padded_inputs(pixels, patch[0]))

    return PaddedRoute(forward)
