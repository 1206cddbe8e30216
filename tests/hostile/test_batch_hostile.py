"""Hostile-input catalogue: ``vitscope batch`` (both engines) — option values and engine-specific options,
hand-edited or corrupt batch state (``manifest.jsonl``, ``batch.json``, Ray parts), bad list files.

Every case runs in-process (`run_inprocess`) and must end with exit 2, one ``error:`` line naming the option
(or file) and no traceback; a case that finds an output folder hashes the whole tree before and after
(`tree_state` / `check_contained`). Validation runs before Ray starts: only the last test starts a cluster.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import make_tiny_vit
from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, tree_state
from vitscope.models.vit import save_vit

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two images, a tiny model, and the finished local run over them (its manifest lines and batch.json)."""
    root = tmp_path_factory.mktemp("batch_hostile")
    src = root / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(src / name)
    model = save_vit(make_tiny_vit(seed=4), root / "model")
    done = root / "done"
    res = run_inprocess(["batch", str(src), "-o", str(done), "-m", str(model), "--workers", "0", "-q",
                         "--format", "npz", "--device", "cpu"])
    assert res.code == 0, res.stderr
    lines = (done / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2
    torch.set_num_threads(1)
    return {"root": root, "src": src, "model": model, "done": done, "lines": [json.loads(ln) for ln in lines]}


def _argv(world: dict[str, Any], out: Path, *extra: str, engine: str = "local") -> list[str]:
    common = ["batch", str(world["src"]), "-o", str(out), "-m", str(world["model"]), "-q", "--device", "cpu"]
    local = ["--workers", "0", "--format", "npz"] if engine == "local" else ["--engine", "ray"]
    return [*common, *local, *extra]


def _expect_refused(world: dict[str, Any], out: Path, argv: list[str], needle: str, *,
                    option: bool = True) -> str:
    """Run ``argv``; exit 2, one line with ``needle``; nothing outside ``out`` changed (the inputs and model, the
    folder around ``out``), nothing inside it lost or changed."""
    roots = (world["root"], out.parent)
    before = [tree_state(r) for r in roots]
    line = assert_one_line(run_inprocess(argv), needle=needle, option=option)
    for root, state in zip(roots, before, strict=True):
        check_contained(state, tree_state(root), root, [out])
    return line


# ------------------------------------------------------------------------------------------------ options
#: (option, value) pairs out of range on both engines
BAD_VALUES = [
    ("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", "-100"),
    ("--norm-threshold", "nan"), ("--norm-threshold", "-1"), ("--norm-threshold", "0"), ("--norm-threshold", "inf"),
    ("--norm-threshold", "-inf"), ("--norm-threshold", "-0.001"),
]
#: ray-only options out of range: on the ray engine a range error, on the local engine "does not use it"
BAD_RAY_VALUES = [
    ("--num-cpus", "0"), ("--num-cpus", "nan"), ("--num-cpus", "inf"), ("--num-cpus", "-1"), ("--num-cpus", "-inf"),
    ("--num-gpus", "-1"), ("--num-gpus", "nan"), ("--num-gpus", "inf"),
    ("--concurrency", "0"), ("--concurrency", "-3"), ("--max-retries", "-1"), ("--max-retries", "-7"),
]
BAD_LOCAL_VALUES = [("--workers", "-1"), ("--workers", "-16"), ("--format", "tiff"), ("--format", ","),
                    ("--format", "npz,gif")]
#: options one engine cannot honour (valid values): refused there, naming the option
NOT_HONOURED = [
    ("local", ("--concurrency", "2")), ("local", ("--num-cpus", "1")), ("local", ("--num-gpus", "0")),
    ("local", ("--max-retries", "3")), ("local", ("--address", "127.0.0.1:6379")),
    ("ray", ("--workers", "2")), ("ray", ("--workers", "0")), ("ray", ("--format", "npz")),
    ("ray", ("--format", "png")), ("ray", ("--verify",)), ("ray", ("--no-verify",)),
]
#: values the option parser refuses (typer's usage error names the option)
UNPARSABLE = [("--batch-size", "abc"), ("--batch-size", "1.5"), ("--workers", "two"), ("--num-cpus", "many"),
              ("--concurrency", "1e3"), ("--max-retries", "x"), ("--norm-threshold", "high"),
              ("--num-gpus", "1/2"), ("--layer", "last")]

OPTION_CASES: list[Any] = []
for _engine in ("local", "ray"):
    for _opt, _val in BAD_VALUES:
        OPTION_CASES.append(pytest.param(_engine, (_opt, _val), _opt, id=f"{_engine}{_opt}={_val}"))
    for _opt, _val in BAD_RAY_VALUES:
        OPTION_CASES.append(pytest.param(_engine, (_opt, _val), _opt, id=f"{_engine}{_opt}={_val}"))
    for _opt, _val in BAD_LOCAL_VALUES:
        OPTION_CASES.append(pytest.param(_engine, (_opt, _val), _opt, id=f"{_engine}{_opt}={_val}"))
    for _opt, _val in UNPARSABLE:
        OPTION_CASES.append(pytest.param(_engine, (_opt, _val), _opt, id=f"{_engine}{_opt}={_val}-unparsable"))
for _engine, _extra in NOT_HONOURED:
    OPTION_CASES.append(pytest.param(_engine, _extra, _extra[0].replace("--no-", "--"),
                                     id=f"{_engine}-ignores{'='.join(_extra)}"))
OPTION_CASES.append(pytest.param("local", ("--engine", "spark"), "--engine", id="unknown-engine"))


@pytest.mark.parametrize(("engine", "extra", "option"), OPTION_CASES)
def test_bad_option_is_one_line_before_anything_is_written(world: dict[str, Any], tmp_path: Path, engine: str,
                                                           extra: tuple[str, ...], option: str) -> None:
    out = tmp_path / "out"
    # given last, the value under test wins over _argv's --workers 0 / --format npz (the option parser's rule)
    line = _expect_refused(world, out, _argv(world, out, *extra, engine=engine), option)
    assert not out.exists(), "a refused option must be refused before the output folder is created"
    assert "Traceback" not in line


@pytest.mark.parametrize(("option", "value"), BAD_VALUES)
def test_shared_ranges_are_checked_identically_on_both_engines(world: dict[str, Any], tmp_path: Path,
                                                               option: str, value: str) -> None:
    lines = [assert_one_line(run_inprocess(_argv(world, tmp_path / engine, option, value, engine=engine)))
             for engine in ("local", "ray")]
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"error: {option}: must be ")


