"""Hugging Face ``transformers`` ViTs: ViT, DINO, DeiT, DINOv2 (+ registers), CLIP and SigLIP/SigLIP2 towers.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import AttentionSite, ModelInfo, Preprocess, VitModel, import_optional
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
    "yolos": _Family("yolos", IMAGENET_MEAN, IMAGENET_STD, "bilinear", "YolosModel"),
}
#: Families whose attention is windowed (no global attention over every patch): refused with this reason.
WINDOWED = {
    "swin": "Swin", "swinv2": "Swin V2", "donut-swin": "Donut Swin", "hiera": "Hiera", "sam": "SAM's image encoder",
    "sam_vision_model": "SAM's image encoder", "maskformer-swin": "MaskFormer Swin", "dinat": "DiNAT", "nat": "NAT",
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
    """The class to instantiate: the checkpoint's own architecture if it is a supported family, else a default."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    _refuse_windowed(str(model_type), source)
    if family is None:
        supported = ", ".join(sorted({f.name for f in FAMILIES.values()} | {"dino"}))
        raise NotAViTError(
            "model", f"{source!r} is a {model_type!r} model; vitscope's HF adapter reads {supported}",
            "load it yourself and describe it with vitscope.wrap(model, blocks=..., qkv=..., num_heads=..., patch_size=...)",
        )
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(arch), None)
        cfg_cls = getattr(cls, "config_class", None)
        if cls is not None and getattr(cfg_cls, "model_type", None) == model_type:
            return cls
    return getattr(transformers, family.default_class)


def _refuse_windowed(model_type: str, source: str) -> None:
    if model_type in WINDOWED:
        raise NotAViTError(
            "model", f"{source!r} is {WINDOWED[model_type]}: its attention is windowed (each token attends to a local "
            "window, not to every patch), so there is no global attention map to capture",
            "use a global-attention ViT (ViT, DeiT, DINOv2/v3, BEiT, CLIP, SigLIP, ...)",
        )


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
def _is_composite(module: nn.Module) -> bool:
    """CLIPModel/SiglipModel/Siglip2Model: image + text; only ``module.vision_model`` runs."""
    import inspect

    if not hasattr(module, "vision_model"):
        return False
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return "input_ids" in params


def _tower(module: nn.Module) -> nn.Module:
    """The module holding the vision embeddings and encoder."""
    tower = getattr(module, "vision_model", None)
    return tower if isinstance(tower, nn.Module) else module


def _vision_config(module: nn.Module) -> Any:
    cfg = getattr(module, "config", None)
    if cfg is None:
        raise NotAViTError("model", f"{type(module).__name__} has no config", "pass a transformers PreTrainedModel")
    return getattr(cfg, "vision_config", None) or cfg


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (list, tuple)):
        return (int(x[0]), int(x[1]))
    return (int(x), int(x))


def _linear(m: nn.Module, name: str) -> nn.Linear | None:
    sub = getattr(m, name, None)
    return sub if isinstance(sub, nn.Linear) else None


