"""Every source kind through the command line and batch mode: ``info``, ``maps``, ``view`` and ``batch`` on a
model from a transformers folder, a timm name, a torchvision name, an open_clip name, a DINO checkpoint and the
bundled vitscope model. The CLI's map equals `vitscope.maps` on the same model, and batch mode's equals it too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from vitscope.cli import run

transformers = pytest.importorskip("transformers")


def _hf_dinov3(tmp: Path) -> tuple[str, list[str]]:
    cfg = transformers.DINOv3ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, num_register_tokens=4)
    torch.manual_seed(0)
    transformers.DINOv3ViTModel(cfg).eval().save_pretrained(tmp / "dinov3")
    return f"hf:{tmp / 'dinov3'}", []


def _hf_beit(tmp: Path) -> tuple[str, list[str]]:
    cfg = transformers.BeitConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, use_relative_position_bias=True)
    torch.manual_seed(0)
    transformers.BeitModel(cfg).eval().save_pretrained(tmp / "beit")
    return f"hf:{tmp / 'beit'}", []


def _dino(tmp: Path) -> tuple[str, list[str]]:
    from tests.adapters.test_checkpoint import _dino_like

    path = tmp / "dino.pth"
    torch.save(_dino_like().state_dict(), path)
    return f"dino:{path}", []


#: source kind -> builder of (model spec, extra CLI options)
SOURCES: dict[str, Callable[[Path], tuple[str, list[str]]]] = {
    "vitscope": lambda _tmp: ("vitscope:shapes", []),
    "hf-dinov3": _hf_dinov3,
    "hf-beit": _hf_beit,
    "timm-eva02": lambda _tmp: ("timm:eva02_tiny_patch14_224", ["--random-weights"]),
    "timm-dinov3": lambda _tmp: ("timm:vit_small_patch16_dinov3", ["--random-weights"]),
    "torchvision": lambda _tmp: ("torchvision:vit_b_32", ["--random-weights"]),
    "open_clip": lambda _tmp: ("open_clip:ViT-B-32", ["--random-weights"]),
    "dino": _dino,
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    return root


def _spec_model(spec: str, extra: list[str]) -> vitscope.VitModel:
    """The model the CLI builds for ``spec`` (random weights seeded as the CLI's run was)."""
    return vitscope.load(spec, random_weights="--random-weights" in extra)  # the same rule for weights as the CLI


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_through_cli_and_batch(source: str, images: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    spec, extra = SOURCES[source](tmp_path)
    assert run(["info", "-m", spec, "--json", *extra]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_layers"] >= 1 and info["num_heads"] >= 1
    image = images / "im0.png"
    torch.manual_seed(1)  # random-weight architectures: the CLI and the reference get the same weights
    assert run(["maps", str(image), "-m", spec, "--method", "rollout", "-o", str(tmp_path / "m.npz"), *extra]) == 0
    torch.manual_seed(1)
    vit = _spec_model(spec, extra)
    with np.load(tmp_path / "m.npz") as data:
        got = data["map"]
        meta = json.loads(str(data["meta_json"]))
    ref = vitscope.maps(vit, str(image), "rollout").map.numpy()
    assert meta["method"] == "rollout" and meta["prefix"] == list(vit.info.prefix)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert float(np.ptp(ref)) > 0  # a constant map would match anything
    assert run(["view", str(image), "-m", spec, "-o", str(tmp_path / "v.html"), *extra]) == 0
    assert (tmp_path / "v.html").stat().st_size > 1000
    torch.manual_seed(1)
    assert run(["batch", str(images), "-o", str(tmp_path / "b"), "-m", spec, "--method", "cls", "--workers", "0",
                "--quiet", *extra]) == 0
    manifest = [json.loads(line) for line in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in manifest) == ["ok", "ok"]
    with np.load(tmp_path / "b" / "im1.cls.npz") as data:
        batch_map = data["map"]
    direct = vitscope.maps(vit, str(images / "im1.png"), "cls").map[0].numpy()
    np.testing.assert_allclose(batch_map, direct, atol=1e-5)