def test_num_gpus_without_a_gpu_is_refused_up_front(world: dict[str, Any], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    line = _expect_refused(world, tmp_path / "out", _argv(world, tmp_path / "out", "--num-gpus", "1",
                                                          engine="ray"), "--num-gpus")
    assert "no GPU visible to Ray" in line


@pytest.mark.parametrize("engine", ["local", "ray"])
@pytest.mark.parametrize("body", [b"\xff\xfe\x00bad", b"a.png\n\xc3\x28\n", b"\x80" * 10],
                         ids=["bom-ish", "bad-utf8-line", "latin1"])
def test_non_utf8_list_file_names_the_inputs(world: dict[str, Any], tmp_path: Path, engine: str,
                                             body: bytes) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(body)
    out = tmp_path / "out"
    argv = _argv(world, out, engine=engine)
    argv[1] = str(listing)
    line = _expect_refused(world, out, argv, "INPUTS", option=False)
    assert str(listing) in line and "UTF-8" in line


# ------------------------------------------------------------------------------------------------ local state
def _resume_copy(world: dict[str, Any], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(world["done"], out)
    return out


def _with_line(world: dict[str, Any], out: Path, index: int, line: str) -> None:
    lines = [json.dumps(e, sort_keys=True) for e in world["lines"]]
    lines[index] = line
    (out / "manifest.jsonl").write_text("".join(ln + "\n" for ln in lines))


def _mutated(entry: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    new = json.loads(json.dumps(entry))
    target = new
    for key in path[:-1]:
        target = target[key]
    if value is _DROP:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return new


_DROP = object()
#: (path of the field, a wrong value, a word the message must hold)
BAD_FIELDS: list[tuple[tuple[str, ...], Any, str]] = [
    (("rel",), 3, '"rel"'), (("rel",), None, '"rel"'), (("rel",), "", '"rel"'), (("rel",), ["a.png"], '"rel"'),
    (("rel",), _DROP, '"rel"'),
    (("status",), "done", '"status"'), (("status",), 1, '"status"'), (("status",), None, '"status"'),
    (("status",), _DROP, '"status"'),
    (("outputs",), [], '"outputs"'), (("outputs",), "a.cls.npz", '"outputs"'), (("outputs",), None, '"outputs"'),
    (("outputs", "npz"), "a.cls.npz", '"outputs"."npz"'),
    (("outputs", "npz", "path"), 7, '"path"'), (("outputs", "npz", "path"), "../../victim.txt", '"path"'),
    (("outputs", "npz", "path"), "/etc/passwd", '"path"'),
    (("outputs", "npz", "bytes"), "12", '"bytes"'), (("outputs", "npz", "bytes"), -1, '"bytes"'),
    (("outputs", "npz", "bytes"), 1.5, '"bytes"'), (("outputs", "npz", "bytes"), True, '"bytes"'),
    (("outputs", "npz", "sha256"), None, '"sha256"'),
    (("error",), 5, '"error"'), (("error",), {"x": 1}, '"error"'),
    (("stats",), "fast", '"stats"'), (("stats",), [1, 2], '"stats"'),
    (("stats", "distance"), [1.0, 2.0], '"distance"'), (("stats", "distance"), "far", '"distance"'),
    (("stats", "distance"), ["a"] * 4, '"distance"'),
    (("stats", "norm_high"), [1], '"norm_high"'), (("stats", "norm_high"), [0.5, 1.5], '"norm_high"'),
    (("stats", "norm_mean"), [1.0], '"norm_mean"'), (("stats", "norm_mean"), None, '"norm_mean"'),
    (("stats", "patch_tokens"), "16", '"patch_tokens"'), (("stats", "patch_tokens"), 0, '"patch_tokens"'),
    (("stats", "prediction"), "cat", '"prediction"'), (("stats", "prediction"), -2, '"prediction"'),
    (("stats", "score"), "high", '"score"'),
]


@pytest.mark.parametrize(("field", "value", "word"), BAD_FIELDS,
                         ids=[f"{'.'.join(f)}={v if v is not _DROP else 'missing'!r}" for f, v, _ in BAD_FIELDS])
def test_hand_edited_manifest_line_is_one_line(world: dict[str, Any], tmp_path: Path, field: tuple[str, ...],
                                               value: Any, word: str) -> None:
    out = _resume_copy(world, tmp_path)
    _with_line(world, out, 1, json.dumps(_mutated(world["lines"][1], field, value)))
    line = _expect_refused(world, out, _argv(world, out), "--output")
    assert f"{out / 'manifest.jsonl'} line 2" in line and word in line and "--overwrite" in line


@pytest.mark.parametrize("garbage", ["{", "not json", "[1, 2]", "42", '"a.png"', "null", "{]", "[" * 5000],
                         ids=["open-brace", "text", "list", "number", "string", "null", "bad-json", "deep"])
def test_garbage_manifest_line_is_one_line(world: dict[str, Any], tmp_path: Path, garbage: str) -> None:
    out = _resume_copy(world, tmp_path)
    _with_line(world, out, 0, garbage)
    line = _expect_refused(world, out, _argv(world, out), "--output")
    assert "manifest.jsonl line 1" in line and "not a JSON object" in line


_JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                     max_size=3), max_leaves=6)
_FIELDS = [("rel",), ("status",), ("outputs",), ("outputs", "npz"), ("outputs", "npz", "path"),
           ("outputs", "npz", "bytes"), ("error",), ("stats",), ("stats", "distance"), ("stats", "norm_high"),
           ("stats", "prediction"), ("stats", "iou")]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=_JSONISH)