def _is_attention(m: nn.Module) -> bool:
    """An attention module: it owns separate q/k/v Linears (``q_proj``... or ``query``... in older layouts)."""
    return any(all(_linear(m, n) is not None for n in names)
               for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")))


def _block_of(name: str, root: nn.Module) -> nn.Module:
    """The transformer block containing attention module ``name``: the path up to its last numeric component."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return root.get_submodule(".".join(parts[: i + 1]))
    return root.get_submodule(name)


def _sites(tower: nn.Module, vcfg: Any) -> list[AttentionSite]:
    """One site per encoder attention module, in depth order (pooling heads after the encoder are not layers)."""
    sites: list[AttentionSite] = []
    for name, m in tower.named_modules():
        if not _is_attention(m) or name.split(".", 1)[0] == "head":
            continue
        heads = int(
            getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None) or vcfg.num_attention_heads
        )
        sites.append(AttentionSite(layer=len(sites), block=_block_of(name, tower), attn=m, num_heads=heads))
    return sites


def _prefix(tower: nn.Module, vcfg: Any) -> tuple[str, ...]:
    """Prefix token kinds in token order, from the embedding module's own parameters."""
    embed_attrs = ("cls_token", "class_embedding", "position_embedding", "position_embeddings", "patch_embed",
                   "patch_embeddings", "patch_embedding")
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
    if family.name == "siglip2":
        side = round(int(vcfg.num_patches) ** 0.5)
        size = (side * patch[0], side * patch[1])
    else:
        size = _pair(vcfg.image_size)
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
        image_size=size, mean=mean, std=std, policy="resize", resample=resample, dynamic_size=dynamic,
        channels=int(getattr(vcfg, "num_channels", 3)),
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


def _make_forward(module: nn.Module, family: _Family, patch: tuple[int, int]) -> tuple[
    Callable[[nn.Module, torch.Tensor], Any], bool
]:
    """The forward callable and whether it accepts any input size."""
    composite = _is_composite(module)
    target = _tower(module) if composite else module
    if family.name == "siglip2":

        def forward_siglip2(m: nn.Module, pixels: torch.Tensor) -> Any:
            t = _tower(m) if composite else m
            return t(**siglip2_inputs(pixels, patch[0]))

        return forward_siglip2, True
    if family.name == "vit_mae":

        def forward_mae(m: nn.Module, pixels: torch.Tensor) -> Any:
            t = _tower(m) if composite else m
            return _mae_unmasked(t, pixels, patch)

        return forward_mae, True
    if _accepts(target.forward, "interpolate_pos_encoding"):

        def forward_interp(m: nn.Module, pixels: torch.Tensor) -> Any:
            t = _tower(m) if composite else m
            return t(pixel_values=pixels, interpolate_pos_encoding=True)

        return forward_interp, True

    def forward_plain(m: nn.Module, pixels: torch.Tensor) -> Any:
        t = _tower(m) if composite else m
        return t(pixel_values=pixels)

    # DINOv2 interpolates its position embeddings itself, DINOv3 uses RoPE, AIMv2 "native" sin-cos embeddings
    vcfg = _vision_config(module)
    dynamic = family.name in ("dinov2", "dinov3") or (family.name == "aimv2" and bool(getattr(vcfg, "is_native", False)))
    return forward_plain, dynamic


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


def from_hf_model(module: nn.Module, name: str | None = None, folder: str | os.PathLike[str] | None = None) -> VitModel:
    """Describe a transformers ViT instance (see the module docstring for the supported classes).

    Args:
        module: a loaded transformers model; it is used as is (attention implementation, dtype, device).
        name: display name; default the config's ``_name_or_path`` or the class name.
        folder: where to read ``preprocessor_config.json``; default ``config._name_or_path`` when it is a folder.
    """
    cfg = getattr(module, "config", None)
    vcfg = _vision_config(module)
    model_type = str(getattr(vcfg, "model_type", getattr(cfg, "model_type", "")))
    _refuse_windowed(model_type, type(module).__name__)
    family = FAMILIES.get(model_type)
    if family is None:
        raise NotAViTError(
            "model", f"{type(module).__name__} ({model_type!r}) is not a transformers family vitscope reads",
            "supported: ViT, DINO, DeiT, DINOv2 (+registers), DINOv3, BEiT, Data2Vec-vision, ViTMAE, ViT-MSN, I-JEPA, "
            "AIMv2, CLIP, SigLIP, SigLIP2, YOLOS; else use vitscope.wrap(...)",
        )
    source = str(getattr(cfg, "_name_or_path", "") or "")
    if family.name == "vit" and "dino" in (name or source).lower():
        family = _DINO
    if folder is None and source and Path(source).is_dir():
        folder = source
    tower = _tower(module)
    sites = _sites(tower, vcfg)
    num_layers = int(vcfg.num_hidden_layers)
    if len(sites) != num_layers:
        raise NotAViTError(
            "model", f"found {len(sites)} attention layers in {type(module).__name__}, config says {num_layers}",
            "describe it with vitscope.wrap(model, blocks=..., q=..., k=..., num_heads=..., patch_size=...)",
        )
    patch = _pair(vcfg.patch_size)
    forward, dynamic = _make_forward(module, family, patch)
    classifier = _has_classifier(module)
    labels = None
    num_classes = None
    if classifier:
        num_classes = int(getattr(cfg, "num_labels", 0)) or None
        id2label = getattr(cfg, "id2label", None) or {}
        by_id = {int(k): str(v) for k, v in id2label.items()}
        if num_classes and all(i in by_id for i in range(num_classes)):
            labels = tuple(by_id[i] for i in range(num_classes))
    info = ModelInfo(
        name=name or source or type(module).__name__, family=family.name, num_layers=num_layers,
        num_heads=sites[0].num_heads, embed_dim=int(vcfg.hidden_size), patch_size=patch,
        prefix=_prefix(tower, vcfg), suffix=_suffix(tower),
        preprocess=_preprocess(family, vcfg, patch, Path(folder) if folder is not None else None, dynamic),
        num_classes=num_classes, labels=labels,
    )
    return VitModel(
        module, info, sites, forward=forward, logits=_logits if classifier else _no_logits,
        readout=_readout(module, info.num_prefix_tokens) if classifier else None,
    )
