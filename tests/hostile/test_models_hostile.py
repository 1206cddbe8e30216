"""The hostile-input catalogue for model files: configs, weights and checkpoints that are wrong, damaged,
malicious or memory bombs, through the library (one `VitscopeError` naming the file) and the CLI (exit 2, one
line naming ``--model`` / ``--checkpoint`` and the file, no traceback).

- ``CASES``: one table of hand-written files (vitscope folders, Hugging Face folders, DINO ``.pth``, timm
  ``--checkpoint``, torchvision state dicts);
- hypothesis: config.json bodies with one field made hostile, and DINO state dicts with one tensor replaced
  (types, ranks, shapes, dtypes, zero strides);
- malicious pickles must never run (a sentinel file is never created) and memory bombs must stay small (the
  process's peak RSS).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from tests.conftest import make_tiny_vit
from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, run_script, tree_state
from vitscope.errors import VitscopeError
from vitscope.models.vit import save_vit

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TIMM = "timm:vit_tiny_patch16_224"
BIG = 10**9


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Evil:
    """Unpickling this runs ``open(sentinel, "w")``: it must never happen."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.sentinel), "w"))


def _evil_pickle(sentinel: Path, protocol: int) -> bytes:
    return pickle.dumps({"patch_embed.proj.weight": _Evil(sentinel)}, protocol=protocol)


def _dino_state() -> dict[str, torch.Tensor]:
    """A DINO ViT-Tiny-width backbone (dim 192 -> 3 heads), 1 block, patch 8, 16x16 (a 2x2 grid)."""
    return dict(make_tiny_vit(dim=192, heads=3, depth=1, image_size=(16, 16), num_classes=0).state_dict())


def _timm_state() -> dict[str, torch.Tensor]:
    return {"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}


@dataclass(repr=False)
class Files:
    root: Path
    vit_cfg: dict[str, Any]
    weights: bytes
    dino: dict[str, torch.Tensor]
    hf_cfg: dict[str, Any] = field(default_factory=dict)
    hf_weights: bytes = b""
    n: int = 0

    def path(self, name: str) -> Path:
        self.n += 1
        p = self.root / f"c{self.n:03d}" / name
        p.parent.mkdir(parents=True)
        return p

    def folder(self, config: Any, weights: bytes | None = None, extra: dict[str, bytes] | None = None) -> Path:
        """A model folder: ``config`` (a dict is JSON-dumped, str/bytes written as is) + ``model.safetensors``."""
        d = self.path("model")
        d.mkdir()
        body = config if isinstance(config, bytes) else (config if isinstance(config, str) else json.dumps(config))
        (d / "config.json").write_bytes(body if isinstance(body, bytes) else body.encode())
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        for name, data in (extra or {}).items():
            (d / name).write_bytes(data)
        return d

    def vit(self, **changes: Any) -> Path:
        return self.folder({**self.vit_cfg, **changes}, self.weights)

    def hf(self, weights: bytes | None = None, files: dict[str, bytes] | None = None, **changes: Any) -> Path:
        return self.folder({**self.hf_cfg, **changes}, self.hf_weights if weights is None else weights, files)

    def ckpt(self, obj: Any, name: str = "w.pth") -> Path:
        p = self.path(name)
        if isinstance(obj, bytes):
            p.write_bytes(obj)
        elif name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(obj, str(p))
        else:
            torch.save(obj, p)
        return p

    def dino_with(self, **changes: Any) -> Path:
        """The DINO state dict with keys replaced (``None`` deletes); ``__`` in a name stands for ``.``."""
        state: dict[str, Any] = dict(self.dino)
        for k, v in changes.items():
            key = k.replace("__", ".")
            if v is None:
                state.pop(key)
            else:
                state[key] = v
        return self.ckpt(state)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("hostile_models")
    good = save_vit(make_tiny_vit(), root / "good")
    f = Files(root, json.loads((good / "config.json").read_text()), (good / "model.safetensors").read_bytes(),
              _dino_state())
    transformers = pytest.importorskip("transformers")
    hf = root / "hf_good"
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8)
    torch.manual_seed(0)
    transformers.ViTModel(cfg).save_pretrained(hf)
    f.hf_cfg = json.loads((hf / "config.json").read_text())
    f.hf_weights = (hf / "model.safetensors").read_bytes()
    return f


