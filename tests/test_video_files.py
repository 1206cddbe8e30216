"""Video files (PyAV, the ``video`` extra): decoded frames equal the frames written, the sampling rule equals a hand
computation, a VideoMAE reads a video file exactly as the same frames given by hand, the limits fire before
decoding, and a missing PyAV or a broken file is one line.

Clips are written here with PyAV itself (no downloads): FFV1 in Matroska (lossless, RGB as ``bgr0``; its
container gives no frame count, so the packets are counted) and H.264 RGB at ``qp=0`` in MP4 (lossless too, with a
frame count in the header): the frames read back must be *equal*, byte for byte, to the frames written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vitscope
from vitscope.errors import ImageError, VitscopeError
from vitscope.video import read_video, sample_indices

av = pytest.importorskip("av")

CODECS = {"ffv1": ("mkv", "bgr0", {}), "libx264rgb": ("mp4", "rgb24", {"qp": "0"})}


def write_clip(path: Path, frames: np.ndarray, codec: str = "ffv1", fps: int = 10) -> Path:
    """``frames`` ``(T, H, W, 3)`` uint8 written losslessly with PyAV."""
    _ext, pix_fmt, options = CODECS[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def random_frames(n: int, h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_decoded_frames_equal_the_frames_written(tmp_path: Path, codec: str) -> None:
    frames = random_frames(12)
    path = write_clip(tmp_path / f"clip.{CODECS[codec][0]}", frames, codec)
    clip = read_video(path)
    assert clip.total == 12 and clip.indices == tuple(range(12)) and clip.fps == pytest.approx(10.0)
    np.testing.assert_array_equal(clip.frames, frames)


@pytest.mark.parametrize(("available", "frames", "rate", "want"), [
    (100, 16, 4, [18 + 4 * i for i in range(16)]),  # window of 64 centred: start (100 - 64) // 2 = 18
    (64, 16, 4, [4 * i for i in range(16)]),  # exactly one window
    (40, 16, 4, [round(i * 39 / 15) for i in range(16)]),  # shorter than the window: spread over the clip
    (6, 4, None, [0, 2, 3, 5]),  # round(linspace(0, 5, 4))
    (3, 4, None, [0, 1, 1, 2]),  # a short clip repeats frames
    (9, 1, None, [0]),
])
def test_sample_indices_by_hand(available: int, frames: int, rate: int | None, want: list[int]) -> None:
    assert sample_indices(available, frames, rate) == want


def test_read_video_samples_with_the_rate(tmp_path: Path) -> None:
    """20 frames, 4 at rate 3: the window of 12 starts at (20 - 12) // 2 = 4 -> frames 4, 7, 10, 13."""
    frames = random_frames(20)
    clip = read_video(write_clip(tmp_path / "c.mkv", frames), 4, sample_rate=3)
    assert clip.indices == (4, 7, 10, 13) and clip.total == 20
    np.testing.assert_array_equal(clip.frames, frames[[4, 7, 10, 13]])


@pytest.fixture(scope="module")
def videomae() -> object:
    from tests.capture.test_video import build

    return build("videomae", "square")  # 4 frames at 32x32, tubelet 2, q/k sharpened


def test_a_video_file_is_the_same_frames_given_by_hand(tmp_path: Path, videomae: object) -> None:
    """VideoMAE (rate 4): a 40-frame clip gives the window 16 wide at (40 - 16) // 2 = 12 -> frames 12, 16, 20,
    24; its maps equal the maps of those four frames passed as arrays (and differ from the evenly spread ones)."""
    vit = videomae.vit  # type: ignore[attr-defined]
    frames = random_frames(40, 32, 32, seed=1)
    path = write_clip(tmp_path / "clip.mkv", frames)
    got = vitscope.video_maps(vit, path, "cls")
    want = vitscope.video_maps(vit, [frames[i] for i in (12, 16, 20, 24)], "cls")
    torch.testing.assert_close(got.map, want.map, atol=1e-6, rtol=0)
    even = vitscope.video_maps(vit, [frames[i] for i in sample_indices(40, 4)], "cls")
    assert not torch.allclose(got.map, even.map, atol=1e-4)  # the rule is seen: the even spread differs


