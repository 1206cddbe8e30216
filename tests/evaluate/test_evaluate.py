"""The driver: the sanity check separates a model-blind map from real ones, runs resume and write only inside
-o, the CLI (installed console script) prints the table / one error line, Ctrl-C exits 130 saying what was
saved, and the Ray engine gives the local engine's table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.evaluate.conftest import write_shapes
from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, run_script, tree_state
from vitscope.evaluate import evaluate, sanity_check
from vitscope.evaluate.core import RECORDS, randomised_layers
from vitscope.methods.registry import REGISTRY, MapContext, MapResult, Method, register


def _edges(ctx: MapContext) -> MapResult:
    """Sobel gradient magnitude of the pixels, averaged per patch: a map that never looks at the model."""
    x = ctx.pixels.float().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).reshape(1, 1, 3, 3)
    gx, gy = F.conv2d(x, kx, padding=1), F.conv2d(x, kx.transpose(-1, -2), padding=1)
    mag = (gx**2 + gy**2).sqrt()
    ph, pw = ctx.vit.info.patch_size
    return MapResult(map=F.avg_pool2d(mag, (ph, pw))[:, 0])


@pytest.fixture
def edges_method():
    register(Method("edges_test", _edges, "Sobel edges (test only)", "none"))
    try:
        yield "edges_test"
    finally:
        REGISTRY.pop("edges_test", None)


def test_sanity_check_separates_model_blind_maps(shapes_vit, shapes_batch, edges_method) -> None:
    """Cascading randomisation (top layer first): the edge detector keeps rank correlation 1 at every stage;
    cls and rollout, which read the model, fall well below it; the random baseline sits near 0. The model's
    weights are restored afterwards."""
    vit = shapes_vit
    pixels = shapes_batch[0]
    with torch.no_grad():
        before = vit.module(pixels)
    pred = before.argmax(-1).tolist()
    rho = sanity_check(vit, pixels, [edges_method, "cls", "rollout", "chefer"], pred, list(range(len(pred))))
    L = vit.info.num_layers
    edges = np.asarray(rho[edges_method])
    assert edges.shape == (len(pred), L)
    np.testing.assert_allclose(edges, 1.0, atol=1e-9)
    for name in ("cls", "rollout", "chefer"):
        final = float(np.mean(np.asarray(rho[name])[:, -1]))
        assert final < 0.8, (name, final)  # an honest map changes when the model does
    assert abs(float(np.mean(rho["random"]))) < 0.2
    with torch.no_grad():
        torch.testing.assert_close(vit.module(pixels), before, rtol=0, atol=0)


def test_randomised_layers_restore_on_error(shapes_vit) -> None:
    state = {k: v.clone() for k, v in shapes_vit.module.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), randomised_layers(shapes_vit, 2, seed=3):
        last = dict(shapes_vit.sites[-1].block.named_parameters())
        assert not torch.equal(last["attn.qkv.weight"], state["blocks.3.attn.qkv.weight"])
        first = dict(shapes_vit.sites[0].block.named_parameters())  # below the top two: untouched
        assert torch.equal(first["attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
        raise RuntimeError("boom")
    for k, v in shapes_vit.module.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_resume_writes_only_in_output(tmp_path) -> None:
    """A run over 3 of 5 images, then over all: the first records are kept as they were, the 2 new images
    appended; the table equals a run without an output folder; nothing outside -o changes."""
    images, masks = write_shapes(tmp_path / "data", 5)
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    kw = {"methods": "cls", "masks": masks, "sanity_images": 2, "deletion_steps": 3, "progress": False}
    evaluate(images, out, limit=3, **kw)
    first = (out / RECORDS).read_text().splitlines()
    assert len(first) == 3
    table = evaluate(images, out, **kw)
    lines = (out / RECORDS).read_text().splitlines()
    assert lines[:3] == first and len(lines) == 5
    assert table.meta["scored"] == 5
    fresh = evaluate(images, None, **kw)
    assert fresh.rows == table.rows
    saved = json.loads((out / "table.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(table.rows))
    for name in ("table.csv", "summary.md", "curves.png", "evaluate.json"):
        assert (out / name).stat().st_size > 0
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    with pytest.raises(Exception, match="other settings"):  # a resume must use the same settings
        evaluate(images, out, **{**kw, "deletion_steps": 4})


def test_cli_happy_path_and_errors(tmp_path) -> None:
    images, masks = write_shapes(tmp_path / "data", 4)
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    res = run_script(["evaluate", str(images), "--masks", str(masks), "-o", str(out), "--methods", "cls,rollout",
                      "--sanity-images", "1", "--deletion-steps", "2", "-q"], timeout=300)
    assert res.code == 0, res.stderr
    for name in ("| cls |", "| rollout |", "| random |", "4 of 4 images scored"):
        assert name in res.stdout
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    assert_one_line(run_script(["evaluate", str(images), "-o", str(tmp_path / "o2"), "--deletion-steps", "0"]),
                    needle="--deletion-steps")
    assert_one_line(run_script(["evaluate", str(images), "-o", str(tmp_path / "o2"), "--methods", "cls,nope"]),
                    needle="--methods")
    assert_one_line(run_script(["evaluate", str(images), "-o", str(tmp_path / "o2"), "--num-cpus", "2"]),
                    needle="--num-cpus")


def test_ctrl_c_exits_130_and_says_what_was_saved(tmp_path, monkeypatch) -> None:
    from vitscope.evaluate import core

    images, _ = write_shapes(tmp_path / "data", 3)
    real, calls = core.evaluate_chunk, []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "evaluate_chunk", interrupted_second)
    out = tmp_path / "out"
    res = run_inprocess(["evaluate", str(images), "-o", str(out), "--methods", "cls", "--batch-size", "2",
                         "--sanity-images", "0", "-q"])
    line = assert_one_line(res, code=130)
    assert "2 image(s) scored and saved" in line and "run the same command again" in line
    assert len((out / RECORDS).read_text().splitlines()) == 2


def test_ray_engine_equals_local(tmp_path) -> None:
    pytest.importorskip("ray")
    images, masks = write_shapes(tmp_path / "data", 3)
    kw = {"methods": "cls", "masks": masks, "sanity_images": 1, "deletion_steps": 2, "progress": False,
          "batch_size": 2}
    local = evaluate(images, None, **kw)
    ray_table = evaluate(images, tmp_path / "out", engine="ray", concurrency=1, num_cpus=1, **kw)
    assert ray_table.rows == local.rows
    assert len((tmp_path / "out" / RECORDS).read_text().splitlines()) == 3


def test_forward_threads_equal_one_thread_and_restore_torch(shapes_vit, shapes_batch, monkeypatch) -> None:
    """With torch at 2 threads, the chunk's forward passes run on 2 worker threads while the next map (a capture
    and a gradient method) is computed: the records equal the one-thread run's exactly, torch's thread count is
    2 again afterwards, and a job's error reaches the caller with the count restored too."""
    import threading

    from vitscope.evaluate import core

    pixels, masks, labels = shapes_batch
    B = int(pixels.shape[0])
    opts = core.EvalOptions(methods=("rollout", "grad_rollout"), deletion_steps=3, sanity_images=2)
    where: list[str] = []
    step_logits = core._step_logits

    def spy(*args, **kwargs):
        where.append(threading.current_thread().name)
        return step_logits(*args, **kwargs)

    monkeypatch.setattr(core, "_step_logits", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = core.evaluate_chunk(shapes_vit, pixels, masks, labels, list(range(B)), opts)
        assert where and all(w == threading.current_thread().name for w in where)
        where.clear()
        torch.set_num_threads(2)
        two = core.evaluate_chunk(shapes_vit, pixels, masks, labels, list(range(B)), opts)
        assert torch.get_num_threads() == 2
        assert where and all(w.startswith("vitscope-evaluate") for w in where)
        assert two == one

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(core, "_step_logits", boom)
        with pytest.raises(RuntimeError, match="boom"):
            core.evaluate_chunk(shapes_vit, pixels, masks, labels, list(range(B)), opts)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
