"""Input limits: decoded pixels (per call, PIL's global untouched), EXIF orientation, sizes, figure pixels."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitscope import limits
from vitscope.errors import ImageError, VitscopeError
from vitscope.images import load_image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def big_png(path: Path, side: int = 20_000) -> Path:
    """A valid ``side x side`` 8-bit grey PNG of zeros, written row block by row block (about 1 MB)."""
    comp = zlib.compressobj(9)
    block = b"\0" * ((side + 1) * 500)  # 500 rows: filter byte + pixels
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)))
        data = [comp.compress(block) for _ in range(side // 500)]
        data.append(comp.flush())
        fh.write(_png_chunk(b"IDAT", b"".join(data)))
        fh.write(_png_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return big_png(tmp_path_factory.mktemp("huge") / "huge.png")


_MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    from PIL import Image
    from vitscope.errors import ImageError
    from vitscope.images import load_image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pil = Image.MAX_IMAGE_PIXELS
    t = time.perf_counter()
    try:
        load_image(sys.argv[1])
        msg = None
    except ImageError as exc:
        msg = str(exc)
    seconds = time.perf_counter() - t
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"msg": msg, "seconds": seconds, "extra": extra, "pil": Image.MAX_IMAGE_PIXELS == pil}))
""")


def test_20000_square_png_is_refused_fast_and_small(huge: Path) -> None:
    assert huge.stat().st_size < 2_000_000  # a small file that would decode to 400 MP
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(huge)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["msg"] is not None and "20000x20000" in out["msg"] and "--max-pixels" in out["msg"]
    assert out["seconds"] < 1.0  # generous guards: the header is read, no pixel is decoded
    assert out["extra"] < 200e6
    assert out["pil"]  # PIL's process-wide limit is left as it was


def test_pixel_limit_is_per_call_and_per_block(tmp_path: Path) -> None:
    p = tmp_path / "small.png"
    Image.new("RGB", (30, 20)).save(p)
    assert load_image(p).size == (30, 20)
    with pytest.raises(ImageError, match="30x20 = 600 pixels, more than the 599"):
        load_image(p, max_pixels=599)
    with limits.limits(max_pixels=100), pytest.raises(ImageError, match="more than the 100 pixel"):
        load_image(p)
    assert load_image(p, max_pixels=600).size == (30, 20)
    assert limits.max_pixels() == limits.MAX_PIXELS  # the block ended
    with pytest.raises(VitscopeError, match="max_pixels"), limits.limits(max_pixels=0):
        pass


def test_raised_limit_reads_headers_past_pils_guard_and_restores_it(huge: Path) -> None:
    from vitscope.images import _header_only

    pil = Image.MAX_IMAGE_PIXELS
    with _header_only(10**9), Image.open(huge) as im:
        assert im.size == (20_000, 20_000)  # PIL alone would raise DecompressionBombError here
    assert pil == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(huge, max_pixels=10**8)
    assert pil == Image.MAX_IMAGE_PIXELS


def _exif_jpeg(path: Path, orientation: int) -> Path:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 10))  # a blue corner to follow
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_is_honoured_everywhere(tmp_path: Path) -> None:
    from vitscope.adapters.base import Preprocess
    from vitscope.batch import BatchItem, _ImageDataset
    from vitscope.viewer.server import decode_upload

    path = _exif_jpeg(tmp_path / "rot.jpg", 6)  # "rotate 90 CW to view"
    img = load_image(path)
    assert img.size == (20, 40)  # upright: the stored 40x20 turned
    arr = np.asarray(img)
    assert arr[:10, -10:, 2].mean() > 200  # the blue corner moved to the top right
    assert decode_upload(path.read_bytes()).size == (20, 40)
    prep = Preprocess(image_size=(40, 20), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), policy="native")
    sample = _ImageDataset([BatchItem(path, "rot.jpg")], prep, (10, 10), None, None)[0]
    assert sample["error"] is None and sample["original_size"] == (40, 20)
    assert load_image(_exif_jpeg(tmp_path / "plain.jpg", 1)).size == (40, 20)


