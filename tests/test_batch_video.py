"""`vitscope batch` over a folder of videos (video files and frame folders) with a video model, on the local
engine: per video an .npz equal to `vitscope.video_maps` of that video (1e-6) and a PNG strip of its token
frames; a stray file is an error line, not a crash; resumable (finished videos skipped, a damaged output redone);
nothing outside -o changes (tree hash); Ctrl-C exits 130 with outputs matching the manifest; the Ray engine and
masks refuse a video model in one line.

The model is `tests.capture.test_video`'s VideoMAE (random weights, q/k sharpened, 4 frames at 32 px, tubelet 2,
family sample rate 4): the 40-frame clip is sampled 4 apart in its centred window, the shorter ones evenly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitscope
from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, tree_state
from vitscope.batch import run_batch
from vitscope.errors import VitscopeError

av = pytest.importorskip("av")
from tests.test_video_files import random_frames, write_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> object:
    from tests.capture.test_video import build

    return build("videomae", "square")


def _frames_folder(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_clip(root / "a.mkv", random_frames(40, 32, 32, seed=1))  # 40 frames: VideoMAE's rate 4 applies
    (root / "sub").mkdir()
    write_clip(root / "sub" / "b.mp4", random_frames(7, 48, 40, seed=2), "libx264rgb")
    _frames_folder(root / "sub" / "c", random_frames(5, 32, 32, seed=3))
    (root / "notes.txt").write_text("not a video")
    return root


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


WANT = {"a.mkv": "a", "sub/b.mp4": "sub/b", "sub/c": "sub/c"}


@pytest.mark.parametrize("method", ["cls", "rollout"])
def test_batch_of_videos_equals_video_maps(videos: Path, model: object, tmp_path: Path, method: str) -> None:
    vit = model.vit  # type: ignore[attr-defined]
    out = tmp_path / "out"
    before = tree_state(tmp_path), tree_state(videos)
    summary = run_batch(videos, out, method=method, model=vit, batch_size=2, workers=0, progress=False,
                        device=None)
    check_contained(before[0], tree_state(tmp_path), tmp_path, [out])
    assert tree_state(videos) == before[1]
    assert (summary.done, summary.failed) == (3, 1)
    entries = {e["rel"]: e for e in _manifest(out)}
    assert entries["notes.txt"]["status"] == "error" and "neither a video file" in entries["notes.txt"]["error"]
    for rel, base in WANT.items():
        assert entries[rel]["status"] == "ok"
        want = vitscope.video_maps(vit, videos / rel, method)
        with np.load(out / f"{base}.{method}.npz") as data:
            np.testing.assert_allclose(data["map"], want.map[0].numpy(), atol=1e-6, rtol=0)
            np.testing.assert_allclose(data["profile"], want.profile[0].numpy(), atol=1e-6, rtol=0)
            if method == "cls":
                np.testing.assert_allclose(data["heads"], want.extras["heads"][0].numpy(), atol=1e-6, rtol=0)
            meta = json.loads(str(data["meta_json"]))
        assert (meta["frames"], meta["tubelet"], meta["rel"]) == (2, 2, rel)
        with Image.open(out / f"{base}.{method}.png") as im:  # two token frames side by side at the frame's size
            h, w = (48, 40) if rel == "sub/b.mp4" else (32, 32)
            assert im.size == (2 * w, h)
            strip = np.asarray(im)
        assert strip.min() == 0 and strip.max() == 255  # one scale over the clip, min-max


def test_the_strip_is_one_scale_over_the_clip() -> None:
    """Frame 0 holds the clip's low values, frame 1 the high ones: frame 1's half is brighter (one scale), where a
    per-frame scale would paint both halves alike."""
    from vitscope.batch.local import video_strip_png

    maps = np.stack([np.arange(4, dtype=np.float32).reshape(2, 2), 10 + np.arange(4, dtype=np.float32).reshape(2, 2)])
    import io

    idx = np.asarray(Image.open(io.BytesIO(video_strip_png(maps, (8, 8)))))  # (8, 16) palette indices
    assert idx[:, :8].max() < 64 and idx[:, 8:].min() > 191


def test_rerun_skips_and_redoes_a_damaged_output(videos: Path, model: object, tmp_path: Path) -> None:
    vit = model.vit  # type: ignore[attr-defined]
    out = tmp_path / "out"
    run_batch(videos, out, model=vit, workers=0, progress=False, device=None)
    again = run_batch(videos, out, model=vit, workers=0, progress=False, device=None)
    assert (again.skipped, again.done) == (3, 0)  # notes.txt is tried again (an error), the videos are not
    (out / "sub" / "c.cls.png").write_bytes(b"cut")
    redo = run_batch(videos, out, model=vit, workers=0, progress=False, device=None)
    assert (redo.skipped, redo.done) == (2, 1)
    assert [e["rel"] for e in _manifest(out) if e["status"] == "ok"][-1] == "sub/c"
    cfg = json.loads((out / "batch.json").read_text())
    assert cfg["video"] == {"frames": 4, "sample_rate": 4} and cfg["stats"] is False


def test_a_list_of_a_video_file_and_a_frames_folder(videos: Path, model: object, tmp_path: Path) -> None:
    vit = model.vit  # type: ignore[attr-defined]
    out = tmp_path / "out"
    summary = run_batch([videos / "a.mkv", videos / "sub" / "c"], out, model=vit, workers=0, progress=False,
                        device=None)
    assert (summary.done, summary.failed) == (2, 0)
    assert {e["rel"] for e in _manifest(out)} == {"a.mkv", "sub/c"}
    with np.load(out / "sub" / "c.cls.npz") as data:
        np.testing.assert_allclose(data["map"], vitscope.video_maps(vit, videos / "sub" / "c").map[0].numpy(),
                                   atol=1e-6, rtol=0)


def test_ray_engine_and_masks_refuse_a_video_model(videos: Path, model: object, tmp_path: Path) -> None:
    vit = model.vit  # type: ignore[attr-defined]
    pytest.importorskip("ray")
    with pytest.raises(VitscopeError, match="the ray engine reads images only") as info:
        run_batch(videos, tmp_path / "r", model=vit, engine="ray", progress=False)
    assert info.value.argument == "engine" and "engine='local'" in str(info.value)
    with pytest.raises(VitscopeError, match="a batch of videos takes none") as info:
        run_batch(videos, tmp_path / "m", model=vit, workers=0, masks=videos, progress=False)
    assert info.value.argument == "masks"


def test_cli_batch_of_videos_and_its_one_line_errors(videos: Path, model: object, tmp_path: Path) -> None:
    spec = f"hf:{model.folder}"  # type: ignore[attr-defined]
    out = tmp_path / "out"
    res = run_inprocess(["batch", str(videos), "-o", str(out), "-m", spec, "--workers", "1", "--quiet",
                         "--device", "cpu"])
    assert res.code == 0, res.stderr
    assert "3 done" in res.stdout + res.stderr and "1 failed" in res.stdout + res.stderr
    res = run_inprocess(["batch", str(videos), "-o", str(tmp_path / "o2"), "-m", spec, "--max-video-pixels", "0"])
    line = assert_one_line(res, 2, "must be a positive", option=False)
    assert line.startswith("error: --max-video-pixels: ")
    res = run_inprocess(["batch", str(videos), "-o", str(tmp_path / "o3"), "-m", spec, "--max-video-pixels",
                         "0.00001", "--workers", "0", "--quiet", "--device", "cpu"])  # 10,000 pixels: a.mkv is over
    assert res.code == 0 and "a.mkv" in (tmp_path / "o3" / "manifest.jsonl").read_text()
    errors = {e["rel"]: e["error"] for e in _manifest(tmp_path / "o3") if e["status"] == "error"}
    assert "video limit" in errors["a.mkv"] and "sub/c" not in errors  # frames folders: each frame an image
    res = run_inprocess(["batch", str(videos), "-o", str(tmp_path / "o4"), "-m", spec, "--engine", "ray"])
    line = assert_one_line(res, 2, "reads images only", option=False)
    assert line.startswith("error: --engine: ") and "--engine local" in line


_CTRL_C = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    from vitscope._console import main
    from vitscope.methods.api import get_method
    from vitscope.methods.registry import Method, register

    def slow_cls(ctx, *, layer=-1):
        time.sleep(0.3)
        return get_method("cls").compute(ctx, layer=layer)

    register(Method(name="slow-cls", compute=slow_cls, summary="cls, slowly", paper="-"))
    main(["batch", sys.argv[1], "-o", sys.argv[2], "-m", sys.argv[3], "--method", "slow-cls", "--batch-size", "1",
          "--workers", "0", "--quiet", "--device", "cpu"])
    """
)


def test_ctrl_c_exits_130_and_resume_finishes(model: object, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(8):
        write_clip(src / f"v{i}.mkv", random_frames(4, 32, 32, seed=10 + i))
    script = tmp_path / "run.py"
    script.write_text(_CTRL_C)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(out), f"hf:{model.folder}"],  # type: ignore[attr-defined]
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / "manifest.jsonl"
            if manifest.exists() and manifest.read_text().count('"ok"') >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not list(out.rglob("*.vitscope-tmp*"))
    done = [e for e in _manifest(out) if e["status"] == "ok"]
    assert 2 <= len(done) < 8
    for e in done:
        for rec in e["outputs"].values():
            assert (out / rec["path"]).stat().st_size == rec["bytes"]
    from vitscope.methods.registry import REGISTRY

    REGISTRY["slow-cls"] = REGISTRY["cls"].__class__(**{**REGISTRY["cls"].__dict__, "name": "slow-cls"})
    try:
        rest = run_batch(src, out, method="slow-cls", model=f"hf:{model.folder}", workers=0, progress=False,  # type: ignore[attr-defined]
                         device="cpu")
    finally:
        del REGISTRY["slow-cls"]
    assert rest.skipped == len(done) and rest.done == 8 - len(done)
