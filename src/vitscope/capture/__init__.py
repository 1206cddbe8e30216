"""How attention leaves the model: hooks on q/k taps, recomputed rows, always cleaned up."""

from vitscope.capture.core import CaptureResult, attention_rows, capture, capture_full, resolve_layers
from vitscope.capture.hooks import eval_mode, record_block_outputs, record_sites

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