@pytest.mark.parametrize("size", [0, -5, (0, 32), (32, -1), 2.5, True])
def test_size_must_be_positive(size: object, tiny_vit: object, image_path: Path) -> None:
    import vitscope

    with pytest.raises(ImageError, match="size: must be a positive int"):
        vitscope.capture(tiny_vit, image_path, size=size)  # type: ignore[arg-type]


def test_readme_example_is_refused_at_once_with_its_estimate(image_path: Path) -> None:
    import time

    import vitscope

    vit = vitscope.load("vitscope:shapes")
    t = time.perf_counter()
    with pytest.raises(VitscopeError, match=r"size: the input gives a 256x358 patch grid = 91,648 tokens"):
        vitscope.capture(vit, image_path, layers=[-1], queries="cls", heads="mean", size=1024)
    with pytest.raises(VitscopeError, match="token limit"):
        vitscope.capture(vit, image_path, size=8192)
    assert time.perf_counter() - t < 5  # refused before resizing or running anything
    # the README's working version: a size within the limit finishes
    attn = vitscope.capture(vit, image_path, layers=[-1], queries="cls", heads="mean", size=256)
    assert attn.grid == (64, 90) and attn.weights.shape == (1, 1, 1, 1, 1 + 64 * 90)


def test_figure_size_and_dpi_are_bounded(tmp_path: Path, tiny_vit: object) -> None:
    from vitscope.viz import save_figure
    from vitscope.viz.make import make_figure

    strip = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (5000, 5, 3), dtype=np.uint8)).save(strip)
    fig = make_figure("heads", [str(strip)], tiny_vit, policy="resize")
    w, h = fig.get_size_inches() * 150
    assert w * h < limits.MAX_FIGURE_PIXELS and h < 20 * w  # a 5x5000 strip no longer makes a 720,000 px figure
    out = save_figure(fig, tmp_path / "heads.png", dpi=40)
    with Image.open(out) as im:
        assert im.size[1] < 5000
    for dpi in (0, -1, 5000):
        with pytest.raises(VitscopeError, match="not a dpi"):
            save_figure(fig, tmp_path / "x.png", dpi=dpi)
    with pytest.raises(VitscopeError, match="pixel limit"):
        save_figure(fig, tmp_path / "x.png", dpi=1000, max_pixels=1_000_000)
    assert not (tmp_path / "x.png").exists()


def test_capture_memory_estimate_names_the_options(tiny_vit: object, image_path: Path) -> None:
    import vitscope
    from vitscope.capture.budget import check_capture_budget, estimate_capture_bytes

    with pytest.raises(VitscopeError, match=r"capture: needs about .* `layers=-1`, `queries='cls'`, `heads='mean'`"):
        vitscope.capture(tiny_vit, image_path, size=64, max_bytes=10_000)
    attn = vitscope.capture(tiny_vit, image_path, size=64, layers=[-1], queries="cls", heads="mean",
                            max_bytes=200_000)
    assert attn.weights.numel() == 1 + 8 * 11
    # ViT-B/16 at 1024 px, every row: the ~10 GB the issue measured is refused by default
    need = estimate_capture_bytes(1, 4097, 12, 12, 4097, head_dim=64)
    assert 9.5e9 < need < 10.5e9
    with pytest.raises(VitscopeError, match="GB of attention memory"):
        check_capture_budget(1, 4097, 12, 12, 4097)
    assert check_capture_budget(1, 4097, 1, 1, 1) < 10e6  # [CLS] row of the last layer, heads fused


def test_wrap_refuses_mean_of_wrong_length(tiny_vit: object) -> None:
    import vitscope

    with pytest.raises(VitscopeError, match="mean: 2 values for 1 channels"):
        vitscope.wrap(tiny_vit.__class__(tiny_vit.cfg), blocks="blocks.*", qkv="attn.qkv", out="attn.proj",  # type: ignore[attr-defined]
                      num_heads=4, patch_size=8, prefix=("cls",), image_size=32, channels=1, mean=(0.1, 0.2))


def test_png_header_helper_is_valid(tmp_path: Path) -> None:
    p = big_png(tmp_path / "small.png", side=1000)
    with Image.open(p) as im:
        im.load()
        assert im.size == (1000, 1000) and np.asarray(im).max() == 0
    assert io.BytesIO(p.read_bytes()).read(8) == b"\x89PNG\r\n\x1a\n"