def _zero_stride(*shape: int) -> torch.Tensor:
    """A tensor claiming ``shape`` that stores one number (strides 0): tiny on disk, huge if copied."""
    return torch.zeros(1).expand(*shape)


#: (id, build(files) -> (spec, load kwargs), what the error line must contain besides the file)
Case = tuple[str, Callable[[Files], tuple[str, dict[str, Any]]], str]


def _v(**changes: Any) -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: (str(f.vit(**changes)), {})


def _body(body: Any, weights: bool = True) -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: (str(f.folder(body, f.weights if weights else None)), {})


def _w(data: Callable[[Files], bytes]) -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: (str(f.folder(f.vit_cfg, data(f))), {})


def _hf(**changes: Any) -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: (str(f.hf(**changes)), {})


def _d(**changes: Any) -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: ("dino:" + str(f.dino_with(**changes)), {})


def _dobj(obj: Callable[[Files], Any], name: str = "w.pth") -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: ("dino:" + str(f.ckpt(obj(f), name)), {})


def _t(obj: Callable[[Files], Any], name: str = "w.pth") -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: (TIMM, {"checkpoint": f.ckpt(obj(f), name)})


def _tv(obj: Callable[[Files], Any]) -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: ("torchvision:vit_b_32", {"checkpoint": f.ckpt(obj(f)), "image_size": 32})


def _oc(obj: Callable[[Files], Any]) -> Callable[[Files], tuple[str, dict[str, Any]]]:
    return lambda f: ("open_clip:ViT-B-32", {"checkpoint": f.ckpt(obj(f))})


