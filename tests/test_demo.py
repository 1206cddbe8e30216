"""``vitscope demo``: a folder of figures and one viewer page (every demo image), offline, from a saved model."""

from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

from tests.conftest import make_tiny_vit
from vitscope.cli import main
from vitscope.demo import demo_images
from vitscope.models.vit import save_vit
from vitscope.viewer import BUDGET_BYTES


def test_demo_images_are_shapes_then_photos():
    images = demo_images((32, 32), n_shapes=2)
    names = list(images)
    assert re.fullmatch(r"shapes0-\w+", names[0]) and re.fullmatch(r"shapes1-\w+", names[1])
    assert {"astronaut", "chelsea", "coffee"} <= set(names[2:])
    assert images[names[0]].size == (64, 64)  # twice the model's input
    assert images["chelsea"].size == (320, 213)  # the photos keep their own size and aspect


def test_cli_demo_writes_figures_and_a_viewer(tmp_path, capsys):
    folder = save_vit(make_tiny_vit(num_registers=1), tmp_path / "model")
    out = tmp_path / "demo"
    main(["demo", "-o", str(out), "-m", str(folder)])
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir() if p.name != ".vitscope.json")
    assert sorted(json.loads((out / ".vitscope.json").read_text())["files"]) == files  # vitscope's own files
    assert "viewer.html" in files and "attention_distance.png" in files and "token_norms.png" in files
    assert any(f.startswith("heads_shapes0-") for f in files) and "batch_rollout.png" in files
    for name in files:
        assert str(out / name) in printed
        if name.endswith(".png"):
            with Image.open(out / name) as im:
                assert im.width > 200 and im.height > 100
    # the viewer page holds every demo image (an image picker), one offline file within the viewer's budget
    page_bytes = (out / "viewer.html").read_bytes()
    page = page_bytes.decode("utf-8")
    blocks = [json.loads(m) for m in re.findall(r'class="vitscope-data">(\{.*?)</script>', page, re.S)]
    names = list(demo_images((32, 32)))
    assert [b["title"] for b in blocks] == names and len(names) >= 7  # 4 shapes images + the bundled photos
    assert all(b["prefix"] == ["cls", "register"] for b in blocks)
    assert len({b["image"]["src"] for b in blocks}) == len(names)  # each its own image
    stored = sum(int(np.prod(a["shape"])) for b in blocks for a in (b["attention"], b["rollout"]) if a)
    assert stored <= BUDGET_BYTES and len(page_bytes) <= BUDGET_BYTES  # arrays, and the whole file
    assert "https://" not in page and "http://" not in page
