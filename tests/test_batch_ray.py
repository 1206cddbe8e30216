"""The Ray engine: same maps, metadata, errors, per-image measures and summaries as local batch mode, summaries
equal direct computations,
re-runs compute nothing, a killed actor is retried with every image written exactly once, Parquet reads back.

All tests share one local Ray cluster (2 CPUs, no dashboard): they live in this one file, and ``make test`` runs
``pytest -n 2 --dist loadfile``, which runs a file's tests on one worker, so two workers never start two clusters.
(``--dist loadgroup`` with ``xdist_group`` marks does not group with pytest 9.2 and pytest-xdist 3.8.0: the
group suffix xdist writes into ``item._nodeid`` no longer reaches the scheduler.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_same_summary, make_tiny_vit
from vitscope.adapters import load
from vitscope.batch import run_batch
from vitscope.capture import capture
from vitscope.capture.core import capture_full
from vitscope.errors import VitscopeError
from vitscope.methods.api import get_method
from vitscope.methods.artifacts import outlier_threshold
from vitscope.methods.cls_attention import cls_map
from vitscope.methods.distance import DistanceAccumulator
from vitscope.methods.metrics import mask_jaccard, pointing_game
from vitscope.methods.registry import REGISTRY, Method
from vitscope.models.vit import save_vit

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

from vitscope.batch import ray_engine as batch_ray  # noqa: E402

RAY_OPTS = {"concurrency": 2, "num_cpus": 0.5, "part_size": 8, "preprocess_tasks": 2, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def _ray_logs_here(tmp_path_factory: pytest.TempPathFactory):
    """The in-process runs' Ray log files (`ray_output`) go to a test folder, not the system's temporary one."""
    saved = batch_ray.LOG_DIR
    batch_ray.LOG_DIR = str(tmp_path_factory.mktemp("ray-logs"))
    yield
    batch_ray.LOG_DIR = saved


@pytest.fixture(scope="session")
def ray_cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _image(path: Path, height: int, width: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 inputs: 37 images of three sizes in subfolders (masks for 12 of them) and 3 bad files; a model."""
    root = tmp_path_factory.mktemp("ray")
    src, masks = root / "in", root / "masks"
    sizes = [(40, 56), (32, 32), (48, 24)]
    rng = np.random.default_rng(5)
    for i in range(37):
        h, w = sizes[i % 3]
        rel = f"g{i % 4}/img{i:02d}.png"
        _image(src / rel, h, w, seed=200 + i)
        if i < 12:  # a random rectangle as the object
            m = np.zeros((h, w), dtype=np.uint8)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            m[y:y + h // 2, x:x + w // 2] = 255
            (masks / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(masks / rel)
    (src / "broken.png").write_bytes((src / "g0/img00.png").read_bytes()[:80])
    (src / "notes.txt").write_text("not an image\n")
    (src / "g1" / "empty.png").write_bytes(b"")
    model = save_vit(make_tiny_vit(num_registers=2, seed=11), root / "model")
    return {"root": root, "src": src, "masks": masks, "model": model}


@pytest.fixture(scope="module")
def outputs(dataset: dict[str, Path], ray_cluster: None) -> dict[str, object]:
    """The same 40 inputs through local batch mode and the Ray engine (2 actors)."""
    local, remote = dataset["root"] / "local", dataset["root"] / "ray"
    s_local = run_batch(dataset["src"], local, model=dataset["model"], policy="native", batch_size=4, workers=0,
                        formats="npz", masks=dataset["masks"], progress=False)
    s_ray = run_batch(dataset["src"], remote, model=dataset["model"], policy="native", batch_size=4, engine="ray",
                      masks=dataset["masks"], **RAY_OPTS)
    return {"local": local, "ray": remote, "s_local": s_local, "s_ray": s_ray}


def _local_npz(out: Path, rid: str, method: str = "cls") -> Path:
    """Local batch mode's npz for input ``rid``: ``<stem>.<method>.npz`` (the input name kept on a shared stem)."""
    plain = out / f"{Path(rid).with_suffix('')}.{method}.npz"
    return plain if plain.exists() else out / f"{rid}.{method}.npz"


def _rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in batch_ray.read_results(out).to_pylist()}


def test_maps_metadata_and_errors_equal_local_batch_mode(outputs: dict, dataset: dict[str, Path]) -> None:
    s_local, s_ray = outputs["s_local"], outputs["s_ray"]
    assert (s_ray.total, s_ray.done, s_ray.failed, s_ray.skipped) == (40, 37, 3, 0)
    assert (s_local.done, s_local.failed) == (37, 3)
    assert sorted(s_ray.errors) == sorted(s_local.errors)  # the same one-line reasons
    rows = _rows(outputs["ray"])
    assert len(rows) == 40
    bad = {rel for rel, _ in s_local.errors}
    assert bad == {"broken.png", "notes.txt", "g1/empty.png"}
    vit = load(dataset["model"])
    for rid, row in rows.items():
        if rid in bad:
            assert row["status"] == "error" and row["map"] is None and row["error"] == dict(s_local.errors)[rid]
            continue
        assert row["status"] == "ok" and row["error"] is None and row["rel"] == rid
        with np.load(_local_npz(outputs["local"], rid)) as data:
            local_map, local_heads, local_meta = data["map"], data["heads"], json.loads(str(data["meta_json"]))
        arrays = batch_ray.row_arrays(row, num_heads=vit.info.num_heads)
        assert arrays["map"].shape == local_map.shape
        np.testing.assert_allclose(arrays["map"], local_map, atol=1e-6)
        np.testing.assert_allclose(arrays["heads"], local_heads, atol=1e-6)
        assert json.loads(row["meta_json"]) == local_meta  # the metadata local batch mode writes
        assert row["grid"] == local_meta["grid"] and row["original_size"] == local_meta["original_size"]
        # the prediction: argmax of the model's own logits
        out = capture_full(vit, str(dataset["src"] / rid), layers=[-1], queries="cls", policy="native").output
        probs = torch.softmax(vit.logits(out), dim=-1)[0]
        assert row["prediction"] == int(probs.argmax()) and row["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_summary_equals_direct_computation(outputs: dict, dataset: dict[str, Path]) -> None:
    summary = json.loads((outputs["ray"] / "summary.json").read_text())
    assert summary == outputs["s_ray"].summary
    assert (summary["images"], summary["failed"]) == (37, 3)
    vit = load(dataset["model"])
    acc = DistanceAccumulator(metric="centre", renormalize=True)
    high, tokens, mean_norm = np.zeros(vit.info.num_layers), 0, np.zeros(vit.info.num_layers)
    hits, ious, classes = [], [], Counter()
    rows = _rows(outputs["ray"])
    for rid, row in sorted(rows.items()):
        if row["status"] != "ok":
            continue
        path = dataset["src"] / rid
        attn = capture(vit, str(path), policy="native", token_norms=True)  # every layer, head and row
        acc.update(attn)
        norms = attn.to_grid(attn.token_norms)[:, 0].flatten(1).double().numpy()  # (L, P)
        high += [(x > outlier_threshold(x)).sum() for x in norms]
        tokens += norms.shape[1]
        mean_norm += norms.mean(axis=1)
        classes[str(row["prediction"])] += 1
        mask_path = dataset["masks"] / rid
        if mask_path.exists():  # the mask in the model input's frame, as documented
            hw = row["image_size"]
            with Image.open(mask_path) as im:
                gt = torch.from_numpy(np.asarray(im.convert("L").resize((hw[1], hw[0]), Image.Resampling.NEAREST)) > 0)
            heat = cls_map(capture(vit, str(path), layers=[-1], queries="cls", policy="native"), head="mean")
            hits.append(bool(pointing_game(heat, gt[None])[0]))
            ious.append(float(mask_jaccard(heat, gt[None], tau=0.6).best[0, 0]))
            assert row["pointing"] == hits[-1] and row["iou"] == pytest.approx(ious[-1], abs=1e-9)
        else:
            assert row["pointing"] is None and row["iou"] is None
    dist = summary["distance"]
    assert dist["count"] == 37
    np.testing.assert_allclose(dist["mean"], acc.mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(dist["std"], acc.std.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(summary["high_norm"]["rate"], high / tokens, atol=1e-12)
    np.testing.assert_allclose(summary["high_norm"]["mean_norm"], mean_norm / 37, rtol=1e-6)
    assert len(hits) == 12
    assert summary["localisation"] == pytest.approx({"images": 12, "pointing_game": np.mean(hits),
                                                     "mask_iou": np.mean(ious)})
    assert summary["predictions"] == dict(sorted(classes.items(), key=lambda kv: int(kv[0])))
    assert (outputs["ray"] / "distance.png").stat().st_size > 1000


def test_summaries_and_per_image_measures_equal_local_batch_mode(outputs: dict) -> None:
    """Local batch mode (one process, DataLoader, manifest.jsonl) and the Ray engine (2 actors, Parquet parts,
    partial sums merged on the cluster) write the same summary.json over the same 40 inputs, and the same
    measures per image. The two differ only in the run's ``engine`` setting."""
    local = json.loads((outputs["local"] / "summary.json").read_text())
    remote = json.loads((outputs["ray"] / "summary.json").read_text())
    assert local == outputs["s_local"].summary and remote == outputs["s_ray"].summary
    assert (local.pop("engine"), remote.pop("engine")) == ("local", "ray")
    assert local["images"] == 37 and local["failed"] == 3 and local["localisation"]["images"] == 12
    assert {"distance", "high_norm", "localisation", "predictions"} <= set(local)
    assert_same_summary(local, remote)
    assert (outputs["local"] / "distance.png").stat().st_size > 1000
    # per image: the manifest line's "stats" against the Parquet row's columns
    lines = [json.loads(ln) for ln in (outputs["local"] / "manifest.jsonl").read_text().splitlines()]
    rows = _rows(outputs["ray"])
    ok = [e for e in lines if e["status"] == "ok"]
    assert len(ok) == 37
    for entry in ok:
        row = rows[entry["rel"]]
        for name in ("norm_high", "patch_tokens", "prediction", "label", "pointing"):
            assert entry["stats"].get(name) == row[name], (entry["rel"], name)
        # float32 forwards over differently composed batches: equal up to float32 rounding
        for name in ("distance", "norm_mean", "score"):
            assert entry["stats"][name] == pytest.approx(row[name], rel=1e-6), (entry["rel"], name)
        assert entry["stats"].get("iou") == (None if row["iou"] is None else pytest.approx(row["iou"], abs=1e-6))


def test_rerun_after_completion_computes_nothing(outputs: dict, dataset: dict[str, Path]) -> None:
    out = outputs["ray"]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in batch_ray.part_files(out)
              if "ok" in pq.read_table(p, columns=["status"]).column("status").to_pylist()}
    summary = run_batch(dataset["src"], out, model=dataset["model"], policy="native", batch_size=4, engine="ray",
                        masks=dataset["masks"], **RAY_OPTS)
    assert (summary.done, summary.skipped, summary.failed) == (0, 37, 3)  # only the bad files are tried again
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in batch_ray.part_files(out)}
    assert all(after[name] == rec for name, rec in before.items())  # no part with a map was rewritten
    assert summary.summary == outputs["s_ray"].summary
    # another method into the same folder is refused
    with pytest.raises(VitscopeError, match="another run"):
        run_batch(dataset["src"], out, model=dataset["model"], method="rollout", engine="ray", **RAY_OPTS)


def test_parquet_reads_back_with_the_documented_columns(outputs: dict, dataset: dict[str, Path]) -> None:
    out = outputs["ray"]
    frame = pd.read_parquet(out / "parts")  # plain pandas/pyarrow: the dot-prefixed temporaries are ignored
    assert tuple(frame.columns) == batch_ray.COLUMNS
    assert frame["id"].nunique() == 40  # (+ the 3 error rows again once the re-run has tried them again)
    assert frame[frame["status"] == "ok"]["id"].is_unique and (frame["status"] == "ok").sum() == 37
    table = batch_ray.read_results(out)
    assert table.num_rows == 40 and tuple(table.column_names) == batch_ray.COLUMNS
    import pyarrow as pa

    value = {f.name: f.type.value_type for f in table.schema if pa.types.is_list(f.type)}
    assert value["map"] == pa.float32() and value["heads"] == pa.float32() and value["grid"] == pa.int32()
    assert value["distance"] == pa.float64() and table.schema.field("prediction").type == pa.int64()
    ok = frame[frame["status"] == "ok"]
    row = ok.iloc[0]
    heat = np.asarray(row["map"], dtype=np.float32).reshape(row["grid"])
    with np.load(_local_npz(outputs["local"], row["id"])) as data:
        np.testing.assert_allclose(heat, data["map"], atol=1e-6)
    assert len(row["distance"]) == 2 * 4 and len(row["norm_high"]) == 2  # layers x heads, layers
    # a duplicated part (as a retried write could leave) is dropped on read-back and in the summary
    first = batch_ray.part_files(out)[0]
    (first.parent / "part-zzzz-duplicate.parquet").write_bytes(first.read_bytes())
    try:
        assert batch_ray.read_results(out).num_rows == 40
        again = batch_ray.summarize(out, num_heads=4, config=json.loads((out / "batch.json").read_text()),
                                    figure=False)
        assert again == outputs["s_ray"].summary
    finally:
        (first.parent / "part-zzzz-duplicate.parquet").unlink()
        batch_ray.summarize(out, num_heads=4, config=json.loads((out / "batch.json").read_text()))


def test_parquet_manifest_with_bytes_and_csv_with_paths(outputs: dict, dataset: dict[str, Path]) -> None:
    import pyarrow as pa

    rels = ["g0/img00.png", "g1/img01.png", "g2/img02.png"]
    data = [(dataset["src"] / r).read_bytes() for r in rels] + [b"garbage"]
    manifest = dataset["root"] / "images.parquet"
    pq.write_table(pa.table({"bytes": data}), manifest)
    out = dataset["root"] / "from-bytes"
    summary = run_batch(manifest, out, model=dataset["model"], policy="native", engine="ray", summary=False,
                        stats=False, **RAY_OPTS)
    assert (summary.done, summary.failed) == (3, 1)
    rows = _rows(out)
    local = _rows(outputs["ray"])
    import hashlib

    for rel, blob in zip(rels, data, strict=False):
        row = rows["sha256:" + hashlib.sha256(blob).hexdigest()]  # a content hash when there is no id column
        np.testing.assert_allclose(row["map"], local[rel]["map"], atol=1e-6)
        assert row["distance"] is None  # stats=False
    # a list of URIs (file:// here; s3://, gs://, ... go through the same pyarrow filesystem call): ids are the URIs
    uris = [(dataset["src"] / r).resolve().as_uri() for r in rels]
    out_uri = dataset["root"] / "from-uris"
    summary = run_batch(uris, out_uri, model=dataset["model"], policy="native", engine="ray", summary=False,
                        stats=False, **RAY_OPTS)
    assert (summary.done, summary.failed) == (3, 0)
    by_uri = _rows(out_uri)
    assert sorted(by_uri) == sorted(uris)
    for rel, uri in zip(rels, uris, strict=True):
        np.testing.assert_allclose(by_uri[uri]["map"], local[rel]["map"], atol=1e-6)
    csv = dataset["root"] / "images.csv"
    csv.write_text("id,path\n" + "".join(f"{r},{dataset['src'] / r}\n" for r in rels))
    out_csv = dataset["root"] / "from-csv"
    summary = run_batch(csv, out_csv, model=dataset["model"], policy="native", engine="ray", summary=False,
                        **RAY_OPTS)
    assert summary.done == 3 and sorted(_rows(out_csv)) == sorted(rels)
    assert run_batch(csv, out_csv, model=dataset["model"], policy="native", engine="ray", summary=False,
                     **RAY_OPTS).done == 0


def test_killed_actor_is_retried_and_every_image_written_once(ray_cluster: None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src, out, pids = tmp_path / "in", tmp_path / "out", tmp_path / "pids"
    pids.mkdir()
    paths = [_image(src / f"img{i:02d}.png", 32, 32, seed=300 + i) for i in range(24)]
    (src / "bad.png").write_bytes(b"\x89PNG not really")
    model = save_vit(make_tiny_vit(seed=3), tmp_path / "model")
    pid_dir = str(pids)

    def slow_cls(ctx, *, layer=-1):  # runs in the actors (the Method travels with the run): report the pid
        from vitscope.methods.api import get_method

        Path(pid_dir, str(os.getpid())).touch()
        time.sleep(0.4)
        return get_method("cls").compute(ctx, layer=layer)

    monkeypatch.setitem(REGISTRY, "slow-cls", Method(name="slow-cls", compute=slow_cls, summary="-", paper="-"))
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["summary"] = run_batch(src, out, model=model, method="slow-cls", engine="ray", batch_size=2,
                                          concurrency=2, num_cpus=0.5, part_size=2, preprocess_tasks=2, stats=False,
                                          progress=False)
        except BaseException as exc:  # surfaced below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(batch_ray.part_files(out)) < 3:
        time.sleep(0.05)
    victims = [int(p.name) for p in pids.iterdir()]
    assert victims and thread.is_alive(), "the run finished before an actor could be killed"
    os.kill(victims[0], signal.SIGKILL)
    before_kill = set(victims)
    thread.join(timeout=240)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    summary = result["summary"]
    assert (summary.done, summary.failed) == (24, 1)
    assert {int(p.name) for p in pids.iterdir()} - before_kill  # Ray restarted the killed actor
    # every part is a complete Parquet file, no temporary is left, and every image is there exactly once
    assert not [p for p in (out / "parts").iterdir() if not p.name.startswith("part-")]
    ids = Counter(rid for p in batch_ray.part_files(out) for rid in pq.read_table(p).column("id").to_pylist())
    assert set(ids) == {p.name for p in paths} | {"bad.png"} and set(ids.values()) == {1}
    rows = _rows(out)
    vit = load(model)
    for p in paths:
        attn = capture(vit, str(p), layers=[-1], queries="cls")
        np.testing.assert_allclose(batch_ray.row_arrays(rows[p.name])["map"], cls_map(attn, head="mean")[0].numpy(),
                                   atol=1e-6)


def test_an_image_that_kills_its_worker_every_time_fails_alone(ray_cluster: None, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A poison image (here: a white one, on which the method SIGKILLs its own actor) is retried max_retries
    times, then its part is run again one image per part: only the poison image fails, with a one-line reason,
    and the run ends instead of retrying forever."""
    src, out = tmp_path / "in", tmp_path / "out"
    paths = [_image(src / f"img{i}.png", 32, 32, seed=400 + i) for i in range(6)]
    Image.new("RGB", (32, 32), (255, 255, 255)).save(src / "poison.png")
    model = save_vit(make_tiny_vit(seed=3), tmp_path / "model")

    def crash_on_white(ctx, *, layer=-1):  # runs in the actors
        from vitscope.methods.api import get_method

        if bool((ctx.pixels.flatten(1).amin(dim=1) > 0.9).any()):  # a white image in the batch: die like a segfault
            os.kill(os.getpid(), signal.SIGKILL)
        return get_method("cls").compute(ctx, layer=layer)

    monkeypatch.setitem(REGISTRY, "crash-cls", Method(name="crash-cls", compute=crash_on_white, summary="-",
                                                      paper="-"))
    opts = {"model": model, "method": "crash-cls", "engine": "ray", "batch_size": 4, "concurrency": 1,
            "num_cpus": 0.5, "part_size": 4, "max_retries": 1, "stats": False, "progress": False}
    summary = run_batch(src, out, **opts)
    assert (summary.done, summary.failed) == (6, 1)
    assert [rel for rel, _ in summary.errors] == ["poison.png"]
    assert summary.errors[0][1].startswith("WorkerDied: the worker computing this image died 2 times")
    rows = _rows(out)
    assert rows["poison.png"]["status"] == "error" and rows["poison.png"]["map"] is None
    vit = load(model)
    for p in paths:  # its neighbours in the lost part were computed again, one per part
        attn = capture(vit, str(p), layers=[-1], queries="cls")
        np.testing.assert_allclose(batch_ray.row_arrays(rows[p.name])["map"], cls_map(attn, head="mean")[0].numpy(),
                                   atol=1e-6)
    assert not [p for p in (out / "parts").iterdir() if not p.name.startswith("part-")]
    assert ray.data.DataContext.get_current().max_errored_blocks == 0  # the global setting is restored


def test_cli_engine_ray_and_missing_ray(outputs: dict, dataset: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscope.cli import main

    small = tmp_path / "in"
    for i in range(3):
        _image(small / f"{i}.png", 32, 32, seed=i)
    out = tmp_path / "out"
    main(["batch", str(small), "-o", str(out), "--model", str(dataset["model"]), "--engine", "ray",
          "--concurrency", "1", "--num-cpus", "0.5", "-q"])
    captured = capsys.readouterr()
    assert "3 done" in captured.out and "summary" in captured.out
    assert (out / "summary.json").exists() and len(batch_ray.read_results(out)) == 3
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(small), "-o", str(tmp_path / "o2"), "--engine", "ray", "-q"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --engine: the ray engine needs Ray Data, which is not installed (pip install 'vitscope[ray]')"
    with pytest.raises(VitscopeError, match="engine"):
        run_batch(small, tmp_path / "o3", engine="spark")
    torch.set_num_threads(1)


def test_ray_is_imported_lazily() -> None:
    import subprocess

    code = ("import sys, vitscope, vitscope.batch, vitscope.batch.ray_engine, vitscope.cli; "
            "print(','.join(m for m in ('ray', 'pyarrow', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing vitscope's batch modules pulled in {out}"


#: A line of Ray's: its Python loggers ("2026-01-02 03:04:05,678\tINFO worker.py:...") or its C++ core worker
#: ("[2026-01-02 03:04:05,678 E 123 123] core_worker.cc:...").
RAY_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR)\b|\[\d{4}-\d\d-\d\d [^]]*\] )")


def test_ray_is_quiet_by_default(tmp_path: Path) -> None:
    """A 5-image ``vitscope batch --engine ray`` that starts its own Ray prints vitscope's lines only (it used to
    print 42 of Ray's INFO lines and its token-authentication notice); Ray's lines are in the log file that
    the summary line names, not lost."""
    import subprocess

    src = tmp_path / "in"
    for i in range(5):
        _image(src / f"{i}.png", 32, 32, seed=i)
    model = save_vit(make_tiny_vit(seed=3), tmp_path / "model")
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own: the start-up lines are the loudest
    res = subprocess.run([sys.executable, "-m", "vitscope", "batch", str(src), "-o", str(tmp_path / "out"),
                          "--model", str(model), "--engine", "ray", "--num-cpus", "0.5", "-q"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "5 done" in res.stdout
    ray_lines = [line for line in res.stderr.splitlines() if RAY_LOG_LINE.match(line) or "INFO" in line]
    assert ray_lines == [], res.stderr[-2000:]
    assert len(res.stderr.splitlines()) <= 2, res.stderr[-2000:]  # -q: no progress bar; nothing else of ours
    logged = re.search(r"Ray's log (\S+\.log)", res.stdout)
    assert logged is not None, res.stdout
    log = Path(logged.group(1))
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
        assert "Started a local Ray instance" in text and any(RAY_LOG_LINE.match(x) for x in text.splitlines())
    finally:
        log.unlink(missing_ok=True)


def test_ray_output_sends_descriptor_2_to_the_log_and_restores_it_on_error() -> None:
    """`ray_output` without a cluster: what reaches file descriptor 2 (as Ray's C++ and its log handlers write)
    lands in the log, ``sys.stderr`` (vitscope's lines) stays on the real stderr, and both are restored when the
    block raises; ``verbose`` redirects nothing."""
    import subprocess

    code = (
        "import os, sys, logging\n"
        "from vitscope.batch.ray_engine import ray_output\n"
        "handler = logging.StreamHandler(sys.stderr)  # as Ray's: made before the run, holding the old stderr\n"
        "log = logging.getLogger('fake-ray'); log.addHandler(handler); log.propagate = False\n"
        "try:\n"
        "    with ray_output(False) as path:\n"
        "        os.write(2, b'from-cxx\\n'); log.warning('from-ray-logger'); print('ours', file=sys.stderr)\n"
        "        raise RuntimeError('boom')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "os.write(2, b'after\\n'); print('after-py', file=sys.stderr)\n"
        "with ray_output(True) as none:\n"
        "    os.write(2, b'verbose\\n')\n"
        "print(path, none)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    path, none = res.stdout.split()
    try:
        assert none == "None"
        assert res.stderr.splitlines() == ["ours", "after", "after-py", "verbose"]
        assert Path(path).read_text().splitlines() == ["from-cxx", "from-ray-logger"]
    finally:
        Path(path).unlink(missing_ok=True)


def test_cli_connects_to_a_running_cluster_by_address(outputs: dict, dataset: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """A cluster started elsewhere (here: another process's ray.init), joined with --address; the results
    equal the in-process run's."""
    import subprocess

    head_code = ("import sys, ray; ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False); "
                 "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")
    head = subprocess.Popen([sys.executable, "-c", head_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        address = head.stdout.readline().strip()
        assert address, "the head process did not start"
        src = tmp_path / "in"
        rels = ["g0/img00.png", "g1/img01.png"]
        for rel in rels:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((dataset["src"] / rel).read_bytes())
        env = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray's token authentication, on by default
        env.pop("RAY_ADDRESS", None)
        res = subprocess.run([sys.executable, "-m", "vitscope", "batch", str(src), "-o", str(tmp_path / "out"),
                              "--model", str(dataset["model"]), "--policy", "native", "--engine", "ray",
                              "--address", address, "--num-cpus", "0.5", "-q", "--verbose"],
                             capture_output=True, text=True, env=env, timeout=240)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "2 done" in res.stdout
        # --verbose: Ray's own lines stay on the terminal (the quiet default: test_ray_is_quiet_by_default)
        assert any(RAY_LOG_LINE.match(line) for line in res.stderr.splitlines()), res.stderr[-2000:]
        assert "Ray's log" not in res.stdout
    finally:
        head.stdin.close()
        head.wait(timeout=60)
        head.stdout.close()
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == rels
    with np.load(_local_npz(outputs["local"], "g0/img00.png")) as data:  # local batch mode's map
        np.testing.assert_allclose(batch_ray.row_arrays(rows["g0/img00.png"])["map"], data["map"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ issue 16
def test_overwrite_removes_only_vitscopes_own_parts(tmp_path: Path) -> None:
    """``overwrite`` removes the parts vitscope wrote (their exact names) and nothing else in OUT/parts (it
    used to delete the whole folder)."""
    parts = tmp_path / batch_ray.PARTS
    parts.mkdir()
    batch_ray.write_part(parts, [batch_ray.empty_row(id="a.png", rel="a.png", status="error", error="x")])
    own = batch_ray.part_files(tmp_path)
    user = {"notes.txt": b"my notes", "part-mine.parquet": b"user data", "part-0.parquet": b"x",
            "sub/part-aaaaaaaaaaaaaaaaaaaaaaaa.parquet": b"mine too"}
    for name, data in user.items():
        (parts / name).parent.mkdir(parents=True, exist_ok=True)
        (parts / name).write_bytes(data)
    assert [p.name for p in own] == [batch_ray._part_name(["a.png"])]
    batch_ray._check_config(tmp_path, {"engine": "ray"}, overwrite=True)
    assert not own[0].exists() and batch_ray.part_files(tmp_path) == []
    assert {name: (parts / name).read_bytes() for name in user} == user
    assert json.loads((tmp_path / "batch.json").read_text()) == {"engine": "ray"}


def _encoded(arr: np.ndarray, fmt: str = "PNG", **params: object) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **params)
    return buf.getvalue()


def _prep_args(model: Path) -> dict[str, object]:
    vit = load(str(model))
    return {"prep": vit.info.preprocess, "patch": vit.info.patch_size, "policy": "native", "size": None}


def test_integer_manifest_ids_are_strings_and_id_0_is_kept(dataset: dict[str, Path]) -> None:
    """A CSV/Parquet manifest with integer ids: id 0 is an id (not 'missing'), ids are compared as strings, so
    a resumed run skips what is done (it used to recompute everything, 23 rows for 12 images)."""
    import pyarrow as pa

    rels = ["g0/img00.png", "g1/img01.png", "g2/img02.png"]
    table = pa.table({"id": [0, 1, 2], "path": [str(dataset["src"] / r) for r in rels]})
    rows = batch_ray._preprocess_rows(table, done=frozenset(), **_prep_args(dataset["model"])).to_pylist()
    assert [r["id"] for r in rows] == ["0", "1", "2"] and [r["rel"] for r in rows] == ["0", "1", "2"]
    assert all(r["error"] is None for r in rows)
    left = batch_ray._preprocess_rows(table, done=frozenset({"0", "2"}), **_prep_args(dataset["model"]))
    assert left.column("id").to_pylist() == ["1"]


def test_bytes_rows_get_the_limits_and_exif_orientation_of_local_mode(dataset: dict[str, Path]) -> None:
    """Rows given as bytes: the driver's max_pixels holds in the task (it used to be the default there), and
    EXIF orientation turns the image upright as local mode does (it used to be ignored)."""
    import pyarrow as pa

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)  # (H, W, C)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: upright it is 40 high, 24 wide
    table = pa.table({"id": ["plain", "rotated"], "bytes": [_encoded(arr), _encoded(arr, "JPEG", exif=exif)]})
    rows = {r["id"]: r for r in batch_ray._preprocess_rows(table, done=frozenset(),
                                                           **_prep_args(dataset["model"])).to_pylist()}
    assert rows["plain"]["original_size"] == [24, 40]
    assert rows["rotated"]["original_size"] == [40, 24]
    limited = batch_ray._preprocess_rows(table, done=frozenset(), limits={"max_pixels": 500},
                                         **_prep_args(dataset["model"])).to_pylist()
    assert all("pixel limit" in (r["error"] or "") and r["pixels"] == b"" for r in limited)
    bad = pa.table({"id": ["g"], "bytes": [b"garbage"]})
    err = batch_ray._preprocess_rows(bad, done=frozenset(), **_prep_args(dataset["model"])).to_pylist()[0]["error"]
    assert "bytes of row g" in err and "BytesIO" not in err


def test_actors_run_under_the_drivers_limits(dataset: dict[str, Path], tmp_path: Path) -> None:
    """MapActor applies the limits it is given (the driver's): a token cap below the image's tokens makes every
    row an error row naming the limit; without it the same rows are ok."""
    import pyarrow as pa

    table = pa.table({"id": ["a"], "path": [str(dataset["src"] / "g0/img00.png")]})
    prepared = batch_ray._preprocess_rows(table, done=frozenset(), **_prep_args(dataset["model"]))
    kwargs = {"model": str(dataset["model"]), "method": "cls", "spec": get_method("cls"), "layer": -1, "model_id": "m",
              "batch_size": 4, "stats": False, "norm_threshold": None, "threads": 1, "device": "cpu"}
    ok = batch_ray.MapActor(parts_dir=str(tmp_path / "ok"), **kwargs)(prepared).to_pylist()
    capped = batch_ray.MapActor(parts_dir=str(tmp_path / "capped"), limits={"max_tokens": 4}, **kwargs)(
        prepared).to_pylist()
    torch.set_num_threads(1)
    assert [r["status"] for r in ok] == ["ok"]
    assert [r["status"] for r in capped] == ["error"] and "token" in capped[0]["error"]


def test_ray_ctrl_c_counts_the_parts_it_saved(tmp_path: Path) -> None:
    """The 'interrupted' line of a Ray run counts its parts (it used to read the local manifest: 0 saved)."""
    from vitscope.cli import _batch_saved

    parts = tmp_path / batch_ray.PARTS
    parts.mkdir()
    batch_ray.write_part(parts, [batch_ray.empty_row(id=i, rel=i, status="ok") for i in ("a", "b")])
    batch_ray.write_part(parts, [batch_ray.empty_row(id="c", rel="c", status="error", error="x")])
    line = _batch_saved(tmp_path, "ray")
    assert line.startswith(f"interrupted: 2 image(s) saved in {tmp_path} (1 failed), recorded in {parts};")


def test_limits_and_csv_resume_through_the_cluster(dataset: dict[str, Path], ray_cluster: None,
                                                   tmp_path: Path) -> None:
    """Through Ray: ``limits`` set around run_batch reach the workers; a CSV with integer ids (0 included)
    resumes without recomputing (rows == images)."""
    from vitscope.limits import limits

    rels = [f"g{i % 4}/img{i:02d}.png" for i in range(6)]
    csv = tmp_path / "ints.csv"
    csv.write_text("id,path\n" + "".join(f"{i},{dataset['src'] / r}\n" for i, r in enumerate(rels)))
    out = tmp_path / "out"
    first = run_batch(csv, out, model=dataset["model"], policy="native", engine="ray", summary=False, stats=False,
                      **RAY_OPTS)
    again = run_batch(csv, out, model=dataset["model"], policy="native", engine="ray", summary=False, stats=False,
                      **RAY_OPTS)
    assert (first.done, again.done, again.skipped) == (6, 0, 6)
    assert len(pq.read_table(out / batch_ray.PARTS, columns=["id"])) == 6
    with limits(max_pixels=500):  # every image is 1024 pixels or more
        capped = run_batch(dataset["src"] / "g0", tmp_path / "capped", model=dataset["model"], policy="native",
                           engine="ray", summary=False, stats=False, **{**RAY_OPTS, "concurrency": 1})
    assert capped.done == 0 and capped.failed == capped.total > 0
    assert all("pixel limit" in err for _rel, err in capped.errors)
