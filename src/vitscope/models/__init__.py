"""vitscope's own ViT: the model `vitscope.train` trains and `vitscope.adapters` loads (bundled ``vitscope:shapes``)."""

from vitscope.models.vit import ViT, ViTConfig, load_vit, save_vit

__all__ = ["ViT", "ViTConfig", "load_vit", "save_vit"]
