"""Offline behaviour of hub loading: a one-line error at once, or the local cache without the hub's retries.

Every socket here is on 127.0.0.1: a closed port stands for "no network", a listening one for "reachable".
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

import vitscope
from vitscope.adapters import _hub
from vitscope.errors import CheckpointError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub read HF_HUB_OFFLINE / HF_ENDPOINT at import: set its constants as the variables would."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")


def test_offline_reason(monkeypatch: pytest.MonkeyPatch, no_hub: None) -> None:
    from huggingface_hub import constants

    assert "cannot reach 127.0.0.1" in (_hub.offline_reason() or "")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert _hub.offline_reason() is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _hub.offline_reason() == "HF_HUB_OFFLINE is set"


def test_uncached_hub_id_fails_at_once_in_one_line(no_hub: None, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        vitscope.load("hf:vitscope-tests/not-cached", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "offline" in message and "not in the local Hugging Face cache" in message
    assert time.monotonic() - t0 < 20  # no retry back-off (it takes ~25 s per file); generous for slow machines


def _fake_cache(cache: Path, repo: str, folder: Path) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<rev>/files}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123456789abcdef")


def test_cached_hub_id_loads_offline(no_hub: None, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8)
    model = transformers.ViTModel(cfg).eval()
    model.save_pretrained(tmp_path / "saved")
    _fake_cache(tmp_path / "cache", "vitscope-tests/cached-vit", tmp_path / "saved")
    vit = vitscope.load("hf:vitscope-tests/cached-vit", cache_dir=str(tmp_path / "cache"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(x).last_hidden_state, model(pixel_values=x).last_hidden_state)


def test_timm_pretrained_offline_uses_the_cached_weights(monkeypatch: pytest.MonkeyPatch, no_hub: None,
                                                         tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 3}
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", **tiny).eval()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    asked: list[tuple[str, str]] = []

    def fake_cache(repo: str, filename: str, cache_dir: object = None) -> str:
        asked.append((repo, filename))
        return str(weights)

    monkeypatch.setattr(_hub, "cached_file", fake_cache)
    vit = vitscope.load("timm:vit_tiny_patch16_224", pretrained=True, **tiny)
    assert asked and asked[0][0].startswith("timm/vit_tiny_patch16_224") and asked[0][1] == "model.safetensors"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(x), ref(x))


def test_timm_pretrained_offline_uncached_says_how(no_hub: None) -> None:
    pytest.importorskip("timm")
    for how in ({}, {"pretrained": True}):  # pretrained is the default
        with pytest.raises(CheckpointError, match=r"^model: cannot download .* offline .*checkpoint=.*random_weights"):
            vitscope.load("timm:vit_tiny_patch16_224", **how)
