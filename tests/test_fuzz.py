"""Fuzzing (hypothesis): image bytes, shapes and modes through the readers, and argument values through the
CLI. Nothing may end in a traceback, an exit code other than 0/2/130, a partly written output, or unbounded
memory. 250 library cases in-process plus 60 CLI cases, derandomized so CI runs the same 310 every time."""

from __future__ import annotations

import contextlib
import io
import resource
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.conftest import make_tiny_vit  # noqa: E402
from vitscope.adapters.base import Preprocess  # noqa: E402
from vitscope.errors import VitscopeError  # noqa: E402
from vitscope.images import image_to_pixels, load_image  # noqa: E402
from vitscope.models.vit import save_vit  # noqa: E402
from vitscope.viewer.server import UploadError, decode_upload  # noqa: E402

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
PREP = Preprocess(image_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), policy="resize",
                  dynamic_size=True)


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _header_png(w: int, h: int) -> bytes:
    """A PNG that claims ``w x h`` pixels but carries almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["image", "image", "image", "random", "bomb"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "bomb":
        return _header_png(draw(st.integers(10_001, 60_000)), draw(st.integers(10_001, 60_000)))
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("RGB")
    img = img.convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        img = img.convert(mode) if mode != "I;16" else Image.fromarray(
            rng.integers(0, 65536, (h, w), dtype=np.uint16))
    fmt = draw(st.sampled_from(FORMATS))
    buf = io.BytesIO()
    kwargs: dict[str, object] = {}
    if fmt == "JPEG" and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))
        kwargs["exif"] = exif.tobytes()
    try:
        img.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        img.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    if draw(st.booleans()) and len(data) > 8:  # truncated or corrupted
        cut = draw(st.integers(1, len(data) - 1))
        data = data[:cut] if draw(st.booleans()) else data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1:]
    return data


SIZES = st.one_of(st.none(), st.integers(-4, 96), st.tuples(st.integers(-2, 80), st.integers(-2, 80)),
                  st.sampled_from([10**6, 0.5, "64"]))


def test_fuzz_image_readers() -> None:
    calls: list[int] = []
    rss0 = _rss()

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=image_bytes(), policy=st.sampled_from([None, "resize", "crop", "native", "bogus"]), size=SIZES)
    def check(data: bytes, policy: str | None, size: object) -> None:
        calls.append(1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "x.img"
            path.write_bytes(data)
            try:
                img = load_image(path)
            except VitscopeError:
                img = None
            if img is not None:
                assert img.mode == "RGB" and img.width * img.height <= 10**8
                try:
                    px = image_to_pixels(img, PREP, (8, 8), policy, size)  # type: ignore[arg-type]
                except VitscopeError:
                    pass
                else:
                    assert px.shape[0] == 3 and px.shape[1] >= 8 and px.shape[2] >= 8
                    assert torch.isfinite(px).all()
        try:
            up = decode_upload(data)
            assert up.mode == "RGB"
        except UploadError as exc:
            assert exc.status in (413, 415)

    check()
    assert len(calls) >= 250
    assert _rss() - rss0 < 1.5e9  # generous guard: nothing decoded a bomb


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzzcli")
    img = root / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(img)
    return {"img": img, "model": save_vit(make_tiny_vit(), root / "tiny")}


TEXT = st.text(alphabet="-0123456789x,:abc .", max_size=6)
OUTPUTS = st.sampled_from(["out.npz", "out.png", "out.gif", "out", "out.html", "out.pdf", "sub/out.npz",
                           "exists", "afile/x.npz"])


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    cmd = draw(st.sampled_from(["maps", "capture", "figure", "view", "info"]))
    args: list[str] = []
    if cmd == "figure":
        args += [draw(st.sampled_from(["heads", "panel", "grid", "norms", "nope"]))]
    if cmd != "info":
        args += ["{img}"]
    args += ["-m", "{model}"]
    options = {
        "maps": {"--layer": TEXT, "--head": st.sampled_from(["mean", "max", "3", "9", "x", "-1"]),
                 "--query": st.sampled_from(["cls", "mean", "1,2", "9,9", "x", "register:0"]),
                 "--method": st.sampled_from(["cls", "rollout", "dino_mask", "bogus"]), "--size": TEXT,
                 "--tau": st.sampled_from(["0.6", "-1", "2", "nan", "x"]), "--policy": TEXT},
        "capture": {"--layers": TEXT, "--queries": st.sampled_from(["all", "cls", "x"]), "--size": TEXT,
                    "--heads": st.sampled_from(["all", "mean", "2"]), "--max-memory": TEXT},
        "figure": {"--dpi": st.sampled_from(["0", "-3", "20", "40", "5000", "x"]), "--layer": TEXT,
                   "--alpha": st.sampled_from(["0.5", "2", "-1", "x"]), "--size": TEXT, "--cmap": TEXT},
        "view": {"--budget-mb": st.sampled_from(["0.01", "0", "-1", "x", "6"]), "--size": TEXT,
                 "--dtype": st.sampled_from(["uint8", "float16", "int4"])},
        "info": {"--json": st.just(None), "--random-weights": st.just(None)},
    }[cmd]
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)):
        value = draw(options[name])
        args += [name] if value is None else [name, value]
    if cmd != "info":
        args += ["-o", "{out}/" + draw(OUTPUTS)]
    return [cmd, *args]


def test_fuzz_cli_arguments(cli_files: dict[str, Path]) -> None:
    from vitscope.cli import run

    calls: list[int] = []
    rss0 = _rss()

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(args=argv())
    def check(args: list[str]) -> None:
        calls.append(1)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "o"
            out.mkdir()
            (out / "exists").mkdir()
            (out / "afile").write_text("x")
            before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
            filled = [a.format(img=cli_files["img"], model=cli_files["model"], out=out) for a in args]
            err, std = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
                code = run(filled)
            text = err.getvalue()
            assert code in (0, 2, 130), (filled, code, text)
            assert "Traceback" not in text and "Traceback" not in std.getvalue()
            assert not list(out.rglob("*.vitscope-tmp*"))  # nothing half-written
            if code == 2:
                lines = [ln for ln in text.splitlines() if ln.strip()]
                assert len(lines) == 1 and lines[0].startswith("error: "), (filled, text)
                after = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
                assert after == before, (filled, after)  # refused or failed: no output at all

    check()
    assert len(calls) >= 60
    assert _rss() - rss0 < 1.5e9
