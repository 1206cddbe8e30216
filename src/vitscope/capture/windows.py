"""Windowed attention layers (SAM's image encoder, ViTDet): refused per layer, the global layers stay capturable.

A windowed layer attends within local windows: its attention call has fewer keys than the image has tokens and
its batch is the images times the windows, so it has no global ``(N, N)`` map. Two checks, both one line:

- before the forward pass, the layers the adapter declares windowed (`ModelInfo.layer_kinds`, read from the
  blocks' ``window_size``) are refused if selected, naming the global layers to select instead;
- during it, a layer whose call *measures* as windowed (fewer keys than tokens, batch a multiple of the images)
  is refused with that reason whatever was declared (`windowed_call_error`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vitscope.errors import CaptureError

if TYPE_CHECKING:
    from vitscope.adapters.base import ModelInfo
    from vitscope.capture.intercept import AttentionCall

__all__ = ["check_windowed_layers", "windowed_call_error"]


def _layers_fix(global_layers: Sequence[int]) -> str:
    g = list(global_layers)
    return f"select its global layers: layers={g} (CLI: --layers {','.join(str(i) for i in g)})"


def check_windowed_layers(info: ModelInfo, layer_ids: Sequence[int], default: bool) -> None:
    """Refuse, before running, selected layers declared windowed; ``default``: the layers were not given."""
    windowed = [i for i in layer_ids if i in set(info.windowed_layers)]
    if not windowed:
        return
    chosen = "every layer is selected by default, and " if default else ""
    raise CaptureError(
        "layers", f"{chosen}layers {windowed} of {info.name} attend within local windows (each token sees only its "
        "window), so they have no global attention map", _layers_fix(info.global_layers),
    )


def windowed_call_error(call: AttentionCall, expected: int, batch: int, info: ModelInfo | None = None
                        ) -> CaptureError | None:
    """A one-line error if ``call`` measures as windowed attention: fewer keys than the ``expected`` tokens, in a
    batch that is the ``batch`` images times the windows. ``None`` when it does not look windowed."""
    B, _, _, Nk = call.shape
    if not (Nk < expected and batch > 0 and B % batch == 0 and batch < B):
        return None
    fix = _layers_fix(info.global_layers) if info is not None and info.windowed_layers else (
        "capture only the layers that attend globally (layers=[...], CLI --layers)")
    return CaptureError(
        "layers", f"layer {call.layer} attends within {B // batch} local windows of {Nk} tokens (not over all "
        f"{expected} tokens), so it has no global attention map", fix,
    )
