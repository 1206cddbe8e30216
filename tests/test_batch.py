"""Batch mode: outputs equal direct capture + method, bad files are logged, runs resume after a kill."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from tests.conftest import assert_same_summary, make_tiny_vit
from vitscope.adapters import load
from vitscope.batch import Manifest, collect_inputs, run_batch
from vitscope.capture import capture
from vitscope.errors import VitscopeError
from vitscope.methods.cls_attention import cls_map
from vitscope.methods.registry import REGISTRY
from vitscope.methods.rollout import rollout
from vitscope.models.vit import save_vit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_vit(make_tiny_vit(num_registers=2, seed=11), tmp_path / "model")


def _image(path: Path, height: int, width: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Five images of three sizes (two named x.png in different folders), a truncated PNG and a text file."""
    root = tmp_path / "in"
    sizes = {"a/x.png": (40, 56), "b/x.png": (32, 32), "c.jpg": (48, 24), "d.png": (40, 56), "deep/e/f.png": (40, 56)}
    for i, (rel, (h, w)) in enumerate(sizes.items()):
        _image(root / rel, h, w, seed=i)
    (root / "broken.png").write_bytes((root / "d.png").read_bytes()[:80])
    (root / "notes.txt").write_text("not an image\n")
    return root


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _out(rel: str, method: str, fmt: str) -> str:
    """Where batch writes ``rel``'s output: ``a/x.png`` -> ``a/x.<method>.<fmt>``."""
    return f"{rel.rsplit('.', 1)[0]}.{method}.{fmt}"


def _direct_cls(vit, path: Path, policy: str | None) -> tuple[np.ndarray, np.ndarray]:
    attn = capture(vit, str(path), layers=[-1], queries="cls", policy=policy)
    return cls_map(attn, head="mean")[0].numpy(), cls_map(attn, head="all")[0].numpy()


