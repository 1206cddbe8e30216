"""`vitscope maps FRAMES_FOLDER --model hf:<video model>` through the installed console script: per-frame maps
and their profile in the .npz (equal to `vitscope.video_maps` on the same frames), an animated GIF beside it,
nothing written outside -o; a folder without frames is one stderr line naming IMAGE, exit 2 (in process: the same `cli.run`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitscope
from tests.capture.test_video import build
from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, run_script, tree_state


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"f{i:02d}.png")
    return d


def test_maps_of_a_frames_folder(tmp_path: Path, frames: Path) -> None:
    b = build("vivit", "square")
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    res = run_script(["maps", str(frames), "--model", f"hf:{b.folder}", "--method", "rollout", "-o", str(out)],
                     cwd=tmp_path)
    assert res.code == 0, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    npz, gif = out / f"{frames.name}.rollout.npz", out / f"{frames.name}.rollout.gif"
    with np.load(npz) as data:
        got, profile, meta = data["map"], data["profile"], json.loads(str(data["meta_json"]))
    want = vitscope.video_maps(b.vit, frames, "rollout")
    np.testing.assert_allclose(got, want.map.numpy(), atol=1e-6)
    np.testing.assert_allclose(profile, want.profile.numpy(), atol=1e-6)
    assert got.shape == (1, 2, 4, 4) and meta["frames"] == 2 and meta["tubelet"] == 2
    with Image.open(gif) as im:
        assert im.size == (32, 32) and getattr(im, "is_animated", False)
    assert "rollout maps 2 frames x 4x4" in res.stdout


def test_a_folder_without_frames_is_one_line(tmp_path: Path) -> None:
    b = build("vivit", "square")
    (tmp_path / "empty").mkdir()
    res = run_inprocess(["maps", str(tmp_path / "empty"), "--model", f"hf:{b.folder}", "-o", str(tmp_path / "o")])
    line = assert_one_line(res, 2, "holds no frame images", option=False)
    assert line.startswith("error: IMAGE: folder ")
    assert not (tmp_path / "o").exists()


def test_info_json_names_frames_and_tubelet() -> None:
    b = build("vivit", "square")
    res = run_inprocess(["info", "-m", f"hf:{b.folder}", "--json"])
    assert res.code == 0, res.stderr
    got = json.loads(res.stdout)
    assert (got["frames"], got["tubelet"], got["prefix"]) == (4, 2, ["cls"])


def test_heads_figure_of_a_frames_folder(tmp_path: Path, frames: Path) -> None:
    b = build("vivit", "square")
    out = tmp_path / "heads.png"
    res = run_inprocess(["figure", "heads", str(frames), "-m", f"hf:{b.folder}", "-o", str(out)])
    assert res.code == 0, res.stderr
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    res = run_inprocess(["figure", "panel", str(frames), "-m", f"hf:{b.folder}", "-o", str(tmp_path / "p.png")])
    line = assert_one_line(res, 2, "draws the heads figure", option=False)
    assert line.startswith("error: KIND: ") and not (tmp_path / "p.png").exists()