def test_a_batch_of_a_file_and_a_frames_folder(tmp_path: Path, videomae: object) -> None:
    from PIL import Image

    vit = videomae.vit  # type: ignore[attr-defined]
    frames = random_frames(6, 32, 32, seed=2)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    path = write_clip(tmp_path / "clip.mp4", frames, "libx264rgb")
    pixels = vit.preprocess([path, folder])  # (2, T, C, H, W)
    torch.testing.assert_close(pixels[0], pixels[1], atol=0, rtol=0)


def test_limits_fire_before_decoding(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "c.mkv", random_frames(10))  # 10 x 24 x 40 = 9,600 pixels
    with pytest.raises(ImageError, match=r"at least 10 frames of 40x24 = 9,600 pixels, more than the 9,599") as info:
        read_video(path, 4, max_video_pixels=9_599, argument="images")
    assert info.value.argument == "images" and "--max-video-pixels" in str(info.value)
    assert read_video(path, 4, max_video_pixels=9_600).frames.shape == (4, 24, 40, 3)
    with vitscope.limits.limits(max_video_pixels=9_599), pytest.raises(ImageError, match="video limit"):
        read_video(path, 4)
    with pytest.raises(ImageError, match=r"a frame of .* is 40x24 = 960 pixels, more than the 959"):
        read_video(path, 4, max_pixels=959)


def test_without_pyav_it_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_clip(tmp_path / "c.mkv", random_frames(3))
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # import av -> ImportError
    with pytest.raises(VitscopeError, match=r"needs PyAV.*pip install 'vitscope\[video\]'") as info:
        read_video(path, 2, argument="images")
    assert info.value.argument == "images" and "\n" not in str(info.value)


@pytest.mark.parametrize(("content", "match"), [(b"not a video at all" * 10, "cannot read .* as a video"),
                                                 (b"", "is empty")])
def test_a_broken_file_is_one_line(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=match) as info:
        read_video(path, 4)
    assert "\n" not in str(info.value)


def test_console_script_maps_a_video_file(tmp_path: Path, videomae: object) -> None:
    """The installed ``vitscope`` on a video file: per-frame maps equal to `vitscope.video_maps` of the same file,
    nothing written outside -o; a bad --max-video-pixels is one stderr line naming it, exit 2, nothing written;
    a limit the clip is over is one line naming IMAGE."""
    from tests.hostile.harness import assert_one_line, check_contained, run_script, tree_state

    vit, folder = videomae.vit, videomae.folder  # type: ignore[attr-defined]
    clip = write_clip(tmp_path / "clip.mkv", random_frames(9, 32, 32, seed=4))
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    res = run_script(["maps", str(clip), "--model", f"hf:{folder}", "--method", "rollout", "-o", str(out)],
                     cwd=tmp_path)
    assert res.code == 0, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    with np.load(out / "clip.rollout.npz") as data:
        np.testing.assert_allclose(data["map"], vitscope.video_maps(vit, clip, "rollout").map.numpy(), atol=1e-6)
    for value, want in (("-1", "must be a positive"), ("nan", "must be a positive")):
        res = run_script(["maps", str(clip), "--model", f"hf:{folder}", "--max-video-pixels", value, "-o",
                          str(tmp_path / "bad")], cwd=tmp_path)
        line = assert_one_line(res, 2, want, option=False)
        assert line.startswith("error: --max-video-pixels: ") and not (tmp_path / "bad").exists()
    res = run_script(["maps", str(clip), "--model", f"hf:{folder}", "--max-video-pixels", "0.000001", "-o",
                      str(tmp_path / "over")], cwd=tmp_path)  # 1,000 pixels: the clip has 9 x 32 x 32
    line = assert_one_line(res, 2, "video limit", option=False)
    assert line.startswith("error: IMAGE: ") and "--max-video-pixels" in line
