"""Maps of a video, per frame: any registered method on a video ViT, split by token frame, and where in time the
model looks (the temporal profile).

A video's tokens are ``T'`` frames of patches in order ``(T', rows, cols)`` (``T' = T / tubelet``); vitscope lays
them out on the stacked grid ``(T' * rows, cols)`` (`vitscope.layout.TokenLayout`), so every image method runs on
a video unchanged: raw [CLS] attention (or, for a model without [CLS] such as VideoMAE and V-JEPA 2, the mean
over every patch query row of every frame, as for SigLIP), head fusion, rollout, flow, and the gradient methods
with a class target. `video_maps` returns the map as ``(B, T', rows, cols)``; token frame ``t'`` covers input
frames ``t' * tubelet .. (t' + 1) * tubelet - 1``.

The temporal profile is the map's mass per token frame, ``profile[b, t'] = sum(map[b, t'].clamp(min=0)) / sum(
map[b].clamp(min=0))`` (sums to 1 per video; a map that is zero everywhere gives a uniform profile). For the raw
[CLS] map it is the [CLS] query's attention mass on each frame's patches, renormalised over the patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vitscope.errors import VitscopeError
from vitscope.layout import per_frame

__all__ = ["VideoMaps", "temporal_profile", "video_maps"]


@dataclass
class VideoMaps:
    """One method's maps of a batch of videos.

    Attributes:
        map: ``(B, T', rows, cols)`` float32: token frame, then the frame's patch grid.
        profile: ``(B, T')`` the map's mass per token frame (`temporal_profile`), summing to 1 per video.
        tubelet: input frames per token frame.
        extras: the method's extras split by frame where they are maps (``heads``: ``(B, H, T', rows, cols)``).
        meta: the method and its settings as used.
    """

    map: torch.Tensor
    profile: torch.Tensor
    tubelet: int = 1
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        """Token frames ``T'``."""
        return int(self.map.shape[1])


def temporal_profile(maps: torch.Tensor) -> torch.Tensor:
    """``(B, T', rows, cols)`` maps -> ``(B, T')``: each frame's share of the map's (non-negative) mass."""
    if maps.dim() != 4:
        raise VitscopeError("maps", f"expected (B, T', rows, cols) maps, got shape {tuple(maps.shape)}",
                            "pass video_maps(...).map")
    mass = maps.detach().float().clamp(min=0).sum(dim=(-2, -1))  # (B, T')
    total = mass.sum(dim=1, keepdim=True)
    uniform = torch.full_like(mass, 1.0 / mass.shape[1])
    return torch.where(total > 0, mass / total.clamp(min=torch.finfo(torch.float32).tiny), uniform)


def video_maps(
    model: Any,
    videos: Any,
    method: str = "cls",
    *,
    policy: Any = None,
    size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    **params: Any,
) -> VideoMaps:
    """One method's maps of ``videos``, per frame, and their temporal profile.

    Args:
        model: a video `VitModel` (``vitscope.load("hf:<VideoMAE/ViViT/V-JEPA 2 folder>")``), a spec or a module.
        videos: a frames folder, a list of frames, a list of folders (a batch) or pixel values ``(B, T, C, H, W)``
            (`vitscope.video.preprocess_video`).
        method: a registered method (`vitscope.methods.api.method_names`); its ``**params`` as for `vitscope.maps`.

    Returns:
        `VideoMaps`: ``map`` ``(B, T', rows, cols)``, ``profile`` ``(B, T')``.

    Example:
        >>> r = vitscope.video_maps("hf:/path/to/videomae", "clip_frames/")  # doctest: +SKIP
        >>> r.map.shape, r.profile.shape  # (1, 8, 14, 14), (1, 8)  # doctest: +SKIP
    """
    from vitscope.capture.prepare import prepare
    from vitscope.methods.api import check_params, compute, get_method
    from vitscope.methods.registry import MapContext

    spec = get_method(method)
    check_params(spec, params)
    vit, pixels = prepare(model, videos, policy=policy, size=size, device=device)
    info = vit.info
    if not info.frames:
        raise VitscopeError("model", f"{info.name} is an image model: it has no frames",
                            "use vitscope.maps(model, images, method) for images")
    result = compute(MapContext(vit, pixels), method, **params)
    T = info.token_frames
    stacked = per_frame(result.map, T)  # (B, T', rows, cols)
    extras = {k: per_frame(v, T) if v.dim() >= 2 and v.shape[-2] % T == 0 and v.shape[-2:] == result.map.shape[-2:]
              else v for k, v in result.extras.items()}
    return VideoMaps(map=stacked, profile=temporal_profile(stacked), tubelet=info.tubelet, extras=extras,
                     meta={**result.meta, "frames": T, "tubelet": info.tubelet})
