"""The hostile-input catalogue, library part (issue 16): bad arguments to the public library API
(`vitscope.capture`, `vitscope.maps`, `vitscope.load`, the methods' functions and parameters, images of odd
kinds and sizes) on the tiny model of ``tests/conftest.py``. Every case must end in one `VitscopeError` whose
``argument`` is the argument at fault, in one line; never another exception type, never a silently accepted
value. The table is generated: index-like arguments from one list of bad selections, method parameters from the
registry (each parameter's kind from its default), plus a hypothesis sweep over non-index values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vitscope
from tests.conftest import make_tiny_vit
from vitscope.errors import VitscopeError
from vitscope.methods.api import method_names
from vitscope.methods.attn_gradcam import attn_gradcam
from vitscope.methods.cls_attention import cls_map
from vitscope.methods.distance import mean_attention_distance
from vitscope.methods.flow import attention_flow
from vitscope.methods.grad_rollout import grad_rollout
from vitscope.methods.legrad import legrad
from vitscope.methods.masks import dino_mask, mass_mask
from vitscope.methods.registry import REGISTRY
from vitscope.methods.relevance import chefer_relevance
from vitscope.methods.rollout import rollout
from vitscope.methods.upsample import upsample

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NAN, INF = float("nan"), float("inf")
MODEL = make_tiny_vit(num_registers=1)  # 2 layers, 4 heads, patch 8, [CLS] + 1 register; 32x32 -> 4x4 grid
LAYERS, HEADS, TOKENS = 2, 4, 2 + 16
X = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # pixel values, used as is
IMG = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))

Call = Callable[[Path], Any]
CASES: list[tuple[str, str, Call]] = []  # (id, the argument an error must name, the call; tmp_path given)


def case(ident: str, argument: str, call: Call) -> None:
    CASES.append((ident, argument, call))


def bad_indices(n: int) -> dict[str, Any]:
    """Selections of ``n`` items that are no selection: wrong kinds, empty, out of range, repeated."""
    return {
        "float": [1.5], "float_scalar": 1.5, "nan": NAN, "inf_item": [INF], "empty": [], "empty_tuple": (),
        "bool": True, "bool_item": [True], "str": "0", "str_item": ["0"], "none_item": [None], "dict": {},
        "set": {0}, "high": [n], "low": [-n - 1], "dup": [0, 0], "dup_neg": [0, -n],
        "array_2d": np.zeros((1, 1), dtype=int), "float_array": np.array([0.5]),
        "bool_tensor": torch.tensor([True]), "float_tensor": torch.tensor([0.0]),
        "nested_tensor": [torch.tensor([0])], "tensor_2d": torch.zeros(1, 1, dtype=torch.long),
    }


# ------------------------------------------------------------------------------------------------ capture
for ident, value in bad_indices(LAYERS).items():
    case(f"capture-layers-{ident}", "layers", lambda _t, v=value: vitscope.capture(MODEL, X, layers=v))
for ident, value in {**bad_indices(HEADS), "bogus": "bogus", "none": None, "upper": "MEAN"}.items():
    case(f"capture-heads-{ident}", "heads", lambda _t, v=value: vitscope.capture(MODEL, X, heads=v))
QUERIES: dict[str, Any] = {
    "empty": [], "float": [1.5], "float_scalar": 1.5, "nan": NAN, "bool": True, "bool_item": [True],
    "none_item": [None], "dict": {}, "dup": [0, 0], "dup_cls": ["cls", 0], "high": [TOKENS], "low": [-TOKENS - 1],
    "patch_outside": [(9, 9)], "patch_short": (0,), "patch_long": (0, 0, 0), "patch_float": [(1.5, 0)],
    "tensor_2d": torch.zeros(1, 1, dtype=torch.long), "tensor_high": torch.tensor([0, TOKENS]),
    "bogus": "bogus", "no_dist": "dist", "register_high": "register:1", "register_garbage": "register:x",
}
for ident, value in QUERIES.items():
    case(f"capture-queries-{ident}", "queries", lambda _t, v=value: vitscope.capture(MODEL, X, queries=v))
SIZES: dict[str, Any] = {
    "zero": 0, "negative": -1, "nan": NAN, "inf": INF, "float": 1.5, "zero_side": (0, 32), "one_side": (32,),
    "three_sides": (32, 32, 32), "str": "32", "bool": True, "float_side": (32.5, 32), "negative_side": (-8, 32),
    "empty": [], "dict": {},
}
for ident, value in SIZES.items():
    case(f"capture-size-{ident}", "size", lambda _t, v=value: vitscope.capture(MODEL, IMG, size=v))
    case(f"capture-size-{ident}-pixels", "size", lambda _t, v=value: vitscope.capture(MODEL, X, size=v))
for ident, value in {"bogus": "bogus", "int": 1, "bool": True, "empty": "", "upper": "RESIZE"}.items():
    case(f"capture-policy-{ident}", "policy", lambda _t, v=value: vitscope.capture(MODEL, IMG, policy=v))
for ident, value in {"int": 1, "str": "yes", "none": None}.items():
    case(f"capture-token_norms-{ident}", "token_norms",
         lambda _t, v=value: vitscope.capture(MODEL, X, token_norms=v))
DEVICES: dict[str, Any] = {"meta": "meta", "xla": "xla", "hpu": "hpu", "bogus": "bogus", "empty": "",
                           "float": 1.5, "bool": True, "list": ["cpu"], "cuda_high": "cuda:99"}
for ident, value in DEVICES.items():
    case(f"capture-device-{ident}", "device", lambda _t, v=value: vitscope.capture(MODEL, X, device=v))
    case(f"maps-device-{ident}", "device", lambda _t, v=value: vitscope.maps(MODEL, X, "cls", device=v))


# ------------------------------------------------------------------------------------------------ models
def _meta_model() -> nn.Module:
    return make_tiny_vit().to("meta")


case("capture-model-meta", "model", lambda _t: vitscope.capture(_meta_model(), X))
case("maps-model-meta", "model", lambda _t: vitscope.maps(_meta_model(), X, "rollout"))
case("grad-model-meta", "model", lambda _t: chefer_relevance(_meta_model(), X, 0))
case("load-model-int", "model", lambda _t: vitscope.load(123))  # type: ignore[arg-type]
case("load-model-none", "model", lambda _t: vitscope.load(None))  # type: ignore[arg-type]
case("load-model-linear", "model", lambda _t: vitscope.load(nn.Linear(2, 2)))
case("load-model-unknown-scheme", "model", lambda _t: vitscope.load("bogus:thing"))
case("load-model-missing-folder", "model", lambda t: vitscope.load(str(t / "nowhere")))
case("capture-model-linear", "model", lambda _t: vitscope.capture(nn.Linear(2, 2), X))


# ------------------------------------------------------------------------------------------------ images
def _file(t: Path, name: str, data: bytes) -> str:
    p = t / name
    p.write_bytes(data)
    return str(p)


IMAGES: dict[str, Call] = {
    "empty_list": lambda _t: [],
    "none": lambda _t: None,
    "int": lambda _t: 123,
    "missing_file": lambda t: str(t / "missing.png"),
    "folder": lambda t: str(t),
    "empty_file": lambda t: _file(t, "empty.png", b""),
    "garbage_file": lambda t: _file(t, "garbage.png", b"not an image at all" * 10),
    "truncated_png": lambda t: _file(t, "cut.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    "array_empty": lambda _t: np.zeros((0, 0, 3), dtype=np.uint8),
    "array_1d": lambda _t: np.zeros(5, dtype=np.uint8),
    "array_5d": lambda _t: np.zeros((2, 2, 2, 2, 2), dtype=np.uint8),
    "array_5_channels": lambda _t: np.zeros((8, 8, 5), dtype=np.uint8),
    "array_object": lambda _t: np.array([[object()]], dtype=object),
    "array_complex": lambda _t: np.zeros((8, 8, 3), dtype=np.complex64),
    "pil_zero": lambda _t: Image.new("RGB", (0, 0)),
    "tensor_1_channel": lambda _t: torch.rand(1, 1, 32, 32),
    "tensor_2d": lambda _t: torch.rand(32, 32),
    "tensor_5d": lambda _t: torch.rand(1, 1, 3, 32, 32),
    "tensor_not_patch_multiple": lambda _t: torch.rand(1, 3, 30, 30),
    "tensor_empty_batch": lambda _t: torch.rand(0, 3, 32, 32),
    "mixed_sizes_native": lambda _t: [IMG, IMG.resize((24, 64))],
}
for ident, make in IMAGES.items():
    policy = "native" if ident == "mixed_sizes_native" else None
    # one image (not a list, not a tensor of pixel values) is named "image", as the reader names it
    one = ident not in ("empty_list", "mixed_sizes_native") and not ident.startswith("tensor")
    case(f"capture-images-{ident}", "image" if one else "images",
         lambda t, make=make, policy=policy: vitscope.capture(MODEL, make(t), policy=policy))
    if one:  # the same image second in a list: named by its position
        case(f"capture-images-{ident}-listed", "images[1]",
             lambda t, make=make: vitscope.capture(MODEL, [IMG, make(t)], size=(32, 32)))


# ------------------------------------------------------------------------------------------------ maps
case("maps-method-unknown", "method", lambda _t: vitscope.maps(MODEL, X, "bogus"))
case("maps-method-int", "method", lambda _t: vitscope.maps(MODEL, X, 3))  # type: ignore[arg-type]
case("maps-param-unknown", "colour", lambda _t: vitscope.maps(MODEL, X, "cls", colour="red"))


def bad_values(name: str, default: Any) -> dict[str, Any]:
    """Values a parameter with this default never takes (its kind from the default, its range from the name)."""
    if isinstance(default, bool):
        return {"str": "yes", "int": 1, "none": None, "list": [True]}
    if isinstance(default, int):
        out: dict[str, Any] = {"float": 1.5, "bool": True, "str": "0", "none": None, "list": [0], "nan": NAN}
        if "layer" in name:
            out |= {"high": LAYERS, "low": -LAYERS - 1}
        return out
    if isinstance(default, float) or name in ("residual", "discard_ratio", "tau"):
        return {"nan": NAN, "inf": INF, "str": "0.5", "bool": True, "list": [0.5], "negative": -0.5, "above": 2.0}
    if name == "target":
        return {"nan": NAN, "float": 1.5, "str": "bogus", "bool": True, "empty": [], "high": 99, "negative": -1,
                "two_for_one_image": [0, 1], "dict": {}, "array_2d": np.zeros((1, 1), dtype=int)}
    if name == "query":
        return {"dict": {}, "float": 1.5, "str": "bogus", "outside": (9, 9), "list": [], "bool": True}
    if name in ("preset", "head_fusion", "relu", "readout", "head"):
        return {"str": "bogus", "list": [], "dict": {}}
    if name == "renormalize":
        return {"str": "yes", "int": 1}
    if name == "foreground":  # pca: a threshold in [0, 1] on the scaled first component
        return {"nan": NAN, "inf": INF, "str": "0.5", "bool": True, "list": [0.5], "negative": -0.5, "above": 2.0}
    if name == "foreground_side":
        return {"str": "bogus", "list": [], "dict": {}, "int": 1}
    if name == "reference":  # similarity: an image index of the call, or an image
        return {"high": 99, "negative": -1, "bool": True, "missing_file": "no/such.png", "dict": {},
                "two_images": torch.rand(2, 3, 32, 32)}
    raise AssertionError(f"no hostile values for parameter {name!r} (default {default!r}): add them here")


for method in method_names():
    for param, default in REGISTRY[method].params.items():
        for ident, value in bad_values(param, default).items():
            case(f"maps-{method}-{param}-{ident}", param,
                 lambda _t, m=method, p=param, v=value: vitscope.maps(MODEL, X, m, **{p: v}))


# ------------------------------------------------------------------------------------------------ functions
FUNCTIONS: dict[str, tuple[str, Call]] = {
    "grad_rollout-start_layer-float": ("start_layer", lambda _t: grad_rollout(MODEL, X, 0, start_layer=1.5)),
    "grad_rollout-residual-nan": ("residual", lambda _t: grad_rollout(MODEL, X, 0, residual=NAN)),
    "grad_rollout-discard_ratio-one": ("discard_ratio", lambda _t: grad_rollout(MODEL, X, 0, discard_ratio=1.0)),
    "grad_rollout-relu-bogus": ("relu", lambda _t: grad_rollout(MODEL, X, 0, relu="bogus")),  # type: ignore[arg-type]
    "grad_rollout-target-str": ("target", lambda _t: grad_rollout(MODEL, X, "cat")),  # type: ignore[arg-type]
    "legrad-readout-bogus": ("readout", lambda _t: legrad(MODEL, X, 0, readout="bogus")),
    "legrad-start_layer-high": ("start_layer", lambda _t: legrad(MODEL, X, 0, start_layer=LAYERS)),
    "legrad-target-bool": ("target", lambda _t: legrad(MODEL, X, True)),
    "legrad-size-zero": ("size", lambda _t: legrad(MODEL, IMG, 0, size=0)),
    "attn_gradcam-layer-float": ("layer", lambda _t: attn_gradcam(MODEL, X, 0, layer=1.5)),
    "attn_gradcam-layer-high": ("layer", lambda _t: attn_gradcam(MODEL, X, 0, layer=LAYERS)),
    "attn_gradcam-query-bogus": ("query", lambda _t: attn_gradcam(MODEL, X, 0, query="bogus")),
    "chefer-start_layer-none": ("start_layer", lambda _t: chefer_relevance(MODEL, X, 0, start_layer=None)),  # type: ignore[arg-type]
    "chefer-target-float-list": ("target", lambda _t: chefer_relevance(MODEL, X, [0.5])),  # type: ignore[list-item]
    "chefer-policy-bogus": ("policy", lambda _t: chefer_relevance(MODEL, IMG, 0, policy="bogus")),  # type: ignore[arg-type]
}
for ident, (argument, call) in FUNCTIONS.items():
    case(f"fn-{ident}", argument, call)

# the functions on captured `Attentions` (every layer, head and query row of the tiny model)
ATTN = vitscope.capture(MODEL, X)
MAPS = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))  # (batch, rows, cols)
ON_ATTENTIONS: dict[str, tuple[str, Callable[[], Any]]] = {
    "cls_map-layer-float": ("layer", lambda: cls_map(ATTN, layer=1.5)),
    "cls_map-layer-bool": ("layer", lambda: cls_map(ATTN, layer=True)),
    "cls_map-layer-high": ("layer", lambda: cls_map(ATTN, layer=LAYERS)),
    "cls_map-layer-str": ("layer", lambda: cls_map(ATTN, layer="0")),  # type: ignore[arg-type]
    "cls_map-head-bool": ("head", lambda: cls_map(ATTN, head=True)),  # type: ignore[arg-type]
    "cls_map-head-bogus": ("head", lambda: cls_map(ATTN, head="bogus")),  # type: ignore[arg-type]
    "cls_map-head-high": ("head", lambda: cls_map(ATTN, head=HEADS)),  # type: ignore[arg-type]
    "cls_map-head-float": ("head", lambda: cls_map(ATTN, head=1.5)),  # type: ignore[arg-type]
    "cls_map-query-dict": ("query", lambda: cls_map(ATTN, query={})),  # type: ignore[arg-type]
    "cls_map-query-float": ("query", lambda: cls_map(ATTN, query=1.5)),  # type: ignore[arg-type]
    "cls_map-query-bogus": ("query", lambda: cls_map(ATTN, query="bogus")),
    "rollout-residual-nan": ("residual", lambda: rollout(ATTN, residual=NAN)),
    "rollout-residual-str": ("residual", lambda: rollout(ATTN, residual="0.5")),  # type: ignore[arg-type]
    "rollout-residual-above": ("residual", lambda: rollout(ATTN, residual=2.0)),
    "rollout-discard_ratio-one": ("discard_ratio", lambda: rollout(ATTN, discard_ratio=1.0)),
    "rollout-start_layer-float": ("start_layer", lambda: rollout(ATTN, start_layer=1.5)),  # type: ignore[arg-type]
    "rollout-start_layer-none": ("start_layer", lambda: rollout(ATTN, start_layer=None)),  # type: ignore[arg-type]
    "rollout-start_layer-high": ("start_layer", lambda: rollout(ATTN, start_layer=LAYERS)),
    "rollout-preset-bogus": ("preset", lambda: rollout(ATTN, preset="bogus")),
    "rollout-preset-list": ("preset", lambda: rollout(ATTN, preset=[])),  # type: ignore[arg-type]
    "rollout-head_fusion-bogus": ("head_fusion", lambda: rollout(ATTN, head_fusion="bogus")),
    "rollout-query-dict": ("query", lambda: rollout(ATTN, query={})),  # type: ignore[arg-type]
    "flow-residual-nan": ("residual", lambda: attention_flow(ATTN, residual=NAN)),
    "flow-start_layer-float": ("start_layer", lambda: attention_flow(ATTN, start_layer=1.5)),  # type: ignore[arg-type]
    "flow-head_fusion-bogus": ("head_fusion", lambda: attention_flow(ATTN, head_fusion="bogus")),
    "dino_mask-tau-nan": ("tau", lambda: dino_mask(ATTN, NAN)),
    "dino_mask-tau-str": ("tau", lambda: dino_mask(ATTN, "0.6")),  # type: ignore[arg-type]
    "dino_mask-layer-float": ("layer", lambda: dino_mask(ATTN, layer=1.5)),  # type: ignore[arg-type]
    "mass_mask-tau-above": ("tau", lambda: mass_mask(MAPS, 1.5)),
    "distance-metric-bogus": ("metric", lambda: mean_attention_distance(ATTN, metric="bogus")),  # type: ignore[arg-type]
    "upsample-size-zero": ("size", lambda: upsample(MAPS, (0, 32))),
    "upsample-mode-bogus": ("mode", lambda: upsample(MAPS, (32, 32), "bogus")),  # type: ignore[arg-type]
}
for ident, (argument, fn) in ON_ATTENTIONS.items():
    case(f"attn-{ident}", argument, lambda _t, fn=fn: fn())


def check(argument: str, call: Callable[[], Any]) -> None:
    """One `VitscopeError` naming ``argument``, in one line (any other exception fails the case as is)."""
    with pytest.raises(VitscopeError) as info:
        call()
    err = info.value
    assert err.argument == argument, f"names {err.argument!r}, not {argument!r}: {err}"
    line = str(err)
    assert line.startswith(f"{argument}: ") and "\n" not in line, line


def test_the_catalogue_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 80
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("argument", "call"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_library_input(argument: str, call: Call, tmp_path: Path) -> None:
    check(argument, lambda: call(tmp_path))


NON_INDEX = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.booleans(),
    st.binary(max_size=4), st.complex_numbers(max_magnitude=4),
)
OUT_OF_RANGE = st.one_of(st.integers(min_value=LAYERS, max_value=2**70), st.integers(max_value=-LAYERS - 1,
                                                                                        min_value=-(2**70)))
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@SETTINGS
@given(item=st.one_of(NON_INDEX, OUT_OF_RANGE), listed=st.booleans())
def test_layers_never_take_anything_but_a_layer_index(item: Any, listed: bool) -> None:
    check("layers", lambda: vitscope.capture(MODEL, X, layers=[item] if listed else item))


@SETTINGS
@given(value=st.one_of(st.floats(), st.text(max_size=4), st.none(), st.tuples(st.integers(-5, 40)),
                       st.tuples(st.integers(-5, 0), st.integers(-5, 40)), st.integers(-(2**40), 0)))
def test_size_is_a_positive_int_or_a_pair(value: Any) -> None:
    if value is None:
        return  # size=None is the model's own size
    check("size", lambda: vitscope.capture(MODEL, IMG, size=value))


@SETTINGS
@given(value=st.one_of(st.floats(), st.text(max_size=3), st.integers(min_value=5), st.integers(max_value=-2),
                       st.booleans(), st.lists(st.floats(), min_size=1, max_size=2)))
def test_a_gradient_target_is_a_class_index(value: Any) -> None:
    check("target", lambda: vitscope.maps(MODEL, X, "chefer", target=value))



@pytest.mark.parametrize("device", ["meta", "xla", "bogus", "cuda:99"])
def test_cli_device_the_library_refuses_is_one_line_naming_the_option(device: str, tmp_path: Path) -> None:
    """The CLI hands ``--device`` to `resolve_device` under its own name: one line, exit 2, nothing written."""
    from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, tree_state
    from vitscope.models.vit import save_vit

    folder = save_vit(make_tiny_vit(), tmp_path / "tiny")
    IMG.save(tmp_path / "a.png")
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    res = run_inprocess(["capture", str(tmp_path / "a.png"), "--model", str(folder), "--device", device,
                         "-o", str(out / "a.npz")])
    assert_one_line(res, 2, needle="--device: ")
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    assert not out.exists()
