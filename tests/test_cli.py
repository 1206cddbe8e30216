"""Foundation CLI commands: `info`, `capture`, and one-line errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_vit
from vitscope.attentions import Attentions
from vitscope.models.vit import save_vit


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_vit(make_tiny_vit(num_registers=2), tmp_path / "tiny")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vitscope", *args], capture_output=True, text=True, timeout=120)


def test_capture_writes_npz_equal_to_library(model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    import vitscope

    out = tmp_path / "a.npz"
    res = run_cli("capture", str(image_path), "--model", str(model_dir), "-o", str(out), "--layers", "-1",
                  "--queries", "cls")
    assert res.returncode == 0, res.stderr
    saved = Attentions.load(out)
    direct = vitscope.capture(vitscope.load(model_dir), image_path, layers=[-1], queries="cls")
    assert saved.prefix == ("cls", "register", "register")
    assert saved.layers == (1,)
    torch.testing.assert_close(saved.weights, direct.weights, rtol=0, atol=1e-6)  # thread count differs
    np.testing.assert_allclose(saved.weights.sum(-1).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["capture", "missing.png"], "image: file not found"),
        (["capture", "{img}", "--layers", "7"], "layers: layer 7 out of range"),
        (["capture", "{img}", "--layers", "x"], "--layers: cannot parse"),
        (["info", "--model", "nope/nothing"], "model:"),
        (["capture", "{txt}"], "is not an image"),
        (["capture", "{empty}"], "is empty (0 bytes)"),
        (["capture", "{img}", "--heads", "some"], "--heads: unknown value"),
        (["info", "--model", "dino:{tmp}/missing.pth"], "checkpoint file not found"),
        (["info", "--model", "{tmp}/missing.pth"], "model:"),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    args: list[str], needle: str, model_dir: Path, image_path: Path, tmp_path: Path
) -> None:
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    args = [a.format(img=image_path, txt=txt, empty=empty, tmp=tmp_path) for a in args]
    if args[0] == "capture":
        args += ["--model", str(model_dir)]
    res = run_cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_info_describes_prefix_tokens(model_dir: Path) -> None:
    res = run_cli("info", "--model", str(model_dir))
    assert res.returncode == 0, res.stderr
    assert "prefix tokens [cls, register, register]" in res.stdout
    assert "2 layers x 4 heads" in res.stdout


def test_version() -> None:
    import vitscope

    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"vitscope {vitscope.__version__}"
