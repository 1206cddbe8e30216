"""Windowed attention layers (SAM's image encoder, ViTDet): refused per layer, the global layers stay capturable.

A windowed layer attends within local windows: its attention call has fewer keys than the image has tokens and
its batch is the images times the windows, so it has no global ``(N, N)`` map. Two checks, both one line:

- before the forward pass, the layers the adapter declares windowed (`ModelInfo.layer_kinds`, read from the
  blocks' ``window_size``) are refused if selected, naming the global layers to select instead;
- during it, a layer whose call *measures* as windowed (fewer keys than tokens, batch a multiple of the images)
  is refused with that reason whatever was declared (`vitscope.capture.intercept.windowed_call_error`, asked by
  the attention engine when a call's batch axis is not the images').
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vitscope.errors import CaptureError

if TYPE_CHECKING:
    from vitscope.adapters.base import ModelInfo

__all__ = ["check_windowed_layers"]


def _layers_fix(global_layers: Sequence[int]) -> str:
    g = list(global_layers)
    return f"select its global layers: layers={g} (CLI: --layers {','.join(str(i) for i in g)})"


def check_windowed_layers(info: ModelInfo, layer_ids: Sequence[int], default: bool) -> None:
    """Refuse, before running, selected layers declared windowed; ``default``: the layers were not given."""
    windowed = [i for i in layer_ids if i in set(info.windowed_layers)]
    if not windowed:
        return
    factorised = [i for i in windowed if info.layer_kinds[i] == "factorised"]
    if factorised:
        raise CaptureError(
            "layers", f"layers {factorised} of {info.name} factorise attention (divided space-time: each token "
            "attends over its own patch's frames, then over its own frame's patches), so no layer has one "
            "space-time attention map", "use a joint space-time video ViT (VideoMAE, ViViT, V-JEPA 2)" if len(factorised) == len(info.layer_kinds)
            else _layers_fix(info.global_layers),
        )
    chosen = "every layer is selected by default, and " if default else ""
    raise CaptureError(
        "layers", f"{chosen}layers {windowed} of {info.name} attend within local windows (each token sees only its "
        "window), so they have no global attention map", _layers_fix(info.global_layers),
    )
