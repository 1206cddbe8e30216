"""The video viewer's time slider in headless Chromium: the slider, play button, hover and head/layer selection
of a random-weight VideoMAE page (8 input frames, tubelet 2: 4 token frames of a non-square 4 x 6 grid, no
[CLS]), compared with the attention of the family's own eager softmax (transformers, ``attn_implementation=
"eager"``, ``output_attentions=True``) on the same pixels, independently of vitscope's capture.

The model's q/k are sharpened (`tests.capture.families.sharpen`, via `tests.capture.test_video.build`) so its
rows are peaked: the fixture asserts the reference's mean row maximum is above 0.2 (near-uniform rows would let a
wrong frame or token pass). Token order of the reference is the model's own, ``(T', rows, cols)``, time slowest.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.capture.test_video import build
from tests.viewer.test_browser import SAMPLE, Session, _lut_index, browser  # noqa: F401  (browser: the shared fixture)
from vitscope.viewer import Viewer, view_video

pytestmark = pytest.mark.browser

THUMB = """(tf) => {
  const t = window.vitscopeViewers[0].thumbs[tf].canvas, c = document.createElement("canvas");  // a copy: one readback
  c.width = t.width;
  c.height = t.height;
  const ctx = c.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(t, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data, out = [];
  for (let i = 0; i < d.length; i += 4) out.push([d[i], d[i + 1], d[i + 2], d[i + 3]]);
  return out;
}"""


@dataclass
class VideoPage:
    path: Path
    viewer: Viewer
    ref: np.ndarray  # (L, H, N, N): the eager model's attention of the one video
    frames: int  # token frames T'
    tubelet: int
    grid: tuple[int, int]  # one frame's (rows, cols)

    def row(self, layer: int, token: int, head: int | str = "mean") -> np.ndarray:
        """The reference row of ``token`` over every patch of every frame, ``(T' * rows * cols,)``."""
        w = self.ref[layer, :, token]  # (H, N); no prefix or suffix tokens in VideoMAE
        return w.mean(axis=0) if head == "mean" else w[head]

    def token(self, frame: int, r: int, c: int) -> int:
        """The space-time token of patch (r, c) in the token frame covering input frame ``frame``."""
        rows, cols = self.grid
        return (frame // self.tubelet * rows + r) * cols + c

    def scale(self, layer: int, token: int) -> float:
        return float(self.ref[layer, :, token].max())


@pytest.fixture(scope="module")
def video_page(tmp_path_factory: pytest.TempPathFactory) -> VideoPage:
    b = build("videomae", "wide")  # 8 frames of 32 x 48 px, tubelet 2, patch 8: 4 token frames of 4 x 6
    x = b.pixels(1, seed=4)  # (1, T, C, H, W)
    ref, _ = b.reference(x)  # (L, B, H, N, N)
    assert float(ref.amax(-1).mean()) > 0.2  # peaked rows (sharpened q/k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        viewer = view_video(x, b.vit, title="clip")
    path = viewer.save(tmp_path_factory.mktemp("video") / "clip.html")
    return VideoPage(path, viewer, ref[:, 0].double().numpy(), 4, 2, (4, 6))


@pytest.fixture
def clip(browser: Any, video_page: VideoPage) -> Iterator[Session]:  # noqa: F811
    s = Session(browser, video_page.path)
    yield s
    s.page.close()


def _close(got: Any, ref: np.ndarray, scale: float) -> None:
    # per-row uint8 packing: error <= row max / 510 per head (so also for their mean)
    np.testing.assert_allclose(np.asarray(got, dtype=float), ref, rtol=0, atol=scale / 510 + 1e-6)


def _expected_index(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint((values - lo) / (hi - lo) * 255)


def test_hover_a_patch_draws_its_row_on_every_frame(clip: Session, video_page: VideoPage) -> None:
    """Hovering patch (r, c) at slider frame f queries the space-time token of token frame f // 2: the overlay is
    that row's part on the shown frame, each thumbnail its part on its own frame (one colour scale over the clip),
    the bars the row's mass per frame; the readout prints the value under the cursor."""
    vp = video_page
    clip.set_range(".vs-opacity", 1.0)  # opaque: canvas pixels are the colormap's colours
    per = vp.grid[0] * vp.grid[1]
    drawn = []
    for f, r, c in [(0, 1, 2), (5, 3, 4), (7, 0, 5)]:
        clip.set_range(".vs-frame", f)
        cur = clip.hover(r, c)
        tok = vp.token(f, r, c)
        tf = f // vp.tubelet
        assert (cur["frame"], cur["tokenFrame"], cur["query"], cur["hoverKey"]) == (f, tf, tok, tok)
        assert cur["layer"] == 1 and cur["head"] == "mean"
        want = vp.row(1, tok)  # (T' * rows * cols,)
        _close(cur["frameValues"], want, vp.scale(1, tok))
        _close(cur["values"], want[tf * per:(tf + 1) * per], vp.scale(1, tok))
        lo, hi = want.min(), want.max()
        px = np.asarray(clip.page.evaluate(SAMPLE), dtype=float)  # (rows * cols, RGBA) at the patch centres
        assert np.all(px[:, 3] == 255)
        assert np.abs(_lut_index(px) - _expected_index(want[tf * per:(tf + 1) * per], lo, hi)).max() <= 2
        for t in range(vp.frames):  # the strip: every token frame on the same scale
            thumb = np.asarray(clip.page.evaluate(THUMB, t), dtype=float)
            assert np.abs(_lut_index(thumb) - _expected_index(want[t * per:(t + 1) * per], lo, hi)).max() <= 2
        mass = want.reshape(vp.frames, per).sum(axis=1)
        np.testing.assert_allclose(cur["profile"], mass / mass.sum(), atol=0.01)
        labels = clip.page.locator(".vs-thumb-label").all_text_contents()
        shown = [float(m.group(1)) for m in (re.search(r"([0-9.]+)%", s) for s in labels) if m]
        np.testing.assert_allclose(shown, 100 * mass / mass.sum(), atol=0.6)
        text = clip.page.locator(".vs-readout").inner_text()
        span = f"{tf * 2}-{tf * 2 + 1}"
        number = re.search(rf"key frame {span} patch \({r}, {c}\): ([-+0-9.e]+)", text)
        assert f"query frame {span} patch ({r}, {c})" in text and number is not None, text
        assert float(number.group(1)) == pytest.approx(want[tok], rel=0.01, abs=vp.scale(1, tok) / 500)
        drawn.append(px)
    assert np.abs(drawn[0] - drawn[1]).max() > 50  # the maps differ
    clip.clean()


def test_slider_at_frame_t_shows_frame_ts_tokens(clip: Session, video_page: VideoPage) -> None:
    """A pinned query; the slider over all 8 input frames: at frame t the overlay holds the row's keys of token
    frame t // 2 (tubelet 2) and the picture is input frame t. Slicing by t, t + 1 or t - 1 (off by one), or by t
    itself (tubelet ignored) gives other keys: the parts of different token frames differ below."""
    vp = video_page
    per = vp.grid[0] * vp.grid[1]
    clip.page.mouse.click(*clip.patch_point(2, 3))  # pins token frame 0's patch (2, 3)
    clip.page.mouse.move(0, 0)
    q = vp.token(0, 2, 3)
    want = vp.row(1, q).reshape(vp.frames, per)
    for a in range(vp.frames):  # each token frame's part is told apart from every other at this tolerance
        for b in range(a + 1, vp.frames):
            assert np.abs(want[a] - want[b]).max() > 10 * vp.scale(1, q) / 510
    images = video_page.viewer.payload["video"]["images"]
    assert len(set(images)) == 8
    for t in range(8):
        clip.set_range(".vs-frame", t)
        cur = clip.current()
        assert (cur["frame"], cur["tokenFrame"], cur["query"]) == (t, t // 2, q)
        _close(cur["values"], want[t // 2], vp.scale(1, q))
        assert clip.page.locator(".vs-image").get_attribute("src") == images[t]
        assert clip.page.locator(".vs-frame-label").inner_text().startswith(f"{t} / 7 \u00b7 token frame {t // 2}")
        active, marked = clip.page.locator(".vs-thumb").evaluate_all(
            "els => [els.map(e => e.classList.contains('vs-thumb-active')), "
            "els.map(e => e.classList.contains('vs-thumb-query'))]")
        assert active == [i == t // 2 for i in range(4)] and marked == [True, False, False, False]
    clip.page.locator(".vs-thumb").nth(1).click()  # a thumbnail jumps to its first input frame
    assert clip.current()["frame"] == 2
    clip.page.locator(".vitscope-viewer").focus()
    clip.page.keyboard.press(".")
    assert clip.current()["frame"] == 3
    clip.page.keyboard.press(",")
    clip.page.keyboard.press(",")
    assert clip.current()["frame"] == 1
    clip.clean()


def test_head_layer_and_rollout_on_a_space_time_query(clip: Session, video_page: VideoPage) -> None:
    """Head and layer selection as on an image; a hovered patch of frame 6 (token frame 3) as the query of one
    head, of the other layer, and of rollout (by hand from the eager attention: 0.5 A + 0.5 I, heads mean,
    rows renormalised, multiplied through the layers)."""
    vp = video_page
    per = vp.grid[0] * vp.grid[1]
    clip.set_range(".vs-frame", 6)
    clip.page.select_option(".vs-head", "1")
    clip.set_range(".vs-layer", 0)
    cur = clip.hover(1, 1)
    tok = vp.token(6, 1, 1)
    assert (cur["layer"], cur["head"], cur["query"], cur["tokenFrame"]) == (0, 1, tok, 3)
    want = vp.row(0, tok, head=1)
    _close(cur["frameValues"], want, vp.scale(0, tok))
    _close(cur["values"], want[3 * per:4 * per], vp.scale(0, tok))
    clip.page.mouse.click(*clip.patch_point(1, 1))  # pin it
    clip.page.select_option(".vs-method", "rollout")
    N = vp.ref.shape[-1]
    roll = np.eye(N)
    for layer, a in enumerate(vp.ref):  # (H, N, N) per layer: the page's rollout through this layer
        m = 0.5 * a.mean(axis=0) + 0.5 * np.eye(N)
        roll = (m / m.sum(axis=-1, keepdims=True)) @ roll
        clip.set_range(".vs-layer", layer)
        cur = clip.current()
        assert cur["method"] == "rollout" and cur["query"] == tok and cur["layer"] == layer
        _close(cur["frameValues"], roll[tok], roll[tok].max())
    clip.clean()


def test_play_steps_through_the_frames_and_pauses(clip: Session) -> None:
    clip.page.locator(".vs-play").click()
    for _ in range(100):  # up to 10 s (a polling wait: the page's CSP forbids wait_for_function's eval)
        if clip.current()["frame"] >= 2:
            break
        clip.page.wait_for_timeout(100)
    assert clip.current()["frame"] >= 2
    assert clip.page.locator(".vs-play").inner_text() == "pause"
    clip.page.locator(".vs-play").click()
    frame = clip.current()["frame"]
    clip.page.wait_for_timeout(600)  # two steps' time: paused, it stays
    assert clip.current()["frame"] == frame and clip.page.locator(".vs-play").inner_text() == "play"
    clip.clean()


def test_an_image_page_has_no_time_axis(browser: Any, small_page: Any) -> None:  # noqa: F811
    """The image viewer is unchanged by the video code: no slider, no strip, the whole grid in ``values``."""
    s = Session(browser, small_page.path)
    assert s.page.locator(".vs-frame").count() == 0 and s.page.locator(".vs-thumb").count() == 0
    cur = s.current()
    assert "frame" not in cur and len(cur["values"]) == 4 * 6
    s.clean()
    s.page.close()
