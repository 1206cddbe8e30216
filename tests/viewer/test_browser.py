"""The viewer in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

The page is loaded from a ``file://`` URL with every other request aborted and recorded. What the page
draws is compared with the attention computed in Python: the values it exposes (``viewer.current``) and
the pixels read back from its canvas, turned back into colormap indices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch

from vitscope.attentions import Attentions
from vitscope.viewer.pack import rollout_all_rows
from vitscope.viz import threshold_mask

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
LUT = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8).astype(float)

CURRENT = "() => window.vitscopeViewers[0].current"
SAMPLE = """() => {
  const v = window.vitscopeViewers[0], c = document.createElement("canvas");  // a copy: one readback each
  c.width = v.canvas.width;
  c.height = v.canvas.height;
  const ctx = c.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(v.canvas, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data, out = [];
  for (let r = 0; r < v.rows; r++) for (let k = 0; k < v.cols; k++) {
    const x = Math.floor((k + 0.5) * c.width / v.cols), y = Math.floor((r + 0.5) * c.height / v.rows);
    const i = 4 * (y * c.width + x);
    out.push([d[i], d[i + 1], d[i + 2], d[i + 3]]);
  }
  return out;
}"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI (apt-get install chromium)")
        pytest.skip(f"headless Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=ARGS, viewport={"width": 1100, "height": 900},
        )
    except Exception:
        pw.stop()
        raise
    try:
        yield context
    finally:
        context.close()
        pw.stop()


class Session:
    """One page plus everything it logged: console messages, page errors, network attempts."""

    def __init__(self, context: Any, path: Path) -> None:
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page = context.new_page()
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", self._route)
        self.page.goto(path.as_uri())
        self.page.wait_for_function("window.vitscopeViewers && window.vitscopeViewers.length === 1", timeout=20_000)

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.requests.append(url)
            route.abort()

    def current(self) -> dict[str, Any]:
        return self.page.evaluate(CURRENT)

    def set_range(self, selector: str, value: float) -> None:
        """Move a slider as a user would: set its value and fire its ``input`` event."""
        self.page.eval_on_selector(
            selector, "(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', {bubbles: true})); }",
            value,
        )

    def patch_point(self, row: int, col: int) -> tuple[float, float]:
        box = self.page.locator(".vs-canvas").bounding_box()
        v = self.page.evaluate("() => [window.vitscopeViewers[0].rows, window.vitscopeViewers[0].cols]")
        return box["x"] + (col + 0.5) * box["width"] / v[1], box["y"] + (row + 0.5) * box["height"] / v[0]

    def hover(self, row: int, col: int) -> dict[str, Any]:
        self.page.mouse.move(*self.patch_point(row, col))
        return self.current()

    def clean(self) -> None:
        bad = [m for m in self.console if m[0] in ("error", "warning")]
        assert bad == [] and self.errors == [], (bad, self.errors)
        assert self.requests == []


@pytest.fixture
def small(browser, small_page) -> Iterator[Session]:
    s = Session(browser, small_page.path)
    yield s
    s.page.close()


def _lut_index(rgb: np.ndarray) -> np.ndarray:
    return np.abs(rgb[:, None, :3] - LUT[None]).sum(axis=-1).argmin(axis=1)


def _token(attn, row: int, col: int) -> int:
    return attn.patch_index(row, col)


def _raw_row(attn, layer_pos: int, token: int, head: int | str = "mean") -> np.ndarray:
    w = attn.weights[layer_pos, 0, :, token, attn.patch_slice].numpy()  # (heads, patches)
    return w.mean(axis=0) if head == "mean" else w.max(axis=0) if head == "max" else w[head]


def _close(got: list[float], ref: np.ndarray, scale: float) -> None:
    # per-row uint8 packing: error <= row max / 510 per head (so also for their mean)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=scale / 510 + 1e-6)


def test_hover_two_patches_draws_their_rows(small, small_page):
    attn = small_page.attn
    small.set_range(".vs-opacity", 1.0)  # opaque, block patches: canvas pixels are LUT colours
    drawn = []
    for r, c in [(1, 2), (3, 5)]:
        cur = small.hover(r, c)
        tok = _token(attn, r, c)
        assert cur["query"] == tok and cur["hoverKey"] == tok and cur["layer"] == 1 and cur["head"] == "mean"
        ref = _raw_row(attn, 1, tok)
        scale = attn.weights[1, 0, :, tok].max().item()
        _close(cur["values"], ref, scale)
        # the canvas, read back at each patch centre, shows each value's colour on the min-max scale
        px = np.asarray(small.page.evaluate(SAMPLE), dtype=float)  # (patches, RGBA)
        assert np.all(px[:, 3] == 255)
        expected = np.rint((ref - ref.min()) / (ref.max() - ref.min()) * 255)
        assert np.abs(_lut_index(px) - expected).max() <= 2
        drawn.append(px)
        text = small.page.locator(".vs-readout").inner_text()
        assert f"patch ({r}, {c})" in text and "layer 1, head mean" in text
    assert np.abs(drawn[0] - drawn[1]).max() > 50  # the two maps differ
    small.clean()


