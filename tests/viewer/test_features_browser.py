"""The viewer's feature tabs in headless Chromium: the PCA tab draws `pca`'s colours, the similarity tab draws
`similarity` for the clicked (or hovered) patch; the packed data is small; a page without features still works.

References are the library's methods on the same model and pixels (`vitscope.maps`), themselves tested against
numpy in ``tests/methods/test_features.py``; the page's numbers are float16 round trips of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from tests.conftest import make_tiny_vit
from tests.viewer.test_browser import LUT, SAMPLE, Session, browser  # noqa: F401  (browser: the shared fixture)
from vitscope.capture.prepare import prepare
from vitscope.viewer import view
from vitscope.viewer.pack import decode_array, pack_features, packed_similarity

pytestmark = pytest.mark.browser


@dataclass
class FeaturePage:
    path: Path
    vit: Any
    pixels: torch.Tensor


@pytest.fixture(scope="module")
def feature_page(tmp_path_factory: pytest.TempPathFactory) -> FeaturePage:
    """[CLS] + 2 registers, a 4 x 6 grid (input 32 x 48), dim 32: the packed vectors are the features, exactly."""
    vit = vitscope.wrap(make_tiny_vit(num_registers=2, image_size=(32, 48), seed=7))
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    _, pixels = prepare(vit, img, size=(32, 48))
    page = view(img, vit, size=(32, 48), title="features")
    path = page.save(tmp_path_factory.mktemp("viewer") / "features.html")
    return FeaturePage(path, vit, pixels)


@pytest.fixture
def session(browser, feature_page) -> Iterator[Session]:  # noqa: F811
    s = Session(browser, feature_page.path)
    yield s
    s.page.close()


def _lut_index(rgba: np.ndarray) -> np.ndarray:
    return np.abs(rgba[:, None, :3] - LUT[None]).sum(axis=-1).argmin(axis=1)


def test_pca_tab_draws_the_pca_colours(session, feature_page):
    session.set_range(".vs-opacity", 1.0)
    session.page.locator(".vs-tab-pca").click()
    cur = session.current()
    ref = vitscope.maps(feature_page.vit, feature_page.pixels, "pca").extras["rgb"][0].numpy()  # (4, 6, 3)
    assert cur["view"] == "pca" and cur["layer"] == 1
    np.testing.assert_allclose(np.asarray(cur["rgb"]).reshape(4, 6, 3), ref, atol=1e-3)  # float16 in [0, 1]
    px = np.asarray(session.page.evaluate(SAMPLE), dtype=float)  # (patches, RGBA) at each patch centre
    assert np.all(px[:, 3] == 255)
    assert np.abs(px[:, :3] - np.rint(ref.reshape(-1, 3) * 255)).max() <= 1
    assert "PCA of the layer 1 features after the final norm (norm)" in session.page.locator(".vs-readout").inner_text()
    session.clean()


def test_similarity_tab_click_pins_a_patch_and_hover_follows(session, feature_page):
    session.set_range(".vs-opacity", 1.0)
    session.page.keyboard.press("s")  # the key for the similarity tab
    vit, x = feature_page.vit, feature_page.pixels
    session.page.mouse.click(*session.patch_point(3, 1))
    session.page.mouse.move(0, 0)  # leave the canvas: the pinned patch stays
    cur = session.current()
    ref = vitscope.maps(vit, x, "similarity", query=(3, 1)).map[0].numpy()
    assert cur["view"] == "similarity" and cur["query"] == 3 + 3 * 6 + 1  # 3 prefix tokens, then row-major
    np.testing.assert_allclose(cur["values"], ref.reshape(-1), atol=2e-3)  # float16 unit vectors
    assert cur["values"][3 * 6 + 1] == pytest.approx(1.0, abs=1e-3) and float(np.std(ref)) > 0.05
    px = np.asarray(session.page.evaluate(SAMPLE), dtype=float)
    expected = np.rint((np.asarray(cur["values"]) - cur["min"]) / (cur["max"] - cur["min"]) * 255)
    inner = [i for i in range(24) if i != 3 * 6 + 1]  # the pinned patch carries an outline
    assert np.abs(_lut_index(px[inner]) - expected[inner]).max() <= 2
    session.page.mouse.click(*session.patch_point(3, 1))  # a second click follows the cursor again
    cur = session.hover(0, 5)
    np.testing.assert_allclose(cur["values"], vitscope.maps(vit, x, "similarity", query=(0, 5)).map[0].reshape(-1),
                               atol=2e-3)
    assert "cosine similarity to patch (0, 5)" in session.page.locator(".vs-readout").inner_text()
    session.page.keyboard.press("a")  # back to attention: its own map again
    assert session.current()["view"] == "attention"
    session.clean()


def test_packed_features_are_small_and_reduced_exactly_when_narrow():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(16, 16, 384, generator=g)  # a ViT-S/14 at 224 px: 256 patches of width 384
    packed = pack_features(wide, torch.rand(16, 16, 3, generator=g), layer=11, norm="norm")
    assert packed["dims"] == 64 and packed["width"] == 384
    assert len(packed["unit"]["data"]) * 3 / 4 <= 256 * 64 * 2 + 3  # float16 bytes: 32 KB
    exact = wide.double() / wide.double().norm(dim=-1, keepdim=True)
    cos = (exact @ exact[5, 7]).numpy()
    got = packed_similarity(packed, 5, 7)
    # 64 of 384 dimensions of random features: an approximation, exact at the clicked patch and correlated
    assert got[5, 7] == pytest.approx(1.0, abs=1e-3) and np.corrcoef(got.ravel(), cos.ravel())[0, 1] > 0.3
    narrow = torch.randn(4, 6, 32, generator=g)
    small = pack_features(narrow, torch.rand(4, 6, 3, generator=g), layer=0, norm=None)
    unit = narrow.double() / narrow.double().norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(packed_similarity(small, 1, 2), (unit @ unit[1, 2]).numpy(), atol=2e-3)
    np.testing.assert_allclose(decode_array(small["pca"]).shape, (4, 6, 3))


def test_a_page_without_features_disables_the_tabs(browser, tmp_path):  # noqa: F811
    vit = vitscope.wrap(make_tiny_vit(image_size=(32, 32), seed=1))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    page = view(img, vit, feature_layer=None)
    assert page.payload["features"] is None
    s = Session(browser, page.save(tmp_path / "plain.html"))
    try:
        assert s.page.locator(".vs-tab-pca").is_disabled() and s.page.locator(".vs-tab-similarity").is_disabled()
        s.page.keyboard.press("p")
        assert s.current()["view"] == "attention"
        s.clean()
    finally:
        s.page.close()
