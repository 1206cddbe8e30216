"""One rule for weights, in Python as on the command line: ``timm:``, ``torchvision:`` and ``open_clip:`` names
get their library's pretrained weights; ``checkpoint=`` a local file instead; ``random_weights=True`` opts out,
and random weights are always announced (a `VitscopeWarning`, ``info.weights``, ``describe()``, ``vitscope
info``). Offline, the pretrained default is a one-line error that says how to get the weights or opt out.

No download is possible here: the hub is switched off (``HF_HUB_OFFLINE``) and download.pytorch.org made
unreachable, as on an offline machine.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import vitscope
from vitscope.errors import CheckpointError, VitscopeError, VitscopeWarning

timm = pytest.importorskip("timm")

TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 5}

#: scheme -> (spec, loader keywords that keep the model small, the hub page the offline advice names or None)
SCHEMES = {
    "timm": ("timm:vit_tiny_patch16_224", TIMM_TINY, "huggingface.co/timm/vit_tiny_patch16_224"),
    "torchvision": ("torchvision:vit_b_32", {"image_size": 32}, None),
    "open_clip": ("open_clip:ViT-B-32", {}, None),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    import vitscope.adapters._hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(vitscope.adapters._hub, "unreachable", lambda *a, **k: "cannot reach it (test)")


def _load(spec: str, **kwargs: object) -> tuple[vitscope.VitModel, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit = vitscope.load(spec, **kwargs)
    return vit, [w for w in caught if issubclass(w.category, VitscopeWarning)]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_pretrained_by_default_offline_is_one_line_saying_how(scheme: str) -> None:
    spec, small, page = SCHEMES[scheme]
    if scheme == "open_clip":
        pytest.importorskip("open_clip")
    with pytest.raises(CheckpointError) as err:
        vitscope.load(spec, **small)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model: cannot download"), msg
    assert "`checkpoint='path/to/" in msg and "`random_weights=True`" in msg, msg  # get the weights, or opt out
    if page:
        assert page in msg


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_random_weights_are_announced(scheme: str) -> None:
    spec, small, _ = SCHEMES[scheme]
    if scheme == "open_clip":
        pytest.importorskip("open_clip")
    vit, said = _load(spec, random_weights=True, **small)
    assert vit.info.weights == "random"
    assert vit.info.describe().endswith(", random weights"), vit.info.describe()
    assert len(said) == 1 and "random weights" in str(said[0].message)
    assert said[0].filename == __file__  # the warning points at the caller's line, not into vitscope


def test_pretrained_false_is_random_weights_too() -> None:
    vit, said = _load("timm:vit_tiny_patch16_224", pretrained=False, **TIMM_TINY)
    assert vit.info.weights == "random" and len(said) == 1


def test_checkpoint_and_cached_pretrained_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint is named in describe(); the hub's cached file offline is the pretrained weights."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TIMM_TINY)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    vit, said = _load("timm:vit_tiny_patch16_224", checkpoint=path, **TIMM_TINY)
    assert vit.info.weights == f"checkpoint {path}" and not said
    assert vit.info.describe().endswith(f", weights from {path}")
    import vitscope.adapters._hub

    monkeypatch.setattr(vitscope.adapters._hub, "cached_file", lambda *a, **k: str(path))
    cached, said = _load("timm:vit_tiny_patch16_224", **TIMM_TINY)
    assert cached.info.weights == "pretrained" and not said
    assert torch.equal(cached.module.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_other_sources_say_where_their_weights_come_from(tmp_path: Path) -> None:
    from tests.conftest import make_tiny_vit
    from vitscope.models.vit import save_vit

    shapes, said = _load("vitscope:shapes")
    assert shapes.info.weights == "pretrained" and not said
    folder = save_vit(make_tiny_vit(), tmp_path / "tiny")
    assert _load(str(folder))[0].info.weights == f"checkpoint {folder}"
    given = vitscope.load(make_tiny_vit())
    assert given.info.weights == "as given" and "weights" not in given.info.describe()


@pytest.mark.parametrize(("spec", "kwargs", "argument"), [
    ("timm:vit_tiny_patch16_224", {"random_weights": True, "checkpoint": "w.safetensors"}, "random_weights"),
    ("timm:vit_tiny_patch16_224", {"random_weights": True, "pretrained": True}, "random_weights"),
    ("timm:vit_tiny_patch16_224", {"pretrained": True, "checkpoint": "w.safetensors"}, "checkpoint"),
    ("vitscope:shapes", {"random_weights": True}, "random_weights"),
    ("vitscope:shapes", {"checkpoint": "w.safetensors"}, "checkpoint"),
])
def test_contradicting_weight_arguments_are_refused(spec: str, kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(VitscopeError) as err:
        vitscope.load(spec, **kwargs)
    assert err.value.argument == argument and "\n" not in str(err.value)


def test_the_command_line_says_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    from vitscope.cli import run

    assert run(["info", "-m", "timm:vit_tiny_patch16_224", "--random-weights"]) == 0
    res = capsys.readouterr()
    assert res.out.splitlines()[0].endswith(", random weights")
    assert [ln for ln in res.err.splitlines() if ln] == [
        "note: vit_tiny_patch16_224 has random weights: its attention is not learned, so its maps show no real "
        "structure"]
    assert run(["info", "-m", "timm:vit_tiny_patch16_224", "--random-weights", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "random"
    assert run(["info", "-m", "vitscope:shapes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "pretrained"
    assert run(["info", "-m", "timm:vit_tiny_patch16_224"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: --model: cannot download timm's weights") and "\n" not in line
    assert "--checkpoint path/to/model.safetensors" in line and "--random-weights" in line
