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
from vitscope.errors import VitscopeError
from vitscope.models.vit import save_vit
from vitscope.viewer import Viewer, view, view_many
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


def _stored_weights(payload: dict) -> int:
    """Attention weights a payload stores (raw + rollout): what the size budget counts, one byte each in uint8."""
    return sum(int(np.prod(a["shape"])) for a in (payload["attention"], payload["rollout"]) if a is not None)


def _data_blocks(page: str) -> list[dict]:
    return [json.loads(m) for m in
            re.findall(r'<script type="application/json" class="vitscope-data">(\{.*?)</script>', page, re.S)]


def test_view_many_holds_every_image_within_one_shared_budget():
    """Three images on one page: three data blocks in order, each its own image's attention; the budget is
    shared (three full-size images would store 3 x 2890 weights, over the 6000-byte budget given)."""
    vit = make_tiny_vit()  # 2 layers x 4 heads, 17 tokens: 2 * (4 + 1) * 17 * 17 = 2890 weights per image
    rng = np.random.default_rng(3)
    images = {f"im{i}": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(3)}
    full = _stored_weights(view(images["im0"], vit).payload)
    budget = 2 * full + 100
    with pytest.warns(UserWarning, match="size budget"):
        v = view_many(images, vit, budget_bytes=budget)
    page = v.to_html()
    blocks = _data_blocks(page)
    assert blocks == v.payloads and [b["title"] for b in blocks] == ["im0", "im1", "im2"]
    assert sum(_stored_weights(b) for b in blocks) <= budget < 3 * full  # shared, or it would not fit
    assert all(b["layers"] == [1] for b in blocks)  # each kept the last layer of two
    assert blocks[0]["image"]["src"] != blocks[1]["image"]["src"]
    assert "<title>im0 and 2 more</title>" in page and page.count("</script>") == 4  # 3 data blocks + renderer
    one = view(images["im1"], vit, budget_bytes=budget // 3).payload
    assert one["attention"] == blocks[1]["attention"]  # the same packing as a page of its own
    assert "images=3" in repr(v)
    assert Viewer.combine([view(images["im0"], vit), v]).payloads[1:] == v.payloads


def test_view_many_needs_an_image():
    with pytest.raises(VitscopeError, match=r"^images: no image given"):
        view_many({}, make_tiny_vit())
