"""Batch mode reads a batch's map, per-image measures and prediction from one forward pass (issue 21), and the
one method registry; a model that takes one image per pass (Pixtral) gets its batches in chunks.

References are two separate passes written out here: `vitscope.capture` (maps, full attention for the distance,
token norms) and the model's own logits; the one-pass results must equal them within 1e-6.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vitscope
from tests.capture.families import sharpen
from tests.conftest import make_tiny_vit
from vitscope.batch import compute_batch, run_batch
from vitscope.capture import capture
from vitscope.errors import VitscopeError
from vitscope.methods.api import get_method, method_names
from vitscope.methods.artifacts import outlier_threshold
from vitscope.methods.cls_attention import cls_map
from vitscope.methods.distance import mean_attention_distance
from vitscope.methods.registry import REGISTRY
from vitscope.methods.relevance import chefer_relevance
from vitscope.methods.rollout import rollout

SRC = Path(__file__).resolve().parents[1] / "src" / "vitscope"


def _model() -> Any:
    """A classifier ViT with a register token, attention sharpened (q/k x 30): peaked rows, so maps and
    distances differ from the near-uniform attention of random weights."""
    return vitscope.wrap(sharpen(make_tiny_vit(num_registers=1, image_size=(32, 48), depth=3, heads=2), 30.0))


def _pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(7))  # (B, C, H, W)


#: method -> its map by separate passes (`vitscope.capture`, or the gradient method on the model's own logits)
REFERENCE_MAPS: dict[str, Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": lambda vit, px, _cls: cls_map(capture(vit, px, layers=[-1], queries="cls"), head="mean"),
    "rollout": lambda vit, px, _cls: rollout(capture(vit, px)),
    "chefer": lambda vit, px, cls: chefer_relevance(vit, px, cls.tolist()),
}


def _count_forwards(vit: Any) -> Callable[[], int]:
    calls = []
    handle = vit.module.register_forward_pre_hook(lambda *_: calls.append(1))
    return lambda: (handle.remove(), len(calls))[1]


@pytest.mark.parametrize("method", list(REFERENCE_MAPS))
def test_one_forward_pass_gives_the_two_pass_maps_and_measures(method: str) -> None:
    """The map, distances, token norms, prediction and score of `compute_batch` equal separate passes; an
    attention method runs the model once per batch (it ran twice: map, then measures), a gradient method twice
    (prediction + measures in one, then its traced pass; it ran three times)."""
    vit, px = _model(), _pixels()
    full = capture(vit, px, token_norms=True)  # every layer, row and head: the distance reference's input
    assert full.weights.amax(-1).mean() > 0.2  # peaked rows (sharpened)
    with torch.no_grad():
        logits = vit.logits(vit(px))  # (B, classes): the model's own output
    spec = get_method(method)
    compute_batch(vit, px, spec)  # once: the per-model probes (token axis, batch axis) are cached after it
    done = _count_forwards(vit)
    maps, measures = compute_batch(vit, px, spec)
    assert done() == (2 if spec.needs == "gradients" else 1)

    ref_map = REFERENCE_MAPS[method](vit, px, logits.argmax(-1)).numpy()
    assert ref_map.std() > 1e-3  # a map with structure, not a constant
    np.testing.assert_allclose(maps["map"], ref_map, atol=1e-6, rtol=0)
    dist = mean_attention_distance(full, per_image=True).numpy().transpose(1, 0, 2)  # (B, L, H)
    assert np.ptp(dist) > 1.0  # heads attend at different distances
    np.testing.assert_allclose(measures["distance"], dist, atol=1e-6, rtol=1e-6)
    assert full.token_norms is not None
    P0 = vit.info.num_prefix_tokens
    patch = full.token_norms[:, :, P0:].double().numpy()  # (L, B, P)
    np.testing.assert_allclose(measures["norm_mean"], patch.mean(axis=2).T, atol=1e-6, rtol=1e-6)
    high = [[int((patch[li, b] > outlier_threshold(patch[li, b])).sum()) for li in range(3)] for b in range(3)]
    assert measures["norm_high"].tolist() == high
    probs = torch.softmax(logits, dim=-1)
    assert measures["prediction"].tolist() == logits.argmax(-1).tolist()
    np.testing.assert_allclose(measures["score"], probs.amax(-1).numpy(), atol=1e-6, rtol=0)


def test_measures_alone_equal_the_observed_ones() -> None:
    """`image_statistics` (the measures on a forward of their own) gives what the method's pass gives."""
    from vitscope.batch.stats import image_statistics

    vit, px = _model(), _pixels()
    _, observed = compute_batch(vit, px, get_method("cls"))
    alone = image_statistics(vit, px)
    for key, value in alone.items():
        np.testing.assert_allclose(observed[key], value, atol=1e-6, rtol=0, err_msg=key)