def test_generated_manifest_edits_never_trace(world: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                                              field: tuple[str, ...], value: Any) -> None:
    """Any JSON value in any field: the run resumes (the value is valid) or stops with one line naming the
    manifest's line; never a traceback, never a lost or changed file."""
    from vitscope.batch.local import RUN_FILES, check_entry

    entry = _mutated(world["lines"][0], field, value)
    out = _resume_copy(world, tmp_path_factory.mktemp("gen"))
    _with_line(world, out, 0, json.dumps(entry))
    inputs, before = tree_state(world["root"]), tree_state(out.parent)
    res = run_inprocess(_argv(world, out))
    after = tree_state(out.parent)
    if res.code == 0:  # a valid edit resumes; the run's own files (summary, manifest, ...) may be rewritten
        assert check_entry(entry, (2, 4)) is None  # the tiny model: 2 layers, 4 heads
        before, after = ({k: v for k, v in d.items() if Path(k).name not in RUN_FILES} for d in (before, after))
    else:  # a bad line is named; a valid one that disowns an output is refused by the ownership rule
        line = assert_one_line(res)
        assert line.startswith("error: --output: ")
        if check_entry(entry, (2, 4)) is not None:
            assert "manifest.jsonl line 1" in line
    check_contained(before, after, out.parent, [out])
    assert tree_state(world["root"]) == inputs


