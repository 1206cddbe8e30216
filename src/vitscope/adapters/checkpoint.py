"""Checkpoint files: reading state dicts safely, and facebookresearch/dino ``.pth`` checkpoints.

Reading never runs code from the file: ``.safetensors`` hold tensors only, and ``.pth``/``.pt`` files are read
with ``torch.load(..., weights_only=True)``, which refuses any pickle that would import or call something other
than tensors and plain containers. (Training checkpoints that carry an ``argparse.Namespace``, as DINO's
``args`` entry, are allowed: building a Namespace sets attributes and runs nothing.)

Reading never allocates what the file only claims either: a safetensors header is checked before a tensor is
loaded, a pickle is memory-mapped (``mmap=True``) where its format allows, and every tensor's shape is checked
against `vitscope.models.vit.MAX_MODEL_DIM` and the weights' total size against ``MAX_MODEL_BYTES`` before any
model is built from them (a 1 KB pickle can hold an empty ``(10**9, 0)`` tensor, or a ``(10**5, 10**5)`` view of
one number with zero strides).

DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers") saves its ViTs with the
parameter names of its ``vision_transformer.py``, which vitscope's own ViT (`vitscope.models.vit.ViT`) shares,
so a DINO backbone loads into it directly. The architecture is read from the tensor shapes:

- ``patch_embed.proj.weight`` ``(D, C, p, p)``: embedding dim ``D``, channels ``C``, patch size ``p``;
- ``pos_embed`` ``(1, 1 + gh * gw, D)``: the training grid (square unless ``image_size=`` says otherwise);
- ``blocks.{i}.*``: depth; ``blocks.0.mlp.fc1.weight`` ``(hidden, D)``: the MLP ratio;
- the number of heads is not in the shapes: it comes from DINO's table (192: 3, 384: 6, 768: 12, 1024: 16),
  ``arch="vit_small"`` or ``num_heads=``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitscope.adapters.base import VitModel
from vitscope.errors import CheckpointError, VitscopeError
from vitscope.models.vit import MAX_MODEL_BYTES, MAX_MODEL_DIM, safetensors_header

if TYPE_CHECKING:
    from vitscope.models.vit import PosInterp

#: Heads per embedding dim of DINO's (and DeiT's) ViT sizes.
HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16}
#: DINO's ``--arch`` names and their embedding dims.
ARCH_DIMS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768, "vit_large": 1024}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Keys under which training scripts nest the weights, tried in this order (DINO evaluates its teacher).
NESTED_KEYS = ("teacher", "model", "state_dict", "model_ema", "state_dict_ema", "student")
#: Wrapper prefixes removed from every key (DistributedDataParallel, DINO's MultiCropWrapper).
STRIP_PREFIXES = ("module.", "backbone.")

_REFUSED_FIX = (
    "only load checkpoints you trust; re-save just the weights (torch.save(model.state_dict(), path)) or "
    "convert them to .safetensors"
)


def read_checkpoint(path: str | os.PathLike[str], argument: str = "path") -> Any:
    """The object stored in a checkpoint file, read without running code from it.

    ``.safetensors`` -> a dict of tensors; anything else -> ``torch.load(path, weights_only=True,
    map_location="cpu")``. Raises `CheckpointError` (naming ``argument``) for a missing, empty or unreadable
    file, and for a pickle that would execute code (refused, not loaded).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(argument, f"checkpoint file not found: {p}", "check the path (e.g. 'dino:/abs/path.pth')")
    if p.is_dir():
        raise CheckpointError(argument, f"{p} is a folder, not a checkpoint file", "pass the .pth or .safetensors file")
    if p.stat().st_size == 0:
        raise CheckpointError(argument, f"{p} is empty (0 bytes)", "re-download or re-save the checkpoint")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            claimed = 0
            for key, (shape, dtype) in safetensors_header(p).items():  # names, dtypes, shapes: no tensor yet
                _check_shape(key, shape, p, argument)
                claimed += math.prod(shape) * _SAFETENSORS_BYTES.get(dtype, 8)
            _check_bytes(claimed, p, argument)
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            if isinstance(exc, VitscopeError):
                raise
            raise CheckpointError(argument, f"{p} is not a readable safetensors file ({_first_line(exc)})",
                                  "re-download or re-save it") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), quiet_unpickler():
            try:  # tensors stay in the file until used (the zip format only; legacy pickles are read whole)
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _refused_reason(exc)
        if reason is None:  # not a pickle torch understands (garbage, a text file): unreadable, not unsafe
            raise CheckpointError(
                argument, f"{p} is not a readable PyTorch checkpoint ({unpickle_detail(exc)})",
                "pass a .pth/.pt file saved with torch.save, or a .safetensors file",
            ) from None
        raise CheckpointError(
            argument, f"refused to load {p}: unpickling it could run code ({reason})", _REFUSED_FIX
        ) from None
    except Exception as exc:  # a truncated zip, a text file, a legacy pickle gone wrong: all unreadable
        raise CheckpointError(
            argument, f"{p} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})",
            "pass a .pth/.pt file saved with torch.save, or a .safetensors file",
        ) from None
    _check_nested(obj, p, argument)
    return obj