# ------------------------------------------------------------------------------------------------ one registry
def test_batch_has_no_method_table_of_its_own() -> None:
    """No second table of methods: nothing named METHODS / register_method in vitscope.batch, and no dict in the
    package (outside the registry) keyed by two or more method names, nor built from `method_names()`."""
    import vitscope.batch as batch
    import vitscope.batch.local as local

    for module in (batch, local):
        assert not hasattr(module, "METHODS") and not hasattr(module, "register_method")
    names = set(method_names())
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            keys = node.keys if isinstance(node, ast.Dict) else []
            if len({k.value for k in keys if isinstance(k, ast.Constant)} & names) >= 2:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if isinstance(node, ast.DictComp) and "method_names" in ast.unparse(node):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, f"a second table of methods: {found}"


def test_batch_takes_exactly_the_registry_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A method registered in the registry is a batch method; an unknown one is refused in one line that lists
    the registry's names."""
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (32, 48), (200, 30, 30)).save(src / "a.png")
    model = vitscope.wrap(make_tiny_vit(image_size=(32, 32)))
    with pytest.raises(VitscopeError, match=r"^method: unknown method 'mine'") as err:
        run_batch(src, tmp_path / "refused", method="mine", model=model, workers=0, progress=False)
    assert err.value.fix == f"use one of {', '.join(REGISTRY)}" and "\n" not in str(err.value)
    assert not (tmp_path / "refused").exists()
    monkeypatch.setitem(REGISTRY, "mine", dataclasses.replace(REGISTRY["cls"], name="mine"))
    summary = run_batch(src, tmp_path / "out", method="mine", model=model, workers=0, progress=False)
    assert summary.done == 1 and (tmp_path / "out" / "a.mine.npz").is_file()


# ------------------------------------------------------------------------------------------------ Pixtral
def _pixtral(folder: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.PixtralVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8, head_dim=16)
    torch.manual_seed(0)
    sharpen(transformers.PixtralVisionModel(cfg).eval(), 16.0).save_pretrained(folder)
    return vitscope.load(f"hf:{folder}")


def test_pixtral_batch_runs_one_image_per_pass(tmp_path: Path) -> None:
    """Pixtral packs a batch into one sequence (``max_batch == 1``): `vitscope batch` over 3 images with the
    default batch size splits each batch into single images (it failed every image of the batch) and writes
    3 maps equal to per-image captures, with the measures of each image alone."""
    from PIL import Image

    from vitscope.cli import main

    vit = _pixtral(tmp_path / "model")
    assert vit.max_batch == 1
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"{i}.png")
    out = tmp_path / "out"
    main(["batch", str(src), "-o", str(out), "--model", f"hf:{tmp_path / 'model'}", "--workers", "0", "-q"])
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["status"] for e in lines] == ["ok"] * 3
    for i in range(3):
        px = vit.preprocess([str(src / f"{i}.png")])  # (1, C, H, W)
        attn = capture(vit, px)
        assert attn.weights.amax(-1).mean() > 0.2  # peaked rows (sharpened)
        with np.load(out / f"{i}.cls.npz") as data:
            np.testing.assert_allclose(data["map"], cls_map(attn, head="mean")[0].numpy(), atol=1e-6, rtol=0)
        dist = mean_attention_distance(attn, per_image=True).numpy()[:, 0].ravel()  # (L * H,)
        stats = next(e["stats"] for e in lines if e["rel"] == f"{i}.png")
        np.testing.assert_allclose(stats["distance"], dist, atol=1e-6, rtol=1e-6)
    with pytest.raises(VitscopeError, match=r"^images: .* takes at most 1 image per forward pass"):
        capture(vit, torch.randn(2, 3, 32, 32))  # the adapter's own refusal reads max_batch too


def test_ray_actor_runs_pixtral_one_image_per_pass(tmp_path: Path) -> None:
    """The Ray engine's actor (called directly: no cluster) computes a Pixtral part of 3 images in one group
    with batch size 4: 3 ok rows, each equal to the image's own capture (it refused the group of 3)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from PIL import Image

    import vitscope.batch.ray_engine as batch_ray
    from vitscope.batch.ray_engine import row_arrays

    vit = _pixtral(tmp_path / "model")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    table = pa.table({"id": [f"{i}" for i in range(3)], "path": paths})
    prepared = batch_ray._preprocess_rows(table, done=frozenset(), prep=vit.info.preprocess,
                                          patch=vit.info.patch_size, policy="native", size=None)
    actor = batch_ray.MapActor(model=vit, method="cls", spec=get_method("cls"), layer=-1, model_id="m",
                               parts_dir=str(tmp_path / "parts"), batch_size=4, stats=True, norm_threshold=None,
                               threads=1, device="cpu")
    assert [r["status"] for r in actor(prepared).to_pylist()] == ["ok"] * 3
    rows = {r["id"]: r for p in batch_ray.part_files(tmp_path) for r in pq.read_table(p).to_pylist()}
    for i, path in enumerate(paths):
        attn = capture(vit, path)
        np.testing.assert_allclose(row_arrays(rows[str(i)])["map"], cls_map(attn, head="mean")[0].numpy(),
                                   atol=1e-6, rtol=0)
