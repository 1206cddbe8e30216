"""The page: self-contained (no URL to fetch), safely escaped, the same renderer in Jupyter and in files."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tiny_vit
from vitscope.cli import main
from vitscope.models.vit import save_vit
from vitscope.viewer import view
from vitscope.viewer.page import asset, json_for_script


def _data_json(page: str) -> dict:
    m = re.search(r'<script type="application/json" class="vitscope-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_page_is_self_contained(small_page):
    page = small_page.path.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", page)  # nothing loaded by URL
    assert asset("viewer.js") in page and asset("viewer.css") in page
    assert "default-src 'none'" in page  # the page's CSP forbids any fetch
    assert _data_json(page) == small_page.viewer.payload


def test_title_cannot_break_out_of_the_script_or_title(small_page):
    page = small_page.path.read_text(encoding="utf-8")
    assert page.count("</script>") == 2  # the data block and the renderer, none from the title
    assert "<title>small &lt;/script&gt; test</title>" in page
    assert json_for_script({"t": "</script><!--&"}) == '{"t":"\\u003c/script\\u003e\\u003c!--\\u0026"}'


def test_repr_html_embeds_the_same_page_in_a_sandboxed_iframe(small_page):
    snippet = small_page.viewer._repr_html_()
    m = re.fullmatch(r'<iframe srcdoc="([^"]*)" sandbox="allow-scripts" [^>]*></iframe>', snippet)
    assert m is not None
    assert html.unescape(m.group(1)) == small_page.viewer.to_html()


def test_save_is_atomic_and_returns_the_path(small_page, tmp_path):
    out = small_page.viewer.save(tmp_path / "sub" / "page.html")
    assert out.read_text(encoding="utf-8") == small_page.viewer.to_html()
    assert [p.name for p in out.parent.iterdir()] == ["page.html"]


def test_view_crops_the_shown_image_like_the_crop_policy():
    vit = make_tiny_vit()  # patch 8
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    p = view(img, vit, policy="crop").payload
    assert p["grid"] == [5, 7] and (p["image"]["height"], p["image"]["width"]) == (40, 56)
    p = view(img, vit).payload  # the model's own policy: resize to 32 x 32, the photo shown whole
    assert p["grid"] == [4, 4] and (p["image"]["height"], p["image"]["width"]) == (45, 61)
    assert p["labels"][0].startswith("prediction: class ")


def test_cli_view_writes_the_page(tmp_path, image_path, capsys):
    folder = save_vit(make_tiny_vit(), tmp_path / "model")
    out = tmp_path / "page.html"
    main(["view", str(image_path), "-m", str(folder), "-o", str(out)])
    assert _data_json(out.read_text(encoding="utf-8"))["layers"] == [0, 1]
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["view", str(image_path), "-m", str(folder), "-o", str(out), "--dtype", "int4"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: --dtype:")
