"""``vitscope demo``: a folder of figures and one viewer page, offline, from a saved model."""

from __future__ import annotations

import json
import re

from PIL import Image

from tests.conftest import make_tiny_vit
from vitscope.cli import main
from vitscope.demo import demo_images
from vitscope.models.vit import save_vit


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
    page = (out / "viewer.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'class="vitscope-data">(.*?)</script>', page, re.S).group(1))
    assert data["prefix"] == ["cls", "register"] and data["title"].startswith("shapes0-")