CASES: list[Case] = [
    # --- vitscope folders: config.json
    ("cfg-list", _body([]), "not an object"),
    ("cfg-string", _body("\"vit\""), "not an object"),
    ("cfg-null", _body("null"), "not an object"),
    ("cfg-broken-json", _body("{\"dim\": "), "not valid JSON"),
    ("cfg-not-utf8", _body(b"\xff\xfe{\x00}"), "cannot read"),
    ("cfg-deep-json", _body("[" * 100_000 + "]" * 100_000), "config.json"),
    ("dim-big", _v(dim="big"), "dim must be an integer"),
    ("dim-float", _v(dim=31.5), "dim must be an integer"),
    ("dim-bool", _v(dim=True), "dim must be an integer"),
    ("dim-huge", _v(dim=10**7), "dim must be from 1"),
    ("depth-negative", _v(depth=-3), "depth must be from 1"),
    ("depth-zero", _v(depth=0), "depth must be from 1"),
    ("depth-huge", _v(depth=10**9), "depth must be from 1"),
    ("depth-null", _v(depth=None), "depth must be an integer"),
    ("heads-zero", _v(heads=0), "heads must be from 1"),
    ("heads-not-dividing", _v(heads=7), "divisible by heads=7"),
    ("heads-over-dim", _v(heads=64), "heads must be from 1"),
    ("image-size-1e9", _v(image_size=[1e9, 1e9]), "image_size must be from 1"),
    ("image-size-text", _v(image_size="abc"), "image_size must be (height, width)"),
    ("image-size-one", _v(image_size=[32]), "image_size must be (height, width)"),
    ("image-size-negative", _v(image_size=[-32, 32]), "image_size must be from 1"),
    ("patch-zero", _v(patch_size=0), "patch_size must be from 1"),
    ("patch-over-image", _v(patch_size=64), "patch_size must be from 1"),
    ("mlp-nan", _body('{"architecture": "vitscope.ViT", "mlp_ratio": NaN}'), "mlp_ratio must be a finite number"),
    ("mlp-inf", _body('{"architecture": "vitscope.ViT", "mlp_ratio": Infinity}'), "mlp_ratio must be a finite"),
    ("mlp-negative", _v(mlp_ratio=-4), "mlp_ratio must be above 0"),
    ("mlp-huge", _v(mlp_ratio=1e12), "mlp_ratio must be from 1"),
    ("classes-negative", _v(num_classes=-1), "num_classes must be from 0"),
    ("registers-negative", _v(num_registers=-1), "num_registers must be from 0"),
    ("eps-zero", _v(norm_eps=0), "norm_eps must be above 0"),
    ("dropout-two", _v(dropout=2), "dropout must be at least 0"),
    ("mean-empty", _v(mean=[]), "mean must be a list"),
    ("std-zero", _v(std=[0, 0, 0]), "std must be above 0"),
    ("qkv-bias-text", _v(qkv_bias="yes"), "qkv_bias must be true or false"),
    ("labels-number", _v(labels=5), "labels must be a list"),
    ("pos-interp", _v(pos_interp="area"), "pos_interp="),
    ("bytes-bomb", _v(dim=100_000, heads=1, depth=1000, mlp_ratio=4), "GB of parameters"),
    ("tokens-bomb", _v(image_size=[1_000_000, 1_000_000], patch_size=1), "image_size must be from 1"),
    ("depth-mismatch", _v(depth=3), "does not fit its architecture: missing"),
    ("dim-mismatch", _v(dim=64, heads=4), "does not fit its architecture"),
    # --- vitscope folders: model.safetensors
    ("weights-truncated", _w(lambda f: f.weights[: len(f.weights) // 2]), "not a readable safetensors"),
    ("weights-header-only", _w(lambda f: f.weights[:8]), "not a readable safetensors"),
    ("weights-garbage", _w(lambda f: b"\x00" * 64), "not a readable safetensors"),
    ("weights-missing", _body({"architecture": "vitscope.ViT"}, weights=False), "not found"),
    # --- Hugging Face folders
    ("hf-hidden-abc", _hf(hidden_size="abc"), "hidden_size"),
    ("hf-hidden-bomb", _hf(hidden_size=BIG), "hidden_size must be from 1"),
    ("hf-layers-negative", _hf(num_hidden_layers=-1), "num_hidden_layers"),
    ("hf-heads-zero", _hf(num_attention_heads=0), "num_attention_heads"),
    ("hf-image-1e9", _hf(image_size=BIG), "image_size"),
    ("hf-bytes-bomb", _hf(hidden_size=200_000, intermediate_size=800_000, num_hidden_layers=64), "GB of parameters"),
    ("hf-width-mismatch", _hf(hidden_size=64, intermediate_size=64), "MISMATCH"),  # one line, not the report
    ("hf-truncated", lambda f: (str(f.hf(weights=f.hf_weights[:100])), {}), "model.safetensors"),
    ("hf-preprocessor-garbage", lambda f: (str(f.hf(files={"preprocessor_config.json": b"\xff{"})), {}),
     "preprocessor"),
    ("hf-preprocessor-values", lambda f: (str(f.hf(files={"preprocessor_config.json": json.dumps(
        {"image_mean": ["a"], "size": {"height": -1, "width": "x"}}).encode()})), {}), "preprocessor"),
    # --- DINO checkpoints (dino:)
    ("dino-pos-1d", _d(pos_embed=torch.zeros(17)), "pos_embed has shape (17,)"),
    ("dino-pos-no-patches", _d(pos_embed=torch.zeros(1, 1, 192)), "no patch positions"),
    ("dino-patch-0x0", _d(patch_embed__proj__weight=torch.zeros(192, 3, 0, 0)), "patch_embed.proj.weight"),
    ("dino-patch-rank3", _d(patch_embed__proj__weight=torch.zeros(192, 3, 8)), "patch_embed.proj.weight"),
    ("dino-patch-not-square", _d(patch_embed__proj__weight=torch.zeros(192, 3, 8, 4)), "square"),
    ("dino-patch-int", _d(patch_embed__proj__weight=torch.zeros(192, 3, 8, 8, dtype=torch.int64)), "int64"),
    ("dino-qkv-int", _d(blocks__0__attn__qkv__weight=torch.zeros(576, 192, dtype=torch.int32)), "int32"),
    ("dino-no-pos", _d(pos_embed=None), "has no 'pos_embed'"),
    ("dino-no-cls", _d(cls_token=None), "has no 'cls_token'"),
    ("dino-no-norm", _d(norm__weight=None), "missing ['norm.weight']"),
    ("dino-fc2-wrong", _d(blocks__0__mlp__fc2__weight=torch.zeros(192, 7)), "blocks.0.mlp.fc2.weight"),
    ("dino-head-wrong", _d(head__weight=torch.zeros(10, 7), head__bias=torch.zeros(10)), "head.weight"),
    ("dino-non-tensors", _dobj(lambda f: {"patch_embed.proj.weight": 3, "pos_embed": "x"}), "no tensors"),
    ("dino-list", _dobj(lambda f: [torch.zeros(3)]), "holds a list"),
    ("dino-tensor", _dobj(lambda f: torch.zeros(3)), "holds a Tensor"),
    ("dino-garbage", _dobj(lambda f: b"PK\x03\x04garbage" * 10), "not a readable PyTorch checkpoint"),
    ("dino-empty", _dobj(lambda f: b""), "is empty"),
    ("dino-truncated-zip", lambda f: ("dino:" + str(f.ckpt(_truncated(f))), {}), "not a readable PyTorch"),
    ("dino-safetensors-truncated", _dobj(lambda f: f.weights[:40], "w.safetensors"), "not a readable safetensors"),
    ("dino-head-bomb", _d(head__weight=torch.zeros(BIG, 0)), "larger than any ViT"),  # the 768 GB
    ("dino-patch-bomb", _d(patch_embed__proj__weight=torch.zeros(BIG, 3, 0, 0)), "larger than any ViT"),
    ("dino-stride-bomb", _d(pos_embed=_zero_stride(1, 100_000, 100_000)), "GB, more than vitscope loads"),
    ("dino-st-bomb", _dobj(lambda f: {**f.dino, "head.weight": torch.zeros(BIG, 0)}, "w.safetensors"),
     "larger than any ViT"),
    ("dino-rank-bomb", _d(cls_token=torch.zeros((1,) * 9)), "larger than any ViT"),
    ("dino-malicious-v2", lambda f: ("dino:" + str(f.ckpt(_evil_pickle(f.root / "PWNED", 2))), {}),
     "unpickling it could run code"),
    ("dino-malicious-v4", lambda f: ("dino:" + str(f.ckpt(_evil_pickle(f.root / "PWNED", 4))), {}), "w.pth"),
    # --- timm --checkpoint
    ("timm-head-bomb", _t(lambda f: {"head.weight": torch.zeros(BIG, 0)}), "larger than any ViT"),
    ("timm-head-empty", _t(lambda f: {"head.weight": torch.zeros(10, 0)}), "head.weight has shape (10, 0)"),
    ("timm-stride-bomb", _t(lambda f: {"pos_embed": _zero_stride(1, 200_000, 100_000)}), "GB, more than"),
    ("timm-pos-giant", _t(lambda f: {**_timm_state(), "pos_embed": _zero_stride(1, 100_000, 10_000)}),
     "far larger than"),  # 4 GB claimed: under the 20 GB bound, but no resampling of it is ever right
    ("timm-pos-1d", _t(lambda f: {**_timm_state(), "pos_embed": torch.zeros(197)}), "pos_embed has shape (197,)"),
    ("timm-patch-0x0", _t(lambda f: {**_timm_state(), "patch_embed.proj.weight": torch.zeros(192, 3, 0, 0)}),
     "patch_embed.proj.weight has shape (192, 3, 0, 0)"),
    ("timm-cls-int", _t(lambda f: {**_timm_state(), "cls_token": torch.zeros(1, 1, 192, dtype=torch.int64)}),
     "int64"),
    ("timm-norm-rank", _t(lambda f: {**_timm_state(), "norm.weight": torch.zeros(1, 192)}), "norm.weight"),
    ("timm-non-tensors", _t(lambda f: {"head.weight": [1, 2]}), "no tensors"),
    ("timm-list", _t(lambda f: [1, 2]), "not a state dict"),
    ("timm-malicious", _t(lambda f: _evil_pickle(f.root / "PWNED", 2)), "unpickling it could run code"),
    ("timm-st-truncated", _t(lambda f: f.weights[:40], "w.safetensors"), "not a readable safetensors"),
    # --- torchvision --checkpoint
    ("tv-non-tensor", _tv(lambda f: {"class_token": 3}), "'class_token' holds a int"),
    ("tv-stride-bomb", _tv(lambda f: {"class_token": _zero_stride(1, 1, 1000), "x": _zero_stride(200_000, 100_000)}),
     "GB, more than"),
    ("tv-wrong-shape", _tv(lambda f: {"class_token": torch.zeros(1, 1, 7)}), "class_token has shape (1, 1, 7)"),
    # --- open_clip --checkpoint (refused before the model is built)
    ("clip-non-tensor", _oc(lambda f: {"visual.class_embedding": "x"}), "'visual.class_embedding' holds a str"),
    ("clip-stride-bomb", _oc(lambda f: {"visual.proj": _zero_stride(300_000, 100_000)}), "GB, more than"),
    ("clip-head-bomb", _oc(lambda f: {"visual.proj": torch.zeros(BIG, 0)}), "larger than any ViT"),
]


def _truncated(f: Files) -> bytes:
    p = f.path("full.pth")
    torch.save(f.dino, p)
    data = p.read_bytes()
    return data[: len(data) // 2]


def _check_error(exc: VitscopeError, spec: str, kwargs: dict[str, Any], needle: str) -> None:
    text = str(exc)
    assert "\n" not in text, text
    assert needle in text, (needle, text)
    target = str(kwargs.get("checkpoint", spec.removeprefix("dino:")))
    assert target in text or Path(target).name in text, f"names no file: {text}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_library_refuses(files: Files, case: Case) -> None:
    """Each hostile file: one `VitscopeError` naming the file and what is wrong; malicious pickles never ran."""
    _, build, needle = case
    spec, kwargs = build(files)
    rss0 = _rss()
    with pytest.raises(VitscopeError) as info:
        vitscope.load(spec, **kwargs)
    _check_error(info.value, spec, kwargs, needle)
    assert not (files.root / "PWNED").exists(), "a pickle ran code"
    assert _rss() - rss0 < 500e6, "a bomb was allocated"


#: a subset through the CLI in-process: the same files, named with --model / --checkpoint
CLI_CASES = ["cfg-list", "dim-big", "depth-negative", "image-size-1e9", "weights-truncated", "hf-hidden-abc",
             "hf-hidden-bomb", "hf-width-mismatch", "dino-pos-1d", "dino-patch-0x0", "dino-head-bomb", "dino-malicious-v2",
             "timm-head-bomb", "timm-pos-1d", "timm-malicious", "tv-non-tensor", "tv-stride-bomb", "clip-head-bomb"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_refuses(files: Files, name: str) -> None:
    _, build, needle = next(c for c in CASES if c[0] == name)
    spec, kwargs = build(files)
    argv = ["info", "-m", spec] + (["--checkpoint", str(kwargs["checkpoint"])] if "checkpoint" in kwargs else [])
    line = assert_one_line(run_inprocess(argv), 2, needle=needle)
    option = "--checkpoint" if "checkpoint" in kwargs else "--model"
    assert line.startswith(f"error: {option}: "), line
    target = str(kwargs.get("checkpoint", spec.removeprefix("dino:")))
    assert target in line or Path(target).name in line, line
    assert not (files.root / "PWNED").exists()


@pytest.mark.parametrize("name", ["dim-big", "dino-head-bomb"])
def test_cli_maps_writes_nothing(files: Files, tmp_path: Path, name: str) -> None:
    """``maps`` with a hostile model: nothing inside or outside -o changes (a user's file there survives)."""
    _, build, needle = next(c for c in CASES if c[0] == name)
    spec, _ = build(files)
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_state(tmp_path)
    line = assert_one_line(run_inprocess(["maps", str(img), "-m", spec, "-o", str(out)]), 2, needle=needle)
    assert line.startswith("error: --model: "), line
    check_contained(before, tree_state(tmp_path), tmp_path, [out])


def test_console_script_malicious_checkpoint(files: Files) -> None:
    """The installed script on a DINO checkpoint whose pickle would run code: refused in one line, and the code
    never ran."""
    path = files.ckpt(_evil_pickle(files.root / "PWNED", 2))
    line = assert_one_line(run_script(["info", "-m", f"dino:{path}"]), 2, needle="unpickling it could run code")
    assert line.startswith("error: --model: ") and str(path) in line, line
    assert not (files.root / "PWNED").exists()


def test_malicious_hf_folder_is_quiet(files: Files, capfd: pytest.CaptureFixture[str]) -> None:
    """A Hugging Face folder whose pytorch_model.bin would run code: refused naming the file, nothing printed
    (torch's "Detected pickle protocol" warning would be a second stderr line), the code never ran."""
    import warnings

    d = files.folder({**files.hf_cfg}, None, {"pytorch_model.bin": _evil_pickle(files.root / "PWNED", 4)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning is a failure
        with pytest.raises(VitscopeError, match=r"pytorch_model\.bin"):
            vitscope.load(d)
    assert capfd.readouterr().err == ""
    assert not (files.root / "PWNED").exists()


def test_auto_map_code_never_runs(files: Files) -> None:
    """A Hugging Face folder whose config.json points ``auto_map`` at Python shipped next to it: the model loads
    as the transformers class it names (a ViT), and the file's code is never imported."""
    sentinel = files.root / "AUTO_MAP_RAN"
    code = f"open({str(sentinel)!r}, 'w')\n".encode()
    d = files.hf(files={"modeling_evil.py": code, "configuration_evil.py": code},
                 auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"})
    vit = vitscope.load(d)
    assert type(vit.module).__name__ == "ViTModel" and vit.info.num_layers == 1
    assert not sentinel.exists()


def test_bombs_stay_small(files: Files) -> None:
    """The issue's memory bombs, each a few KB that claims gigabytes to terabytes: the peak RSS stays small."""
    bombs = [c for c in CASES if "bomb" in c[0]]
    assert len(bombs) >= 8
    rss0 = _rss()
    for _, build, _needle in bombs:
        spec, kwargs = build(files)
        with pytest.raises(VitscopeError):
            vitscope.load(spec, **kwargs)
    assert _rss() - rss0 < 300e6


# ----------------------------------------------------------------------------------------------- generated
_MAX = 1_000_000


def _bad_int(low: int, high: int = _MAX) -> st.SearchStrategy[Any]:
    """Values that are never an integer in ``[low, high]``."""
    return st.one_of(
        st.integers(max_value=low - 1), st.integers(min_value=high + 1, max_value=10**30),
        st.floats().filter(lambda x: not (math.isfinite(x) and x.is_integer())),
        st.text(max_size=5), st.booleans(), st.none(), st.lists(st.integers(1, 9), max_size=3),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    )


def _bad_positive_float() -> st.SearchStrategy[Any]:
    return st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf), st.text(max_size=5),
                     st.none(), st.booleans(), st.lists(st.floats(0.1, 2), max_size=2))


#: field -> hostile values for it (for the tiny ViT: dim 32, image 32x32, patch 8)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "dim": _bad_int(1), "depth": _bad_int(1, 10_000), "heads": st.one_of(_bad_int(1, 32), st.sampled_from([3, 5, 7])),
    "patch_size": _bad_int(1, 32), "in_chans": _bad_int(1), "num_classes": _bad_int(0),
    "num_registers": _bad_int(0), "mlp_ratio": _bad_positive_float(), "norm_eps": _bad_positive_float(),
    "dropout": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0 + 1e-9), st.just(math.nan), st.text()),
    "image_size": st.one_of(_bad_int(1).map(lambda v: [v, 32]), st.lists(st.integers(1, 64), max_size=1),
                            st.lists(st.integers(1, 64), min_size=3, max_size=4), st.text(max_size=4)),
    "mean": st.one_of(st.lists(st.floats(0, 1), min_size=4, max_size=5), st.just([]), st.just([0.5, "x", 0.5]),
                      st.just([math.nan] * 3), st.text(max_size=3)),
    "std": st.one_of(st.lists(st.floats(max_value=0.0), min_size=3, max_size=3), st.just([1, 1]), st.none()),
    "qkv_bias": st.one_of(st.integers(), st.text(max_size=3), st.none()),
    "labels": st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.lists(st.integers(), min_size=1)),
    "pos_interp": st.text(max_size=5).filter(lambda s: s not in ("size", "dino")),
}


#: (field or "<body>", value): one field of a valid config made hostile, or a whole body that is no object
HOSTILE_CONFIGS = st.one_of(
    *[st.tuples(st.just(name), values) for name, values in FIELDS.items()],
    st.tuples(st.just("<body>"), st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=4),
                                           st.none())),
)


@settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=HOSTILE_CONFIGS)
def test_generated_configs(files: Files, case: tuple[str, Any]) -> None:
    """A vitscope config.json with one field hostile (or a body that is not an object): one CheckpointError
    naming config.json and the field."""
    name, value = case
    if name == "<body>":
        folder, needle = files.folder(json.dumps(value), files.weights), "not an object"
    else:
        folder, needle = files.vit(**{name: value}), name
    with pytest.raises(VitscopeError) as info:
        vitscope.load(folder)
    text = str(info.value)
    assert "\n" not in text and str(folder / "config.json") in text and needle in text, (name, text)


_SHAPES = st.lists(st.integers(0, 12), max_size=5).map(tuple)


def _bad_tensor(expected: tuple[int, ...]) -> st.SearchStrategy[Any]:
    return st.one_of(
        _SHAPES.filter(lambda s: s != expected).map(torch.zeros),  # another rank or shape (empty ones too)
        st.just(torch.zeros(expected, dtype=torch.int64)), st.just(torch.zeros(expected, dtype=torch.bool)),
        st.tuples(st.integers(1_000_001, 10**12), st.integers(0, 3)).map(lambda s: torch.zeros(s[0], 0)),
        st.tuples(st.integers(1000, 100_000), st.integers(100_000, _MAX)).map(lambda s: _zero_stride(*s)),
        st.one_of(st.integers(), st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2)),
    )


@settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(sorted(_dino_state())).flatmap(
    lambda key: st.tuples(st.just(key), _bad_tensor(tuple(_dino_state()[key].shape)))))
def test_generated_dino_checkpoints(files: Files, case: tuple[str, Any]) -> None:
    """The DINO state dict with one entry replaced by another type, rank, shape, dtype or a zero-stride giant:
    refused with one VitscopeError naming the file, or (when the change describes another valid ViT, e.g. a 3x3
    grid of positions or no qkv bias) loaded with exactly that; never any other exception, never a big
    allocation."""
    key, value = case
    path = files.ckpt({**files.dino, key: value})
    rss0 = _rss()
    try:
        vit = vitscope.load(f"dino:{path}")
    except VitscopeError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
    else:  # a valid ViT after all: it holds exactly the file's tensor (or, for a non-tensor, goes without it)
        loaded = vit.module.state_dict()
        if isinstance(value, torch.Tensor):
            assert value.is_floating_point() and torch.equal(loaded[key], value)
        else:
            assert key not in loaded  # e.g. no qkv bias: a ViT built with qkv_bias=False
    assert _rss() - rss0 < 300e6
    assert os.path.getsize(path) < 5e6
