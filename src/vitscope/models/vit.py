"""vitscope's own Vision Transformer: small, readable, and loadable like any other model.

Parameter names follow facebookresearch/dino's ``vision_transformer.py`` (and timm's), so DINO ``.pth``
checkpoints load into it directly: ``patch_embed.proj``, ``cls_token``, ``pos_embed`` (which includes the
[CLS] position), ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``.
Optional register tokens (Darcet et al. 2024) sit between [CLS] and the patches: ``[CLS, reg..., patches]``.

Attention has two visible branches, as in timm: the fused kernel (`F.scaled_dot_product_attention`) and the
explicit ``softmax(q k^T * scale)``; they agree to float precision (tested).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from vitscope.errors import CheckpointError, VitscopeError

#: How `ViT.interpolate_pos_embed` resamples the patch position embeddings for another grid (see there).
PosInterp = Literal["size", "dino"]
POS_INTERPS: tuple[str, ...] = get_args(PosInterp)

#: Largest model vitscope builds from a config or checkpoint: its parameters' bytes (float32). A file that
#: implies more is refused before any tensor is created (a 1 KB file can describe a terabyte model).
MAX_MODEL_BYTES = 20 * 10**9
#: Largest single size a model file may state: a tensor dimension, the embedding or MLP width, an image side in
#: pixels, the number of classes, registers or patch tokens.
MAX_MODEL_DIM = 1_000_000
#: Most transformer blocks.
MAX_DEPTH = 10_000


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(name: str, value: object, low: int, high: int = MAX_MODEL_DIM) -> int:
    """``value`` as an int in ``[low, high]`` (an integral float such as JSON's ``1e3`` counts), else a
    `VitscopeError` naming ``name``. Booleans, strings, NaN and infinities are refused."""
    ok = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not ok:
        raise VitscopeError(name, f"must be an integer, got {_short(value)}", f"pass an integer from {low} to {high}")
    number = int(value)  # type: ignore[call-overload]
    if not low <= number <= high:
        raise VitscopeError(name, f"must be from {low} to {high}, got {number}", "pass a size a real ViT has")
    return number


def _check_float(name: str, value: object, low: float, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VitscopeError(name, f"must be a finite number, got {_short(value)}")
    if value < low or value > high or (low_open and value == low):
        bound = f"{'above' if low_open else 'at least'} {low}" + ("" if high == math.inf else f" and at most {high}")
        raise VitscopeError(name, f"must be {bound}, got {value}")
    return float(value)


def _check_numbers(name: str, value: object, lengths: Sequence[int], positive: bool) -> tuple[float, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or len(value) not in lengths:
        raise VitscopeError(name, f"must be a list of {' or '.join(map(str, sorted(set(lengths))))} numbers, "
                            f"got {_short(value)}")
    return tuple(_check_float(name, v, 0.0, low_open=True) if positive else _check_float(name, v, -math.inf)
                 for v in value)


@dataclass
class ViTConfig:
    """Architecture of a vitscope ViT. Defaults are seed 004's tiny ViT (64 px, patch 4, depth 4, dim 128)."""

    image_size: tuple[int, int] = (64, 64)  # (height, width) the position embeddings were trained at
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_registers: int = 0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    norm_eps: float = 1e-6
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    labels: tuple[str, ...] | None = None
    pos_interp: PosInterp = "size"  # "dino": facebookresearch/dino's scale-factor resampling (DINO checkpoints)

    def __post_init__(self) -> None:
        """Check every field's type and range, and the model's size, before anything is allocated: a bad or
        hostile config is a `VitscopeError` naming the field (never a TypeError from deep inside torch)."""
        size = self.image_size
        if isinstance(size, (int, float)) and not isinstance(size, bool):
            size = (size, size)
        if isinstance(size, (str, bytes, Mapping)) or not isinstance(size, Sequence) or len(size) != 2:
            raise VitscopeError("image_size", f"must be (height, width), got {_short(size)}", "e.g. [224, 224]")
        self.image_size = (check_int("image_size", size[0], 1), check_int("image_size", size[1], 1))
        self.patch_size = check_int("patch_size", self.patch_size, 1, min(self.image_size))
        self.in_chans = check_int("in_chans", self.in_chans, 1)
        self.num_classes = check_int("num_classes", self.num_classes, 0)
        self.dim = check_int("dim", self.dim, 1)
        self.depth = check_int("depth", self.depth, 1, MAX_DEPTH)
        self.heads = check_int("heads", self.heads, 1, self.dim)
        if self.dim % self.heads:
            raise VitscopeError("heads", f"dim={self.dim} must be divisible by heads={self.heads}",
                                "pass a number of heads that divides dim")
        self.mlp_ratio = _check_float("mlp_ratio", self.mlp_ratio, 0.0, low_open=True)
        check_int("mlp_ratio", int(self.dim * self.mlp_ratio), 1)  # the MLP's hidden width
        if not isinstance(self.qkv_bias, bool):
            raise VitscopeError("qkv_bias", f"must be true or false, got {_short(self.qkv_bias)}")
        self.num_registers = check_int("num_registers", self.num_registers, 0)
        self.dropout = _check_float("dropout", self.dropout, 0.0, 1.0)
        self.attn_dropout = _check_float("attn_dropout", self.attn_dropout, 0.0, 1.0)
        self.norm_eps = _check_float("norm_eps", self.norm_eps, 0.0, low_open=True)
        self.mean = _check_numbers("mean", self.mean, (1, 3, self.in_chans), positive=False)
        self.std = _check_numbers("std", self.std, (1, 3, self.in_chans), positive=True)
        if self.labels is not None:
            if isinstance(self.labels, (str, bytes, Mapping)) or not isinstance(self.labels, Sequence) or not all(
                isinstance(x, str) for x in self.labels
            ):
                raise VitscopeError("labels", f"must be a list of class names, got {_short(self.labels)}")
            self.labels = tuple(self.labels)
        if self.pos_interp not in POS_INTERPS:
            raise VitscopeError("pos_interp", f"pos_interp={_short(self.pos_interp)} is not one of "
                                f"{', '.join(map(repr, POS_INTERPS))}")
        gh, gw = self.grid
        check_int("image_size", gh * gw + 1 + self.num_registers, 1)  # tokens: [CLS] + registers + patches
        nbytes = 4 * self.num_parameters()
        if nbytes > MAX_MODEL_BYTES:
            raise VitscopeError(
                "dim", f"this architecture has {nbytes / 1e9:.3g} GB of parameters, more than vitscope builds "
                f"({MAX_MODEL_BYTES / 1e9:g} GB)", "check dim, depth, mlp_ratio, image_size and num_classes",
            )

    def num_parameters(self) -> int:
        """Parameters of `ViT` (this config), counted from the sizes alone: nothing is allocated."""
        d, hidden = self.dim, int(self.dim * self.mlp_ratio)
        gh, gw = self.grid
        embed = d * self.in_chans * self.patch_size**2 + d + d + (1 + gh * gw) * d + self.num_registers * d
        attn = 3 * d * d + (3 * d if self.qkv_bias else 0) + d * d + d
        block = 4 * d + attn + (d * hidden + hidden) + (hidden * d + d)
        head = (d * self.num_classes + self.num_classes) if self.num_classes > 0 else 0
        return embed + self.depth * block + 2 * d + head

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor in `ViT`'s state dict, from a model built on the meta device (no
        memory): the architecture a checkpoint is checked against before the real model is created."""
        with torch.device("meta"):
            model = ViT(self)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViTConfig:
        if not isinstance(d, Mapping):
            raise VitscopeError("config", f"must be a JSON object, got {type(d).__name__}", "see save_vit")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        if self.fused_attn:
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, H*d)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.attn_dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, gh*gw, C)


class ViT(nn.Module):
    """A pre-norm ViT with [CLS], optional registers, learned position embeddings and a linear head."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gh, gw = cfg.grid
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, cfg.dim))  # [CLS] + patches
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim)) if cfg.num_registers else None
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_registers

    def set_fused_attn(self, fused: bool) -> None:
        for blk in self.blocks:
            blk.attn.fused_attn = fused  # type: ignore[union-attr]

    def interpolate_pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings ``(1, 1 + gh * gw, D)`` for a ``(gh, gw)`` patch grid.

        The [CLS] position is kept; the patch positions, a ``(th, tw)`` grid (`ViTConfig.grid`), are resampled
        bicubically (``align_corners=False``) as ``cfg.pos_interp`` says:

        - ``"size"``: to exactly ``(gh, gw)`` (``F.interpolate(size=(gh, gw))``, as transformers' ViT does);
        - ``"dino"``: facebookresearch/dino's ``interpolate_pos_encoding``: ``scale_factor=((gh + 0.1) / th,
          (gw + 0.1) / tw)``. The output is still ``(gh, gw)`` (the 0.1 only guards the floor), but bicubic
          sampling follows the scale factor, ``src = (dst + 0.5) * th / (gh + 0.1) - 0.5``, not ``th / gh``,
          so the embeddings differ slightly from ``"size"``.

        Both return ``pos_embed`` untouched on the training grid. (DINO's test is ``npatch == N and w == h`` on
        the pixels; with a square training grid and inputs that are multiples of the patch size, which
        `tokens` requires, that is exactly ``(gh, gw) == (th, tw)``.)
        """
        pos = self.pos_embed
        th, tw = self.cfg.grid
        if (gh, gw) == (th, tw):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        D = pos.shape[-1]
        patch_pos = patch_pos.reshape(1, th, tw, D).permute(0, 3, 1, 2).float()  # (1, D, th, tw)
        if self.cfg.pos_interp == "dino":
            scale = [(gh + 0.1) / th, (gw + 0.1) / tw]  # rows, cols: DINO's (w0 / sqrt(N), h0 / sqrt(N))
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
            if tuple(patch_pos.shape[-2:]) != (gh, gw):  # DINO asserts the same
                raise RuntimeError(f"DINO resampling gave a {tuple(patch_pos.shape[-2:])} grid, not {(gh, gw)}")
        else:
            patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, D)  # (1, gh*gw, D)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, C, H, W)`` -> input tokens ``(B, N, D)`` laid out ``[CLS, registers..., patches]``."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}; crop or resize it")
        x = self.patch_embed(x)  # (B, gh*gw, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.interpolate_pos_embed(H // p, W // p)
        if self.reg_token is not None:
            x = torch.cat([x[:, :1], self.reg_token.expand(B, -1, -1), x[:, 1:]], dim=1)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # (B, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])  # classify from [CLS]


def save_vit(model: ViT, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (atomically) into ``folder``."""
    from safetensors.torch import save_file

    from vitscope._io import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    cfg = asdict(model.cfg)
    cfg["architecture"] = "vitscope.ViT"
    if extra:
        cfg.update(extra)
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2))
    return folder