@pytest.mark.parametrize("body", [b"", b"garbage", b"\xff\xfe", b"[]", b'"cls"', b"42", b"null", b"{",
                                  b'{"engine": 3}', b'{"model": ["x"]}', b"[" * 5000],
                         ids=["empty", "text", "not-utf8", "list", "string", "number", "null", "open", "engine-int",
                              "model-list", "deep"])
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_corrupt_batch_json_is_one_line(world: dict[str, Any], tmp_path: Path, body: bytes, engine: str) -> None:
    out = _resume_copy(world, tmp_path)
    if engine == "ray":  # a Ray run's state: its parts (one real part, written the way the actors write it)
        _ray_part(out)
    (out / "batch.json").write_bytes(body)
    line = _expect_refused(world, out, _argv(world, out, engine=engine), "--output")
    assert "batch.json" in line and "--overwrite" in line


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=40) | _JSONISH.map(lambda v: json.dumps(v).encode()))
def test_generated_batch_json_bodies_never_trace(world: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                                                 body: bytes) -> None:
    """Any bytes or JSON value as batch.json beside a manifest: one line naming --output (garbage, or the
    settings of another run), never a traceback, nothing lost or changed."""
    out = _resume_copy(world, tmp_path_factory.mktemp("cfg"))
    (out / "batch.json").write_bytes(body)
    line = _expect_refused(world, out, _argv(world, out), "--output")
    assert line.startswith("error: --output: ") and ("batch.json" in line or "another run" in line)


# ------------------------------------------------------------------------------------------------ ray state
def _ray_part(out: Path) -> Path:
    pytest.importorskip("pyarrow")
    from vitscope.batch.ray_engine import PARTS, empty_row, part_files, write_part

    (out / PARTS).mkdir(exist_ok=True)
    write_part(out / PARTS, [empty_row(id="a.png", rel="a.png", input="a.png", status="error", error="x")])
    return part_files(out)[0]


