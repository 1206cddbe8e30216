"""The interactive viewer: one self-contained HTML page per image (or per set of images, with a picker) (works offline, from ``file://``, in
Jupyter), and a small local server (`vitscope.viewer.server`) where users upload their own images.

Python validates and packs (`pack`), a real JavaScript file (``viewer.js``, package data) renders.
"""

from __future__ import annotations

from vitscope.viewer.pack import BUDGET_BYTES, pack, rollout_all_rows
from vitscope.viewer.page import Viewer, render_page, view, view_many, view_video

__all__ = ["BUDGET_BYTES", "Viewer", "pack", "render_page", "rollout_all_rows", "view", "view_many", "view_video"]
