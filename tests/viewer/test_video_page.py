"""The video viewer's page without a browser: its packed rows against each family's own eager attention
(random weights, q/k sharpened by `tests.capture.test_video.build`: mean row maximum above 0.2, asserted below),
the guard on the frames, the size bound, the notebook display, and ``vitscope view FRAMES_FOLDER`` (the
installed console script: nothing written outside -o; bad input one stderr line naming the option, exit 2)."""

from __future__ import annotations

import html
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.capture.test_video import build
from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, run_script, tree_state
from tests.viewer.test_page import _data_json
from vitscope.errors import VitscopeError
from vitscope.viewer import Viewer, view, view_video
from vitscope.viewer.page import asset


def _hand_rollout(ref: np.ndarray) -> np.ndarray:
    """``(L, H, N, N)`` -> ``(L, N, N)``: 0.5 A + 0.5 I (heads mean), rows renormalised, cumulative."""
    N = ref.shape[-1]
    out, roll = [], np.eye(N)
    for a in ref:
        m = 0.5 * a.mean(axis=0) + 0.5 * np.eye(N)
        roll = (m / m.sum(axis=-1, keepdims=True)) @ roll
        out.append(roll)
    return np.stack(out)


def _check_rows(payload: dict, ref: np.ndarray) -> None:
    """Every packed row (raw and rollout) within the uint8 packing's error of the reference's."""
    from vitscope.viewer.pack import decode_array

    got = decode_array(payload["attention"])  # (L, H, Q, N)
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref).max(axis=-1) <= ref.max(axis=-1) / 510 + 1e-6)
    roll, want = decode_array(payload["rollout"]), _hand_rollout(ref)
    assert np.all(np.abs(roll - want).max(axis=-1) <= want.max(axis=-1) / 510 + 1e-6)


# (family, size, token frames, one frame's grid, prefix)
CASES = [("videomae", "wide", 4, [4, 6], []), ("vivit", "square", 2, [4, 4], ["cls"])]


@pytest.mark.parametrize(("fid", "sname", "frames", "grid", "prefix"), CASES)
def test_packed_rows_are_the_eager_attention(fid: str, sname: str, frames: int, grid: list[int],
                                             prefix: list[str]) -> None:
    b = build(fid, sname)
    x = b.pixels(1, seed=5)
    ref, _ = b.reference(x)  # (L, B, H, N, N)
    assert float(ref.amax(-1).mean()) > 0.2  # peaked rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        viewer = view(x, b.vit)  # the image entry point takes the video branch
    p = viewer.payload
    assert f"grid={grid[0]}x{grid[1]}" in repr(viewer) and f"frames={2 * frames} ({frames} token frames of 2)" in repr(viewer)
    _check_rows(p, ref[:, 0].double().numpy())
    v = p["video"]
    assert (v["frames"], v["tubelet"], v["input_frames"], v["frame_grid"]) == (frames, 2, 2 * frames, grid)
    assert p["grid"] == [frames * grid[0], grid[1]] and p["prefix"] == prefix and len(v["images"]) == 2 * frames
    assert p["image"]["src"] == v["images"][0]


def _attn_and_frames() -> tuple[object, np.ndarray]:
    import vitscope
    from vitscope.viz.video import frames_rgb

    b = build("videomae", "wide")
    x = b.pixels(1, seed=6)
    prep = b.vit.info.preprocess
    return vitscope.capture(b.vit, x, queries=None), frames_rgb(x, prep.mean, prep.std)


def test_frames_must_match_the_tokens() -> None:
    """8 input frames for 4 token frames of 2: 7 frames, or frames that are not RGB, are one line naming image."""
    attn, rgb = _attn_and_frames()
    assert Viewer.from_attentions(attn, rgb).payload["video"]["input_frames"] == 8  # the right count passes
    for bad, needle in [(rgb[:7], "7 frames for 4 token frames of 2"), (rgb[..., 0], "frames of shape")]:
        with pytest.raises(VitscopeError, match=needle) as info:
            Viewer.from_attentions(attn, bad)
        assert info.value.argument == "image"