#: bytes per element of each safetensors dtype (unknown ones count 8)
_SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_SHAPE_FIX = "the file is damaged or not a ViT's weights: re-download or re-save it"


def _check_shape(key: object, shape: tuple[int, ...], path: Path, argument: str) -> None:
    """A tensor's shape as stored: at most 8 dimensions, each at most `MAX_MODEL_DIM` (even an empty one)."""
    if len(shape) > 8 or any(int(n) > MAX_MODEL_DIM for n in shape):
        raise CheckpointError(
            argument, f"{path}: tensor {str(key)[:80]!r} has shape {tuple(shape)}, larger than any ViT's "
            f"(at most 8 dimensions of at most {MAX_MODEL_DIM})", _SHAPE_FIX,
        )


def _check_bytes(nbytes: int, path: Path, argument: str) -> None:
    if nbytes > MAX_MODEL_BYTES:
        raise CheckpointError(
            argument, f"{path}: its tensors claim {nbytes / 1e9:.3g} GB, more than vitscope loads "
            f"({MAX_MODEL_BYTES / 1e9:g} GB)", _SHAPE_FIX,
        )


def _check_nested(obj: object, path: Path, argument: str, depth: int = 0) -> None:
    """Every tensor in a loaded checkpoint (dicts and lists, any depth) has a plausible shape."""
    if depth > 32:
        raise CheckpointError(argument, f"{path}: nested more than 32 levels deep", _SHAPE_FIX)
    if isinstance(obj, torch.Tensor):
        _check_shape("?", tuple(obj.shape), path, argument)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(value, torch.Tensor):
                _check_shape(key, tuple(value.shape), path, argument)
            else:
                _check_nested(value, path, argument, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_nested(value, path, argument, depth + 1)


def check_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], argument: str = "path") -> None:
    """The weights a model will be built from claim at most `MAX_MODEL_BYTES` (counted from shapes: a
    zero-stride view claims its full size, as copying it into a model would cost)."""
    _check_bytes(sum(v.numel() * v.element_size() for v in state.values()), Path(path), argument)


