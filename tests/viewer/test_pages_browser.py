"""Headless Chromium: a several-image page switches images with its picker (and keys), and the server's pages
are in the viewer's style (not the browser's default serif)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from tests.conftest import make_tiny_vit
from tests.viewer.test_browser import Session, browser  # noqa: F401  (the module-scoped Chromium fixture)
from vitscope.viewer import Viewer

pytestmark = pytest.mark.browser

CURRENT = "() => window.vitscopeViewers[0].current"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Three images on one page, q/k sharpened x12 so each image's [CLS] row is peaked (a random-init ViT
    attends near-uniformly: every image's row would look alike)."""
    model = make_tiny_vit(seed=7)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * 32].mul_(12.0)  # rows of q and k (dim 32)
    vit = vitscope.wrap(model)
    rng = np.random.default_rng(11)
    imgs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    attns = [vitscope.capture(vit, img, queries=None) for img in imgs]
    page = Viewer.combine([Viewer.from_attentions(a, img, title=f"image {i}")
                           for i, (a, img) in enumerate(zip(attns, imgs, strict=True))])
    return page.save(tmp_path_factory.mktemp("gallery") / "gallery.html"), attns


def _cls_row(attn, layer_pos: int) -> np.ndarray:
    return attn.weights[layer_pos, 0, :, 0, attn.patch_slice].numpy().mean(axis=0)  # head mean of [CLS]'s row


def test_picker_switches_the_shown_image_and_keys_still_work(browser, gallery):  # noqa: F811
    path, attns = gallery
    s = Session(browser, path)
    try:
        assert s.page.locator(".vs-image-select option").all_inner_texts() == ["image 0", "image 1", "image 2"]
        assert s.page.evaluate("() => document.activeElement === window.vitscopeViewers[0].root")
        cur = s.current()
        assert (cur["image"], cur["title"], cur["layer"]) == (0, "image 0", 1)
        np.testing.assert_allclose(cur["values"], _cls_row(attns[0], 1), atol=_cls_row(attns[0], 1).max() / 255)
        s.page.select_option(".vs-image-select", "2")  # the picker, as a user picks
        cur = s.current()
        ref = _cls_row(attns[2], 1)
        assert (cur["image"], cur["title"]) == (2, "image 2")
        np.testing.assert_allclose(cur["values"], ref, atol=ref.max() / 255)
        assert np.abs(ref - _cls_row(attns[0], 1)).max() > 10 * ref.max() / 255  # the images' maps differ
        assert s.page.locator(".vs-header h1").inner_text() == "image 2"
        assert s.page.locator(".vs-image-count").inner_text() == "3 of 3"
        s.page.locator(".vitscope-viewer").first.focus()
        s.page.keyboard.press("]")  # next image, wrapping around
        assert s.current()["image"] == 0
        s.page.keyboard.press("ArrowLeft")  # the shortcuts still drive the (rebuilt) viewer
        cur = s.current()
        assert (cur["image"], cur["layer"]) == (0, 0)
        s.page.keyboard.press("[")
        cur = s.current()  # the layer chosen is kept across images
        assert (cur["image"], cur["layer"]) == (2, 0) and s.page.locator(".vs-image-select").input_value() == "2"
        np.testing.assert_allclose(cur["values"], _cls_row(attns[2], 0), atol=_cls_row(attns[2], 0).max() / 255)
        s.page.locator(".vs-image-select").focus()  # on the picker, arrows pick images (the browser's own keys)
        s.page.keyboard.press("ArrowUp")
        assert s.current()["image"] == 1 and s.current()["head"] == "mean"
        s.clean()
    finally:
        s.page.close()


def test_a_single_image_page_has_no_picker(browser, small_page):  # noqa: F811
    s = Session(browser, small_page.path)
    try:
        assert s.page.locator(".vs-image-select").count() == 0 and s.current()["image"] == 0
        s.clean()
    finally:
        s.page.close()


def _font(page, selector: str) -> str:
    return page.evaluate(f"() => getComputedStyle(document.querySelector({selector!r})).fontFamily")


def test_server_pages_use_the_viewers_font(browser, tmp_path):  # noqa: F811
    """The upload page and an error page (as a browser gets them) render in the viewer's sans-serif font; the
    browser's default would be a serif ("Times New Roman" or similar)."""
    from vitscope.viewer.server import ViewerServer

    srv = ViewerServer(make_tiny_vit(), port=0)
    try:
        pages = {"index.html": srv.index_page(), "error.html": srv.index_page("415 Unsupported Media Type: x")}
    finally:
        srv.server_close()
    for name, html in pages.items():
        (tmp_path / name).write_text(html, encoding="utf-8")
        page = browser.new_page()
        try:
            page.goto((tmp_path / name).as_uri())
            for selector in ("body", ".vs-intro p", ".vitscope-upload", ".vitscope-upload button"):
                font = _font(page, selector)
                assert font.startswith("system-ui") and "serif" in font and "Times" not in font, (name, selector)
        finally:
            page.close()