_FOLDER_FIX = "pass a folder written by vitscope train / save_vit"


def read_config(path: Path, argument: str = "model") -> dict[str, Any]:
    """The JSON object in ``path``: a `CheckpointError` naming the file for a missing, unreadable, non-UTF-8,
    non-JSON or non-object file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(argument, f"{path} not found", _FOLDER_FIX) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(argument, f"cannot read {path} ({type(exc).__name__})", _FOLDER_FIX) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(argument, f"{path} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})",
                              _FOLDER_FIX) from None
    if not isinstance(data, dict):
        raise CheckpointError(argument, f"{path} holds a JSON {type(data).__name__}, not an object", _FOLDER_FIX)
    return data


def config_error(path: Path, exc: VitscopeError, argument: str = "model") -> CheckpointError:
    """``exc`` (a bad config field) restated as a `CheckpointError` naming the file it came from."""
    return CheckpointError(argument, f"{path}: {exc.argument} {exc.problem}", exc.fix or _FOLDER_FIX)


def check_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], path: Path,
                 argument: str = "model", fix: str = _FOLDER_FIX, what: str = "does not fit its architecture") -> None:
    """``found`` (a checkpoint's tensor shapes) equals ``expected`` (the architecture's), else a
    `CheckpointError` naming the file and the first differences. Called before the model is created."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in sorted(expected.keys() & found.keys())
             if tuple(found[k]) != tuple(expected[k])]
    parts = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {unexpected[:4]}"] if unexpected else [])
    parts += [f"shape {', '.join(wrong[:2])}"] if wrong else []
    if parts:
        raise CheckpointError(argument, f"{path} {what}: {'; '.join(parts)}", fix)


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in a ``.safetensors`` file, read from its header alone (no tensor
    is loaded). Raises safetensors' own error for a damaged file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)
        return {k: (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype())) for k, sl in slices.items()}


def load_vit(folder: str | Path, map_location: str | torch.device = "cpu") -> ViT:
    """Load a ViT saved by `save_vit` (safetensors only: no code runs).

    The config is checked field by field, and the weights' shapes (read from the safetensors header, without
    loading a tensor) against the architecture it describes, before the model is created; any problem is one
    `CheckpointError` naming the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.exists():
            raise CheckpointError("model", f"{p} not found", _FOLDER_FIX)
    try:
        cfg = ViTConfig.from_dict(read_config(cfg_path))
    except CheckpointError:
        raise
    except VitscopeError as exc:
        raise config_error(cfg_path, exc) from None
    try:
        found = {k: shape for k, (shape, _) in safetensors_header(weights).items()}
        check_shapes(cfg.state_shapes(), found, weights)
        model = ViT(cfg)
        model.load_state_dict(load_file(str(weights), device=str(map_location)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, VitscopeError):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError("model", f"{weights} is not a readable safetensors file for this model ({first})",
                              "re-save it with save_vit, or re-download it") from None
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