@contextlib.contextmanager
def quiet_unpickler() -> Iterator[None]:
    """Silence torch's weights-only unpickler's "Detected pickle protocol" warning (a hostile or old file's
    detail, printed on stderr before the one-line error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def unpickle_detail(exc: BaseException) -> str:
    """The useful line of torch's weights-only error (after its long preamble), e.g. ``Unsupported operand 149``."""
    text = str(exc)
    after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    lines = [ln.strip() for ln in after.splitlines() if ln.strip()]
    return lines[0][:120] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _refused_reason(exc: BaseException) -> str | None:
    """Why torch's weights_only unpickler refused (the offending global, e.g. ``builtins.exec``), else None."""
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it references {m.group(1)}, which torch.load(weights_only=True) does not allow"
    m = re.search(r"Trying to call reduce for [^\n]{1,80}|Can only (?:create new object|build)[^\n]{1,120}", text)
    return m.group(0) if m else None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(
    obj: Any, checkpoint_key: str | None = None, argument: str = "path", path: str | os.PathLike[str] | None = None
) -> dict[str, torch.Tensor]:
    """Find the weights in a loaded checkpoint and remove wrapper prefixes.

    ``obj`` may be a state dict or a dict nesting one under ``checkpoint_key`` (default: the first of
    `NESTED_KEYS` present). Keys lose their ``module.`` / ``backbone.`` prefixes; when some keys carry
    ``backbone.`` (DINO's MultiCropWrapper), the others (the projection head) are dropped. Errors name ``path``.
    """
    where = f"{path}: " if path is not None else ""
    if not isinstance(obj, Mapping):
        raise CheckpointError(argument, f"{where}checkpoint holds a {type(obj).__name__}, not a dict of tensors",
                              "save model.state_dict(), not the model")
    if checkpoint_key is not None:
        if checkpoint_key not in obj:
            keys = sorted(str(k) for k in obj)[:10]
            raise CheckpointError("checkpoint_key", f"{checkpoint_key!r} not in {path or 'the checkpoint'} "
                                  f"(keys: {keys})",
                                  "pass one of those keys, or leave checkpoint_key unset")
        obj = obj[checkpoint_key]
    elif not _is_state_dict(obj):
        for key in NESTED_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(argument, f"{where}the checkpoint's {checkpoint_key!r} entry holds a {type(obj).__name__}, "
                              "not a dict of tensors", "pass checkpoint_key= naming the entry that holds the weights")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = sorted(str(k) for k in obj)[:10]
        raise CheckpointError(argument, f"{where}no tensors found in the checkpoint (top-level keys: {keys})",
                              "pass checkpoint_key= naming the entry that holds the weights")
    stripped: dict[str, torch.Tensor] = {}
    has_backbone = any(_strip(k, ("module.",)).startswith("backbone.") for k in tensors)
    for k, v in tensors.items():
        k = _strip(k, ("module.",))
        if has_backbone and not k.startswith("backbone."):
            continue  # DINO's projection head (head.mlp.*, head.last_layer.*) next to the backbone
        stripped[_strip(k, STRIP_PREFIXES)] = v
    return stripped


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _num_heads(dim: int, arch: str | None, num_heads: int | None) -> int:
    if arch is not None:
        base = next((a for a in ARCH_DIMS if arch == a or arch.startswith(a + "_")), None)
        if base is None:
            raise VitscopeError("arch", f"unknown DINO architecture {arch!r}", f"use one of {', '.join(ARCH_DIMS)}")
        if ARCH_DIMS[base] != dim:
            raise VitscopeError(
                "arch", f"{arch!r} has embedding dim {ARCH_DIMS[base]} but the checkpoint has {dim}",
                "pass the arch the checkpoint was trained with, or num_heads=",
            )
        if num_heads is None:
            num_heads = HEADS_BY_DIM[dim]
    if num_heads is None:
        if dim not in HEADS_BY_DIM:
            raise VitscopeError(
                "num_heads", f"embedding dim {dim} is not a standard DINO size ({sorted(HEADS_BY_DIM)})",
                "pass num_heads= (the number of attention heads the model was trained with)",
            )
        num_heads = HEADS_BY_DIM[dim]
    if num_heads <= 0 or dim % num_heads:
        raise VitscopeError("num_heads", f"{num_heads} does not divide the embedding dim {dim}")
    return num_heads


_DINO_FIX = "pass a facebookresearch/dino ViT checkpoint, or load other models with hf:/timm:"


def _require(state: Mapping[str, torch.Tensor], key: str, path: Path, shape: str | None = None,
             rank: int | None = None) -> torch.Tensor:
    """``state[key]``: present, floating point and of ``rank`` dimensions, each at least 1 (``shape`` names
    them in the message), else a `CheckpointError` naming the file."""
    if key not in state:
        sample = sorted(state)[:6]
        raise CheckpointError(
            "path", f"{path} has no {key!r}, so it is not a DINO ViT checkpoint (keys start {sample})", _DINO_FIX,
        )
    t = state[key]
    if not t.is_floating_point():
        raise CheckpointError("path", f"{path}: {key} holds {t.dtype} values, not floating-point weights", _DINO_FIX)
    if rank is not None and (t.dim() != rank or 0 in t.shape):
        raise CheckpointError("path", f"{path}: {key} has shape {tuple(t.shape)}, expected {shape}", _DINO_FIX)
    return t