def test_switch_layer_and_head(small, small_page):
    attn = small_page.attn
    small.page.locator(".vs-follow").uncheck()
    small.page.select_option(".vs-query", "2")  # the second register
    small.page.select_option(".vs-head", "3")
    small.set_range(".vs-layer", 0)
    cur = small.hover(0, 0)  # not following: hovering reads values only
    assert (cur["layer"], cur["head"], cur["query"], cur["hoverKey"]) == (0, 3, 2, _token(attn, 0, 0))
    ref = _raw_row(attn, 0, 2, head=3)
    _close(cur["values"], ref, attn.weights[0, 0, 3, 2].max().item())
    readout = small.page.locator(".vs-readout").inner_text()
    shown = re.search(r"key patch \(0, 0\): ([-+0-9.e]+)", readout)
    assert "query register 1" in readout and shown is not None
    assert float(shown.group(1)) == pytest.approx(cur["values"][0], rel=0.01)  # the number under the cursor
    small.page.select_option(".vs-head", "max")
    small.page.locator(".vs-viewer, .vitscope-viewer").first.focus()
    small.page.keyboard.press("ArrowRight")  # next layer
    cur = small.current()
    assert (cur["layer"], cur["head"]) == (1, "max")
    _close(cur["values"], _raw_row(attn, 1, 2, head="max"), attn.weights[1, 0, :, 2].max().item())
    small.clean()


def test_click_pins_a_patch_query_for_rollout_and_the_mask(small, small_page):
    attn = small_page.attn
    small.page.select_option(".vs-method", "rollout")
    small.page.mouse.click(*small.patch_point(2, 4))
    small.page.mouse.move(0, 0)  # leave the canvas: the pinned query stays
    cur = small.current()
    tok = _token(attn, 2, 4)
    assert cur["method"] == "rollout" and cur["query"] == tok and cur["hoverKey"] is None
    roll = rollout_all_rows(attn)[1, tok].numpy()
    _close(cur["values"], roll[attn.patch_slice], roll.max())
    small.page.locator(".vs-mask").check()
    small.set_range(".vs-tau", 0.5)
    cur = small.current()
    mask = np.asarray(cur["mask"], dtype=bool)
    np.testing.assert_array_equal(mask, threshold_mask(np.asarray(cur["values"])[None], 0.5)[0])
    assert 0 < mask.sum() < mask.size
    px = np.asarray(small.page.evaluate(SAMPLE), dtype=float)
    assert np.all(px[~mask, :3] == 0) and np.all(px[~mask, 3] == 200)  # outside the mask: darkened
    assert np.all(px[mask, :3].sum(axis=1) > 0)
    small.clean()


def test_vits16_page_follows_24_hovers_offline(browser, vits_page):
    """ViT-S/16 at 224 px with every layer and head: each hover redraws the hovered patch's row.

    (How fast: benchmarks/viewer_page.py; tests never assert timings.)
    """
    s = Session(browser, vits_page.path)
    attn = vits_page.attn
    seen = set()
    patches = [(r, c) for r in range(0, 14, 3) for c in range(1, 14, 3)][:24]
    for r, c in patches:
        cur = s.hover(r, c)
        seen.add(cur["query"])
        assert cur["query"] == _token(attn, r, c)
    tok = _token(attn, r, c)
    _close(cur["values"], _raw_row(attn, 11, tok), attn.weights[11, 0, :, tok].max().item())
    timings = s.page.evaluate("() => window.vitscopeViewers[0].timings.slice(1)")  # the first draw is at load
    assert len(seen) == 24 and len(timings) >= 24  # one redraw per hover
    s.clean()
    s.page.close()


def test_model_without_cls_starts_on_a_patch_query(browser, tmp_path, no_cls_attn):
    from vitscope.viewer import Viewer

    attn = no_cls_attn
    path = Viewer.from_attentions(attn, np.full((8, 12, 3), 0.5)).save(tmp_path / "nocls.html")
    s = Session(browser, path)
    cur = s.current()
    assert cur["query"] == 0 and cur["layer"] == 1
    _close(cur["values"], _raw_row(attn, 1, 0), attn.weights[1, 0, :, 0].max().item())
    assert s.page.locator(".vs-query").input_value() == "0"
    cur = s.hover(1, 2)
    assert cur["query"] == 5
    s.clean()
    s.page.close()


def test_suffix_tokens_are_labelled_and_queryable(browser, tmp_path):
    """A YOLOS-like layout [cls, 2x3 patches, det, det]: the query list offers the detection tokens by name, a
    det query draws its patch columns (not the det columns), the readout names it; on the old page the det tokens
    were missing from the list and read as patches (2, 0) and (2, 1) of a 2-row grid."""
    from vitscope.viewer import Viewer

    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 1, 3, 9, 9, generator=g) ** 4
    w = w / w.sum(dim=-1, keepdim=True)  # (layer, batch, head, query, key), rows sum to 1
    attn = Attentions(weights=w, prefix=("cls",), grid=(2, 3), patch_size=(4, 4), image_size=(8, 12),
                      layers=(0, 1), heads=(0, 1, 2), queries=None, num_layers=2, num_heads=3, suffix=("det", "det"))
    path = Viewer.from_attentions(attn, np.full((8, 12, 3), 0.5)).save(tmp_path / "suffix.html")
    s = Session(browser, path)
    labels = s.page.locator(".vs-query option:not([hidden])").all_text_contents()
    assert labels[:3] == ["[CLS]", "det 0", "det 1"]
    s.page.locator(".vs-query").select_option("8")
    cur = s.current()
    assert cur["query"] == 8 and len(cur["values"]) == 6
    _close(cur["values"], _raw_row(attn, 1, 8), attn.weights[1, 0, :, 8].max().item())
    assert "query det 1" in s.page.locator(".vs-readout").inner_text()
    s.clean()
    s.page.close()