def test_the_size_budget_bounds_the_video_page() -> None:
    """Past the budget fewer layers (then the head mean) are stored, as for images; the page is at most 4/3 of
    the budget plus the frames' JPEGs and the page's code."""
    attn, rgb = _attn_and_frames()
    per_layer = attn.num_heads * attn.num_tokens**2 * (1 + 4 / 197)  # uint8 rows + scales, one layer's heads
    budget = int(1.5 * (per_layer + attn.num_tokens**2 * (1 + 4 / 197)))  # one layer with its rollout fits, two do not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = Viewer.from_attentions(attn, rgb, budget_bytes=budget)
    p = v.payload
    assert p["layers"] == [1] and any("stored 1 of 2" in n for n in p["notes"])
    page = v.to_html()
    frames = sum(len(s) for s in p["video"]["images"])
    code = len(asset("viewer.js")) + len(asset("viewer.css")) + len(asset("viewer.html"))
    assert len(page) <= 4 / 3 * budget + frames + code + 10_000


def test_the_notebook_display_is_the_same_page() -> None:
    attn, rgb = _attn_and_frames()
    v = Viewer.from_attentions(attn, rgb)
    m = re.fullmatch(r'<iframe srcdoc="([^"]*)" sandbox="allow-scripts" [^>]*></iframe>', v._repr_html_())
    assert m is not None and html.unescape(m.group(1)) == v.to_html()


def test_an_image_model_is_refused_by_view_video() -> None:
    with pytest.raises(VitscopeError, match="image model") as info:
        view_video(torch.zeros(1, 2, 3, 32, 32), "vitscope:shapes")
    assert info.value.argument == "model"


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"f{i:02d}.png")
    return d


def test_view_a_frames_folder_with_the_console_script(tmp_path: Path, frames: Path) -> None:
    """ViViT ([CLS], 4 frames of tubelet 2): the page's rows are the eager model's on the frames the folder gives."""
    from vitscope.capture.prepare import prepare

    b = build("vivit", "square")
    out = tmp_path / "out" / "clip.html"
    before = tree_state(tmp_path)
    res = run_script(["view", str(frames), "--model", f"hf:{b.folder}", "-o", str(out)], cwd=tmp_path)
    assert res.code == 0, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [out.parent])
    assert f"wrote {out}" in res.stdout
    p = _data_json(out.read_text(encoding="utf-8"))
    _, pixels = prepare(b.vit, frames)  # (1, 4, 3, 32, 32): 4 of the 6 frames, sampled as the processor does
    ref, _ = b.reference(pixels)
    assert float(ref.amax(-1).mean()) > 0.2
    _check_rows(p, ref[:, 0].double().numpy())
    assert p["title"] == frames.name and p["video"]["input_frames"] == 4


@pytest.mark.parametrize(("extra", "needle", "option"), [
    (["--target", "1"], "error: --target: ", "is a video model"),
    (["--prompt", "a cat"], "error: --prompt: ", "is a video model"),
])
def test_gradient_targets_on_a_video_model_are_one_line(tmp_path: Path, frames: Path, extra: list[str], needle: str,
                                                        option: str) -> None:
    b = build("vivit", "square")
    out = tmp_path / "o.html"
    res = run_inprocess(["view", str(frames), "-m", f"hf:{b.folder}", "-o", str(out), *extra])
    line = assert_one_line(res, 2, option)
    assert line.startswith(needle) and not out.exists()


def test_a_folder_without_frames_is_one_line(tmp_path: Path) -> None:
    b = build("vivit", "square")
    (tmp_path / "empty").mkdir()
    res = run_inprocess(["view", str(tmp_path / "empty"), "-m", f"hf:{b.folder}", "-o", str(tmp_path / "o.html")])
    line = assert_one_line(res, 2, "holds no frame images", option=False)
    assert line.startswith("error: IMAGE: folder ") and not (tmp_path / "o.html").exists()