def load_dino_checkpoint(
    path: str | os.PathLike[str],
    arch: str | None = None,
    *,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    checkpoint_key: str | None = None,
    name: str | None = None,
    pos_interp: PosInterp = "dino",
) -> VitModel:
    """Load a facebookresearch/dino ViT checkpoint into vitscope's own ViT.

    Args:
        path: a ``.pth`` (read with ``weights_only=True``) or ``.safetensors`` file: a bare backbone state
            dict, or a training checkpoint nesting it under ``"teacher"``/``"student"``/``"model"``/
            ``"state_dict"``, keys possibly prefixed ``module.`` / ``backbone.``. Projection heads are dropped;
            a linear ``head.weight`` ``(classes, D)`` is kept as the classifier.
        arch: DINO's ``--arch`` (``"vit_tiny"``, ``"vit_small"``, ``"vit_base"``, ``"vit_large"``).
        num_heads: heads per layer, when the embedding dim is not a standard size.
        image_size: ``(height, width)`` the position embeddings were trained at, when not square.
        checkpoint_key: the entry holding the weights (default: ``teacher`` first, as DINO evaluates).
        pos_interp: how position embeddings are resampled at other input sizes: ``"dino"`` (default)
            reproduces DINO's own forward (bicubic with ``scale_factor=((H/p + 0.1) / gh, (W/p + 0.1) / gw)``);
            ``"size"`` resamples to the exact grid (``size=(H/p, W/p)``), as transformers' ``ViTModel`` does.

    Returns:
        A `VitModel` with ImageNet normalisation and DINO's ``"crop"`` size policy (images keep their
        resolution, cropped top-left to a multiple of the patch size).

    Example:
        >>> vit = vitscope.load("dino:dino_deitsmall16_pretrain.pth")  # doctest: +SKIP
    """
    from vitscope.adapters.vitscope_vit import from_vit
    from vitscope.models.vit import POS_INTERPS, ViT, ViTConfig, check_shapes

    if pos_interp not in POS_INTERPS:
        raise VitscopeError(
            "pos_interp", f"{pos_interp!r} is not a position-embedding resampling",
            "use 'dino' (DINO's own forward) or 'size' (the exact grid, as transformers' ViT)",
        )
    p = Path(path).expanduser()
    state = extract_state_dict(read_checkpoint(p), checkpoint_key, path=p)
    check_state(state, p)
    w = _require(state, "patch_embed.proj.weight", p, "(D, C, p, p)", 4)
    if w.shape[-1] != w.shape[-2]:
        raise CheckpointError("path", f"{p}: patch_embed.proj.weight has shape {tuple(w.shape)}, expected "
                              "(D, C, p, p) with a square patch", _DINO_FIX)
    dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    _require(state, "cls_token", p, "(1, 1, D)", 3)
    pos = _require(state, "pos_embed", p, "(1, 1 + patches, D)", 3)  # (1, 1 + gh * gw, D)
    num_patches = int(pos.shape[1]) - 1
    if num_patches < 1:
        raise CheckpointError("path", f"{p}: pos_embed has shape {tuple(pos.shape)}, no patch positions", _DINO_FIX)
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        if (size[0] // patch) * (size[1] // patch) != num_patches:
            raise VitscopeError(
                "image_size", f"{p}: {size[0]}x{size[1]} gives {(size[0] // patch) * (size[1] // patch)} patches of "
                f"{patch} px but pos_embed has {num_patches}", "pass the size the model was trained at",
            )
    else:
        side = round(num_patches**0.5)
        if side * side != num_patches:
            raise VitscopeError(
                "image_size", f"{p}: pos_embed has {num_patches} patch positions, not a square grid",
                "pass image_size=(height, width) the model was trained at",
            )
        size = (side * patch, side * patch)
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise CheckpointError("path", f"{p.name} has no blocks.{{i}}.* weights", "pass a DINO ViT checkpoint")
    hidden = int(_require(state, "blocks.0.mlp.fc1.weight", p, "(hidden, D)", 2).shape[0])
    reg = _require(state, "reg_token", p, "(1, registers, D)", 3) if "reg_token" in state else None
    head_w = state.get("head.weight")
    num_classes = int(head_w.shape[0]) if head_w is not None and head_w.dim() == 2 else 0
    # Anything else under head.* (a DINOHead saved without the backbone prefix) is not part of the backbone.
    state = {k: v for k, v in state.items() if not k.startswith("head.") or (num_classes and k in
             ("head.weight", "head.bias"))}
    try:
        cfg = ViTConfig(
            image_size=size, patch_size=patch, in_chans=in_chans, num_classes=num_classes, dim=dim, depth=depth,
            heads=_num_heads(dim, arch, num_heads), mlp_ratio=hidden / dim,
            qkv_bias="blocks.0.attn.qkv.bias" in state, num_registers=int(reg.shape[1]) if reg is not None else 0,
            norm_eps=1e-6, mean=IMAGENET_MEAN, std=IMAGENET_STD, pos_interp=pos_interp,
        )
    except VitscopeError as exc:
        if exc.argument in ("arch", "pos_interp"):  # the caller's own arguments
            raise
        if exc.argument in ("num_heads", "image_size"):  # the file's sizes need the caller's help
            raise type(exc)(exc.argument, f"{p}: {exc.problem}", exc.fix) from None
        raise CheckpointError("path", f"{p}: the architecture its shapes imply is refused: {exc.argument} "
                              f"{exc.problem}", _DINO_FIX) from None
    # Every shape against the architecture before the model exists (a (10**9, D) head would cost gigabytes).
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    check_shapes(cfg.state_shapes(), shapes, p, "path",
                 "for DINOv2 use hf:facebook/dinov2-*; for timm weights use timm:<name> with checkpoint=",
                 what="is not a DINO (v1) ViT checkpoint")
    bad = next((k for k, v in state.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise CheckpointError("path", f"{p}: {bad} holds {state[bad].dtype} values, not weights", _DINO_FIX)
    model = ViT(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # (shapes and names were checked above: a dtype torch cannot copy)
        raise CheckpointError("path", f"{p} does not fit a DINO ViT: {_first_size_mismatch(exc)}") from None
    model.eval()
    vit = from_vit(model, name=name or p.name)
    vit.info = replace(
        vit.info, family="dino",
        preprocess=replace(vit.info.preprocess, policy="crop", resample="bicubic", mean=IMAGENET_MEAN,
                           std=IMAGENET_STD),
    )
    return vit


def _first_size_mismatch(exc: RuntimeError) -> str:
    for line in str(exc).splitlines():
        if "size mismatch" in line:
            return line.strip()[:300]
    return _first_line(exc)


def read_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (`read_checkpoint`), checked to be tensors only and of a plausible size
    (`check_state`): read before the model it is for is built, so a bad file costs no model."""
    state = read_checkpoint(path, argument="checkpoint")
    if not _is_state_dict(state):
        bad = next((f"{k!r} holds a {type(v).__name__}" for k, v in state.items() if not isinstance(v, torch.Tensor)),
                   None) if isinstance(state, Mapping) and state else None
        raise CheckpointError("checkpoint", f"{path} is not a state dict of tensors"
                              f" ({bad or type(state).__name__})", "save model.state_dict()")
    check_state(state, path, "checkpoint")
    return {str(k): v for k, v in state.items()}


def load_state_into(model: Any, path: str | os.PathLike[str], what: str,
                    state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load the state dict in ``path`` (`read_state`; or ``state``, already read from it) into ``model``
    strictly, or a one-line `CheckpointError` naming ``what`` (e.g. ``"torchvision vit_b_16"``) and the first
    mismatch. Shapes are compared before anything is copied."""
    if state is None:
        state = read_state(path)
    own = model.state_dict()
    wrong = next((k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)), None)
    if wrong is not None:
        raise CheckpointError("checkpoint", f"{path} does not fit {what}: {wrong} has shape "
                              f"{tuple(state[wrong].shape)}, the model's is {tuple(own[wrong].shape)}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError("checkpoint", f"{path} does not fit {what}: {first}") from None
