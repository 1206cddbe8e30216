"""Adapter for vitscope's own ViT (`vitscope.models.vit.ViT`) and its bundled models."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vitscope.adapters.base import AttentionSite, ModelInfo, Preprocess, VitModel
from vitscope.errors import CheckpointError

#: Models shipped inside the package: ``vitscope.load("vitscope:<name>")``.
BUNDLED = ("shapes",)


def from_vit(model: object, name: str = "vitscope-vit") -> VitModel:
    from vitscope.models.vit import Attention, ViT

    if not isinstance(model, ViT):
        raise TypeError(f"expected a vitscope ViT, got {type(model).__name__}")
    cfg = model.cfg
    sites = []
    for i, blk in enumerate(model.blocks):
        attn = blk.get_submodule("attn")
        assert isinstance(attn, Attention)
        sites.append(
            AttentionSite(
                layer=i, block=blk, attn=attn, num_heads=cfg.heads,
            )
        )
    info = ModelInfo(
        name=name, family="vitscope", num_layers=cfg.depth, num_heads=cfg.heads, embed_dim=cfg.dim,
        patch_size=(cfg.patch_size, cfg.patch_size),
        prefix=("cls",) + ("register",) * cfg.num_registers,
        preprocess=Preprocess(
            image_size=cfg.image_size, mean=tuple(cfg.mean) * (3 // len(cfg.mean)),  # type: ignore[arg-type]
            std=tuple(cfg.std) * (3 // len(cfg.std)),  # type: ignore[arg-type]
            policy="resize", resample="bilinear", dynamic_size=True, channels=cfg.in_chans,
        ),
        num_classes=cfg.num_classes or None, labels=cfg.labels,
    )
    return VitModel(model, info, sites, readout=lambda x: model.head(model.norm(x)[:, 0]),
                    embed=lambda x: model.norm(x)[:, 0], final_norm=model.norm)


def bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        raise CheckpointError("model", f"no bundled model {name!r}", f"choose one of {', '.join(BUNDLED)}")
    folder = Path(str(resources.files("vitscope") / "data" / name))
    if not (folder / "model.safetensors").exists():
        raise CheckpointError(
            "model", f"bundled model {name!r} is missing from the installation ({folder})",
            "reinstall vitscope, or train one with `vitscope train --preset shapes`",
        )
    return folder


def load_folder(folder: str | Path, name: str | None = None) -> VitModel:
    from vitscope.models.vit import load_vit

    folder = Path(folder)
    return from_vit(load_vit(folder), name=name or folder.name)