def test_folder_with_mixed_sizes_and_bad_files(mixed_folder: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_batch(mixed_folder, out, model=model_dir, policy="native", batch_size=2, workers=2,
                        progress=False)
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (7, 5, 2, 0)
    entries = {e["rel"]: e for e in _manifest(out)}
    assert entries["broken.png"]["status"] == "error" and "truncated" in entries["broken.png"]["error"]
    assert entries["notes.txt"]["status"] == "error" and "not an image" in entries["notes.txt"]["error"]
    vit = load(model_dir)
    for rel in ("a/x.png", "b/x.png", "c.jpg", "d.png", "deep/e/f.png"):
        e = entries[rel]
        assert e["status"] == "ok" and e["error"] is None
        npz_path, png_path = out / _out(rel, "cls", "npz"), out / _out(rel, "cls", "png")
        assert e["outputs"]["npz"]["path"] == _out(rel, "cls", "npz")  # mirrors the folder: a/x != b/x
        assert e["outputs"]["npz"]["bytes"] == npz_path.stat().st_size
        with np.load(npz_path) as data:
            got_map, got_heads = data["map"], data["heads"]
            meta = json.loads(str(data["meta_json"]))
        exp_map, exp_heads = _direct_cls(vit, mixed_folder / rel, "native")
        assert got_map.dtype == np.float32 and got_map.shape == exp_map.shape
        np.testing.assert_allclose(got_map, exp_map, atol=1e-6)
        np.testing.assert_allclose(got_heads, exp_heads, atol=1e-6)
        with Image.open(mixed_folder / rel) as im:
            h, w = im.height, im.width
        assert meta["original_size"] == [h, w] and meta["grid"] == list(exp_map.shape)
        with Image.open(png_path) as png:
            assert png.size == (w, h) and png.mode == "P"  # at the image's own size
            index, palette = np.asarray(png), np.array(png.getpalette()[: 256 * 3]).reshape(256, 3)
        assert index.min() == 0 and index.max() == 255  # min-max scaled
        np.testing.assert_allclose(palette / 255.0, colormaps["inferno"](np.linspace(0, 1, 256))[:, :3], atol=0.003)
    assert not list(out.rglob("*.vitscope-tmp*"))


def test_rollout_outputs_equal_library_rollout(mixed_folder: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_batch(mixed_folder, out, method="rollout", model=model_dir, policy="native", batch_size=3, workers=0,
              formats="npz", progress=False)
    vit = load(model_dir)
    for rel in ("a/x.png", "c.jpg", "deep/e/f.png"):
        expected = rollout(capture(vit, str(mixed_folder / rel), policy="native"))[0].numpy()
        with np.load(out / _out(rel, "rollout", "npz")) as data:
            np.testing.assert_allclose(data["map"], expected, atol=1e-5)
    # only the formats asked for (distance.png is the run's summary figure, not a per-image output)
    assert [p.name for p in out.rglob("*.png")] == ["distance.png"]


@pytest.mark.parametrize(("method", "name"), [("chefer", "chefer_relevance"), ("grad_rollout", "grad_rollout"),
                                             ("legrad", "legrad")])
def test_gradient_methods_equal_direct_calls(method: str, name: str, mixed_folder: Path, model_dir: Path,
                                             tmp_path: Path) -> None:
    from vitscope import methods

    out = tmp_path / "out"
    summary = run_batch(mixed_folder, out, method=method, model=model_dir, policy="native", batch_size=2, workers=0,
                        formats="npz", progress=False)
    assert summary.done == 5 and summary.failed == 2
    vit = load(model_dir)
    for rel in ("a/x.png", "c.jpg"):
        expected = getattr(methods, name)(vit, str(mixed_folder / rel), policy="native")[0].numpy()
        with np.load(out / _out(rel, method, "npz")) as data:
            np.testing.assert_allclose(data["map"], expected, atol=1e-5)


def test_rerun_skips_finished_and_redoes_damaged(mixed_folder: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_batch(mixed_folder, out, model=model_dir, policy="native", workers=0, progress=False)
    first = (out / "c.cls.npz").read_bytes()
    (out / "d.cls.png").write_bytes(b"\x89PNG truncated")  # damaged output: size differs from the manifest
    (out / "a" / ".x.cls.npz.abc_1234.vitscope-tmp.npz").write_bytes(b"partial")  # leftover of a killed run
    with open(out / "manifest.jsonl", "a") as fh:
        fh.write('{"rel": "c.jpg", "status": "o')  # a line cut short by a kill
    summary = run_batch(mixed_folder, out, model=model_dir, policy="native", workers=0, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (1, 4, 2)  # d.png redone, bad files retried
    assert (out / "c.cls.npz").read_bytes() == first
    assert not list(out.rglob("*.vitscope-tmp*"))
    entries = _manifest(out)  # every line parses: the cut line was dropped
    ok = Counter(e["rel"] for e in entries if e["status"] == "ok")
    assert ok == {"a/x.png": 1, "b/x.png": 1, "c.jpg": 1, "d.png": 2, "deep/e/f.png": 1}
    # the summary reads each image's last line only (d.png twice, the bad files twice, the cut line dropped)
    assert (summary.summary["images"], summary.summary["failed"], summary.summary["distance"]["count"]) == (5, 2, 5)
    first_d, last_d = (e["stats"]["distance"] for e in [e for e in entries if e["rel"] == "d.png"])
    assert last_d == pytest.approx(first_d)  # the redone image has the same measures
    manifest = Manifest(out / "manifest.jsonl")
    manifest.load()  # per-image measures stay in the file, not in memory
    assert len(manifest.entries) == 7 and not any("stats" in e for e in manifest.entries.values())
    assert sorted(e["rel"] for e in manifest.iter_final(["c.jpg", "d.png", "nope"])) == ["c.jpg", "d.png"]
    assert [e["stats"]["distance"] for e in manifest.iter_final(["d.png"])] == [last_d]
    with Image.open(out / "d.cls.png") as png:
        png.load()
    # a different method into the same folder is refused, unless overwriting
    with pytest.raises(VitscopeError, match="another run"):
        run_batch(mixed_folder, out, method="rollout", model=model_dir, policy="native", progress=False)
    summary = run_batch(mixed_folder, out, method="rollout", model=model_dir, policy="native", workers=0,
                        overwrite=True, progress=False)
    assert summary.done == 5 and len(_manifest(out)) == 7
    # starting over removed the previous run's outputs (the manifest's), nothing else
    assert not list(out.rglob("*.cls.*")) and len(list(out.rglob("*.rollout.npz"))) == 5


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    from vitscope import batch
    from vitscope.methods.api import get_method
    from vitscope.methods.registry import Method, register

    def slow_cls(ctx, *, layer=-1):
        time.sleep(float(sys.argv[4]))  # make the run long enough to be killed midway
        return get_method("cls").compute(ctx, layer=layer)

    register(Method(name="slow-cls", compute=slow_cls, summary="cls, slowly", paper="-"))
    batch.run_batch(sys.argv[1], sys.argv[2], method="slow-cls", model=sys.argv[3], batch_size=2, workers=1,
                    progress=False)
    """
)


def _start(script: Path, src: Path, out: Path, model_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, str(script), str(src), str(out), str(model_dir), "0.15"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_after(proc: subprocess.Popen, out: Path, ok_lines: int, sig: int) -> None:
    """Send ``sig`` once the manifest holds ``ok_lines`` finished images; wait for the process to end."""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / "manifest.jsonl"
            if manifest.exists() and manifest.read_text().count('"ok"') >= ok_lines:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(sig)
    finally:
        proc.wait(timeout=30)


def _outputs_match_manifest(out: Path) -> None:
    for e in _manifest(out):
        for rec in e["outputs"].values():
            assert (out / rec["path"]).stat().st_size == rec["bytes"]


def test_resume_after_ctrl_c_and_sigkill(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    paths = [_image(src / f"g{i % 3}" / f"img{i:02d}.png", 32, 32, seed=100 + i) for i in range(30)]
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)

    _stop_after(_start(script, src, out, model_dir), out, 4, signal.SIGINT)  # Ctrl-C
    assert not list(out.rglob("*.vitscope-tmp*"))  # cleaned up on the way out
    _outputs_match_manifest(out)
    after_int = sum(e["status"] == "ok" for e in _manifest(out))

    _stop_after(_start(script, src, out, model_dir), out, after_int + 6, signal.SIGKILL)
    before = Counter(e["rel"] for e in _manifest(out) if e["status"] == "ok")
    assert after_int + 6 <= len(before) < 30 and set(before.values()) == {1}

    # restart (in this process) with the same method name, without the slowdown
    monkeypatch.setitem(REGISTRY, "slow-cls", dataclasses.replace(REGISTRY["cls"], name="slow-cls"))
    summary = run_batch(src, out, method="slow-cls", model=model_dir, batch_size=2, workers=0, progress=False)
    assert summary.skipped == len(before) and summary.done == 30 - len(before) and summary.failed == 0
    ok = Counter(e["rel"] for e in _manifest(out) if e["status"] == "ok")
    assert set(ok) == {p.relative_to(src).as_posix() for p in paths}
    assert set(ok.values()) == {1}  # none computed twice
    assert not list(out.rglob("*.vitscope-tmp*"))
    _outputs_match_manifest(out)
    vit = load(model_dir)
    for p in paths:
        with np.load(out / _out(p.relative_to(src).as_posix(), "slow-cls", "npz")) as data:  # complete, readable files
            np.testing.assert_allclose(data["map"], _direct_cls(vit, p, None)[0], atol=1e-6)
    # the summary of the resumed run covers every image, as one uninterrupted run's does
    whole = run_batch(src, tmp_path / "whole", method="slow-cls", model=model_dir, batch_size=2, workers=0,
                      progress=False)
    assert summary.summary["images"] == 30 and summary.summary["distance"]["count"] == 30
    assert json.loads((out / "summary.json").read_text()) == summary.summary
    assert_same_summary(summary.summary, whole.summary)


def test_summary_masks_and_stats_off(mixed_folder: Path, model_dir: Path, tmp_path: Path) -> None:
    """Masks give each map's pointing game hit and mask IoU (equal to `vitscope.methods.metrics` on the direct
    map); without stats the summary keeps only counts and localisation; a crop with masks is refused."""
    from vitscope.methods.metrics import mask_jaccard, pointing_game

    masks = tmp_path / "masks"
    m = np.zeros((40, 56), dtype=np.uint8)
    m[4:20, 30:50] = 255
    (masks / "a").mkdir(parents=True)
    Image.fromarray(m).save(masks / "a" / "x.png")
    Image.fromarray(255 - m).save(masks / "d.png")
    out = tmp_path / "out"
    res = run_batch(mixed_folder, out, model=model_dir, policy="native", workers=0, formats="npz", masks=masks,
                    stats=False, progress=False)
    entries = {e["rel"]: e for e in _manifest(out)}
    vit = load(model_dir)
    hits, ious = [], []
    for rel in ("a/x.png", "d.png"):
        heat = torch.from_numpy(_direct_cls(vit, mixed_folder / rel, "native")[0])[None]  # (1, rows, cols)
        with Image.open(masks / rel) as im:
            gt = torch.from_numpy(np.asarray(im) > 0)[None]  # the input's own size: policy native keeps it
        hits.append(bool(pointing_game(heat, gt)[0]))
        ious.append(float(mask_jaccard(heat, gt, tau=0.6).best[0, 0]))
        assert entries[rel]["stats"] == {"pointing": hits[-1], "iou": pytest.approx(ious[-1], abs=1e-6)}
    assert "stats" not in entries["c.jpg"]  # no mask, no stats
    assert res.summary == json.loads((out / "summary.json").read_text())
    assert res.summary["localisation"] == pytest.approx({"images": 2, "pointing_game": np.mean(hits),
                                                         "mask_iou": np.mean(ious)})
    assert (res.summary["images"], res.summary["failed"], res.summary["predictions"]) == (5, 2, {})
    assert "distance" not in res.summary and "high_norm" not in res.summary and not (out / "distance.png").exists()
    with pytest.raises(VitscopeError, match="masks"):
        run_batch(mixed_folder, tmp_path / "o2", model=model_dir, policy="crop", masks=masks, progress=False)
    with pytest.raises(VitscopeError, match="masks"):
        run_batch(mixed_folder, tmp_path / "o3", model=model_dir, masks=tmp_path / "nope", progress=False)
    # resuming with other stats settings is another run
    with pytest.raises(VitscopeError, match="another run"):
        run_batch(mixed_folder, out, model=model_dir, policy="native", workers=0, formats="npz", masks=masks,
                  progress=False)
    assert "summary.json" in str(res)


def test_console_script_batch_with_masks_writes_the_library_summary(mixed_folder: Path, model_dir: Path,
                                                                    tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    m = np.zeros((40, 56), dtype=np.uint8)
    m[10:30, 5:25] = 1
    Image.fromarray(m).save(masks / "d.png")
    script = Path(sys.executable).parent / "vitscope"  # the installed console script
    res = subprocess.run([str(script), "batch", str(mixed_folder), "-o", str(tmp_path / "cli"), "--model",
                          str(model_dir), "--policy", "native", "--workers", "0", "--masks", str(masks), "-q"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert "summary" in res.stdout and "5 done" in res.stdout
    lib = run_batch(mixed_folder, tmp_path / "lib", model=model_dir, policy="native", workers=0, masks=masks,
                    progress=False)
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert cli["localisation"]["images"] == 1 and cli["distance"]["count"] == 5
    assert_same_summary(cli, lib.summary)


def test_collect_inputs_from_glob_list_and_paths(mixed_folder: Path, tmp_path: Path) -> None:
    by_glob = collect_inputs(str(mixed_folder / "**" / "*.png"))
    assert [i.rel for i in by_glob] == ["a/x.png", "b/x.png", "broken.png", "d.png", "deep/e/f.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nin/a/x.png\n\nin/b/x.png\n")
    assert [i.rel for i in collect_inputs(listing)] == ["a/x.png", "b/x.png"]
    items = collect_inputs([mixed_folder / "deep/e/f.png", mixed_folder / "c.jpg"])
    assert [i.rel for i in items] == ["c.jpg", "deep/e/f.png"]
    with pytest.raises(VitscopeError, match="inputs"):
        collect_inputs(str(tmp_path / "nothing" / "*.png"))
    # an output folder inside the input folder is not scanned
    (mixed_folder / "out").mkdir()
    _image(mixed_folder / "out" / "old.png", 8, 8, seed=0)
    assert "out/old.png" not in [i.rel for i in collect_inputs(mixed_folder, exclude=mixed_folder / "out")]


def test_bad_arguments(mixed_folder: Path, model_dir: Path, tmp_path: Path) -> None:
    for kwargs, arg in [({"method": "nope"}, "method"), ({"formats": "jpg"}, "formats"),
                        ({"batch_size": 0}, "batch_size"), ({"workers": -1}, "workers")]:
        with pytest.raises(VitscopeError, match=arg):
            run_batch(mixed_folder, tmp_path / "o", model=model_dir, progress=False, **kwargs)


def test_engine_options_are_refused_not_ignored(mixed_folder: Path, tmp_path: Path) -> None:
    """An option the chosen engine cannot honour is an error naming it (the engines used to ignore them), and
    numeric ranges are one rule for both engines (checked before any folder, model or cluster)."""
    from vitscope.batch.local import check_options

    out = tmp_path / "o"
    for engine, kwargs in [("ray", {"workers": 2}), ("ray", {"formats": "npz"}), ("ray", {"verify": False}),
                           ("local", {"concurrency": 2}), ("local", {"num_cpus": 1.0}),
                           ("local", {"address": "127.0.0.1:1"}), ("local", {"max_retries": 0})]:
        name = next(iter(kwargs))
        with pytest.raises(VitscopeError, match=f"^{name}: the {engine} engine does not use it"):
            run_batch(mixed_folder, out, engine=engine, progress=False, **kwargs)
    assert not out.exists()
    for name, value in [("batch_size", 0), ("batch_size", 2.0), ("batch_size", True), ("workers", -1),
                        ("concurrency", 0), ("max_retries", -1), ("num_cpus", 0), ("num_cpus", float("nan")),
                        ("num_cpus", float("inf")), ("num_gpus", -0.5), ("norm_threshold", float("nan")),
                        ("norm_threshold", -1.0), ("norm_threshold", 0.0), ("part_size", 0)]:
        with pytest.raises(VitscopeError, match=f"^{name}: must be "):
            check_options(**{name: value})
    check_options(batch_size=1, workers=0, concurrency=1, max_retries=0, num_cpus=0.25, num_gpus=0,
                  norm_threshold=1e-3, part_size=1, preprocess_tasks=None)  # the smallest valid values


def test_manifest_lines_are_checked_on_load(tmp_path: Path) -> None:
    """A manifest line of the wrong shape is a one-line error naming the file, the line and the fix; a blank
    line and a last line cut short by a kill are not errors."""
    from vitscope.batch.local import check_entry

    good = {"rel": "a.png", "status": "ok", "error": None, "method": "cls",
            "outputs": {"npz": {"path": "a.cls.npz", "bytes": 10, "sha256": "00"}},
            "stats": {"distance": [1.0] * 8, "norm_mean": [1.0, 2.0], "norm_high": [0, 1], "patch_tokens": 16,
                      "prediction": 3, "label": None, "score": 0.5, "pointing": True, "iou": 0.25}}
    assert check_entry(good, (2, 4)) is None
    assert check_entry({**good, "stats": {**good["stats"], "distance": [1.0] * 6}}, (2, 4)) == \
        '"stats"."distance" has 6 values, the model needs 8'
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "rel": 5}) + "\n")
    with pytest.raises(VitscopeError) as exc:
        Manifest(path).load(shape=(2, 4))
    assert str(exc.value) == (f'output: {path} line 3: "rel" must be a non-empty string (fix or delete that line, '
                              "or pass --overwrite)")
    path.write_text(json.dumps(good) + "\n\n" + '{"rel": "b.png", "sta')  # killed mid-line
    manifest = Manifest(path)
    manifest.load(shape=(2, 4))
    assert list(manifest.entries) == ["a.png"] and path.read_text().endswith("\n\n")


def test_cli_batch(mixed_folder: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vitscope.cli import main

    out = tmp_path / "cli"
    main(["batch", str(mixed_folder), "-o", str(out), "--model", str(model_dir), "--policy", "native",
          "--workers", "0", "--format", "npz", "--quiet"])
    captured = capsys.readouterr()
    assert "5 done" in captured.out and "2 failed" in captured.out and "broken.png" in captured.err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == [
        "a/x.cls.npz", "b/x.cls.npz", "c.cls.npz", "d.cls.npz", "deep/e/f.cls.npz"]  # <stem>.<method>.<ext>
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(mixed_folder), "-o", str(out), "--model", str(model_dir), "--method", "rollout", "-q"])
    assert exc.value.code == 2
    assert "another run" in capsys.readouterr().err
    torch.set_num_threads(1)


@pytest.mark.parametrize("stats", [True, False], ids=["stats", "no stats"])
def test_summary_figure_imports_ride_on_the_writer_thread(stats: bool, mixed_folder: Path, model_dir: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the measures on, the distance figure's imports (matplotlib) run once, on the writer thread after the
    first batch's writes (beside the next forward passes, not after the last one), and the figure is written;
    without measures there is no figure and nothing is imported for it."""
    import threading

    from vitscope.batch import local

    calls: list[str] = []
    real = local._import_figures

    def spy() -> None:
        calls.append(threading.current_thread().name)
        real()

    monkeypatch.setattr(local, "_import_figures", spy)
    out = tmp_path / "out"
    res = run_batch(mixed_folder, out, model=model_dir, policy="native", batch_size=2, workers=0, formats="npz",
                    stats=stats, progress=False)
    assert res.done == 5
    if stats:
        assert len(calls) == 1 and calls[0].startswith("vitscope-batch-writer"), calls
        assert (out / "distance.png").stat().st_size > 1000
    else:
        assert calls == [] and not (out / "distance.png").exists()