def _bad_part(path: Path, kind: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "garbage":
        path.write_bytes(b"PAR1 not really")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "no-id":
        pq.write_table(pa.table({"x": [1, 2]}), path)
    elif kind == "int-id":
        pq.write_table(pa.table({"id": [0, 1], "status": ["ok", "ok"]}), path)
    elif kind == "null-id":
        pq.write_table(pa.table({"id": pa.array([None], pa.string()), "status": ["ok"]}), path)
    elif kind == "bad-status":
        pq.write_table(pa.table({"id": ["a.png"], "status": ["done"]}), path)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize("kind", ["garbage", "empty", "no-id", "int-id", "null-id", "bad-status", "truncated"])
def test_corrupt_ray_part_is_one_line(world: dict[str, Any], tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    part = _ray_part(out)
    _bad_part(part, kind)
    line = _expect_refused(world, out, _argv(world, out, engine="ray"), "--output")
    assert part.name in line and "--overwrite" in line


def test_ray_overwrite_and_symlinked_input_stay_inside(world: dict[str, Any], tmp_path: Path) -> None:
    """The one case that starts Ray: ``--overwrite`` keeps a user's files in OUT/parts (before: all deleted),
    and a symlinked image gets the id of its link below the input folder (before: ``../outside/victim.png``)."""
    pytest.importorskip("ray")
    src, outside, out = tmp_path / "in", tmp_path / "outside", tmp_path / "out"
    src.mkdir()
    outside.mkdir()
    shutil.copy(world["src"] / "a.png", src / "a.png")
    shutil.copy(world["src"] / "b.png", outside / "victim.png")
    (src / "link.png").symlink_to("../outside/victim.png")
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "notes.txt").write_text("my notes\n")
    (out / "parts" / "part-mine.parquet").write_bytes(b"user data")
    own = _ray_part(out)  # an old vitscope part: --overwrite removes it
    before = tree_state(tmp_path)
    res = run_inprocess(["batch", str(src), "-o", str(out), "-m", str(world["model"]), "-q", "--engine", "ray",
                         "--num-cpus", "0.5", "--overwrite", "--device", "cpu"])
    assert res.code == 0, res.stderr
    after = tree_state(tmp_path)
    del before[str(own.relative_to(tmp_path))]  # vitscope's own part, and only it, may go
    check_contained(before, after, tmp_path, [out])
    from vitscope.batch.ray_engine import read_results

    ids = sorted(read_results(out, columns=["status"]).column("id").to_pylist())
    assert ids == ["a.png", "link.png"]
    assert all(".." not in i for i in ids)
    assert (out / "parts" / "notes.txt").read_text() == "my notes\n"
    assert math.isfinite(json.loads((out / "summary.json").read_text())["images"])


# ------------------------------------------------------------------------------------------------ found on merge
def test_a_huge_batch_size_runs_and_does_not_hang(world: dict[str, Any], tmp_path: Path) -> None:
    """``--batch-size 10**20`` with loader workers: torch's loader primes ``prefetch_factor x workers`` indices
    in a loop, so an unbounded prefetch factor hung forever; it is bounded by the images to do."""
    import subprocess

    from tests.hostile.harness import run_script

    out = tmp_path / "out"
    argv = ["batch", str(world["src"]), "-o", str(out), "-m", str(world["model"]), "-q", "--device", "cpu",
            "--workers", "1", "--format", "npz", "--no-stats", "--batch-size", str(10**20)]
    try:
        res = run_script(argv, timeout=90)
    except subprocess.TimeoutExpired:  # pragma: no cover - the bug
        pytest.fail("batch --batch-size 10**20 hung")
    assert res.code == 0, res.stderr
    assert sorted(p.name for p in out.glob("*.cls.npz")) == ["a.cls.npz", "b.cls.npz"]


def test_a_model_file_the_batch_cannot_read_names_model(world: dict[str, Any], tmp_path: Path) -> None:
    """batch loads its model inside the library: a model file's error (a DINO-style reading of a vitscope
    safetensors file, whose argument is ``num_heads``) still names ``--model`` and gives no Python advice."""
    out = tmp_path / "out"
    argv = ["batch", str(world["src"]), "-o", str(out), "-m", str(world["model"] / "model.safetensors"), "-q",
            "--workers", "0", "--device", "cpu"]
    line = _expect_refused(world, out, argv, "--model")
    assert "num_heads=" not in line, line
