"""How attention leaves the model: hooks on q/k taps, recomputed rows, always cleaned up."""

from vitscope.capture.core import CaptureResult, attention_rows, capture_full, resolve_layers
from vitscope.capture.hooks import eval_mode, record_block_outputs, record_sites
from vitscope.capture.padded import capture  # images of one geometry, or a padded batch of several

# ``vitscope.capture`` (the attribute) is this function, which hides the subpackage from
# ``import vitscope.capture.core as core``: Python falls back to ``sys.modules[f"{obj.__name__}.core"]`` when the
# attribute is missing, so the function carries the package's name and every submodule resolves.
capture.__name__ = __name__

__all__ = [
    "CaptureResult",
    "attention_rows",
    "capture",
    "capture_full",
    "eval_mode",
    "record_block_outputs",
    "record_sites",
    "resolve_layers",
]
