"""The viewer's gradient maps for a target (`vitscope.viewer.view(..., target=)`, ``vitscope view --target /
--prompt``): packed equal to `vitscope.maps`, drawn as methods of their own in the browser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_tiny_vit
from tests.hostile.harness import assert_one_line, run_inprocess
from tests.methods import targetcases as tc
from tests.viewer.test_browser import Session, browser  # noqa: F401  (the browser fixture)
from vitscope.errors import VitscopeError


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_prompts_give_one_map_per_method_and_prompt(tmp_path: Path, img: Path) -> None:
    import vitscope
    from vitscope.viewer import view

    vit = tc.hf_dual(tmp_path, "clip").vit
    v = view(img, vit, target=["text:a cat", "text:a dog"], methods=("chefer", "legrad"))
    names = [m["name"] for m in v.payload["maps"]]
    assert names == ["chefer text:a cat", "chefer text:a dog", "legrad text:a cat", "legrad text:a dog"]
    for m in v.payload["maps"]:
        method, target = m["name"].split(" ", 1)
        want = vitscope.maps(vit, str(img), method, target=target).map[0]
        np.testing.assert_allclose(m["values"], want.reshape(-1).numpy(), rtol=1e-5, atol=1e-7)
    assert view(img, vit).payload["maps"] == []  # no target: no gradient maps


def test_a_map_of_another_grid_is_refused(img: Path) -> None:
    from vitscope.viewer.page import Viewer

    attn = __import__("vitscope").capture(make_tiny_vit(), img)
    with pytest.raises(VitscopeError, match="maps"):
        Viewer.from_attentions(attn, img, maps={"x": torch.zeros(3, 3)})


def test_cli_view_prompt_and_bad_target(tmp_path: Path, img: Path) -> None:
    from vitscope.models.vit import save_vit

    model = save_vit(make_tiny_vit(), tmp_path / "tiny")
    out = tmp_path / "v.html"
    res = run_inprocess(["view", str(img), "-m", str(model), "--target", "1", "-o", str(out)], cwd=tmp_path)
    assert res.code == 0, res.stderr
    page = out.read_text()
    assert '"name":"chefer [1]"' not in page and '"name":"chefer 1"' in page
    bad = run_inprocess(["view", str(img), "-m", str(model), "--prompt", "a cat", "-o", str(tmp_path / "b.html")],
                        cwd=tmp_path)
    assert_one_line(bad, 2, needle="--prompt: a text prompt needs a dual encoder")


@pytest.mark.browser
def test_browser_draws_a_gradient_map(browser, tmp_path: Path, img: Path) -> None:  # noqa: F811
    import vitscope
    from vitscope.viewer import view

    model = make_tiny_vit()
    path = view(img, model, target=2, methods=("chefer",)).save(tmp_path / "page.html")
    s = Session(browser, path)
    try:
        s.page.select_option(".vs-method", "map:0")
        cur = s.current()
        want = vitscope.maps(model, str(img), "chefer", target=2).map[0].reshape(-1).numpy()
        assert cur["method"] == "map:0"
        np.testing.assert_allclose(cur["values"], want, rtol=1e-5, atol=1e-7)
        assert "chefer 2" in s.page.locator(".vs-readout").inner_text()
        s.page.select_option(".vs-method", "raw")
        assert not np.allclose(s.current()["values"], want)  # the attention again
        s.clean()
    finally:
        s.page.close()
