"""Containment: vitscope deletes or overwrites only files it wrote itself, inside the ``-o`` it was given.

The four data-loss cases of issue #16 first (each failed before the fix), then one generated table of hostile
output folders and inputs, each run in-process with the whole tmp tree hashed before and after.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import make_tiny_vit
from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, tree_state
from vitscope.models.vit import save_vit


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_vit(make_tiny_vit(), tmp_path_factory.mktemp("m") / "model")


def _image(path: Path, seed: int = 0, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)
    return path


def _batch(inp: Path | str, out: Path | str, model: Path, *extra: str, cwd: Path | None = None):
    return run_inprocess(["batch", str(inp), "-o", str(out), "-m", str(model), "--workers", "0", "-q",
                          "--no-stats", *extra], cwd=cwd)


def _report(out: Path | str, model: Path, *extra: str, cwd: Path | None = None):
    return run_inprocess(["report", str(model), "-o", str(out), "--images", "4", "--localisation", "0",
                          "--samples", "1", *extra], cwd=cwd)


def _users(state: dict[str, str], ours: dict[str, str], out: str) -> dict[str, str]:
    """``state`` without the files under ``out`` that vitscope wrote (those in ``ours``, a state taken right
    after a vitscope run): a re-run may replace those, never the rest."""
    return {k: v for k, v in state.items() if not (k.startswith(out + "/") and k in ours)}


# ------------------------------------------------------------------------------------- the four data-loss cases
def test_report_keeps_the_users_files(tmp_path: Path, model: Path) -> None:
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("four years of work")
    before = tree_state(tmp_path)
    res = _report(docs, model)
    assert_one_line(res, needle="--output")
    assert "thesis.txt" in res.stderr and "--overwrite" in res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [docs])
    # with --overwrite the report is written beside the user's file, which is kept
    res = _report(docs, model, "--overwrite")
    assert res.code == 0, res.stderr
    assert (docs / "thesis.txt").read_text() == "four years of work"
    assert (docs / "report.md").is_file() and (docs / "rollout.png").is_file()
    check_contained(before, tree_state(tmp_path), tmp_path, [docs])


def test_batch_never_writes_through_a_symlinks_target(tmp_path: Path, model: Path) -> None:
    inp, outside, out = tmp_path / "in", tmp_path / "outside", tmp_path / "out"
    _image(inp / "a.png", 1)
    victim = _image(outside / "victim.jpg", 2)
    (outside / "victim.cls.npz").write_bytes(b"the user's own file")
    (inp / "link.jpg").symlink_to(Path("..") / "outside" / "victim.jpg")
    before = tree_state(tmp_path)
    res = _batch(inp, out, model)
    assert res.code == 0, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    # the link is read (followed for reading), and named from its own path below the input root
    assert (out / "link.cls.npz").is_file() and (out / "a.cls.npz").is_file()
    import vitscope
    from vitscope.methods.cls_attention import cls_map

    expected = cls_map(vitscope.capture(vitscope.load(model), str(victim), layers=[-1], queries="cls"))[0]
    with np.load(out / "link.cls.npz") as data:
        np.testing.assert_allclose(data["map"], expected.numpy(), atol=1e-6)


def test_train_refuses_a_folder_holding_another_model(tmp_path: Path, model: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "vit", "hidden_size": 768}')
    (other / "pytorch_model.bin").write_bytes(b"\0" * 64)
    before = tree_state(tmp_path)
    res = run_inprocess(["train", "-o", str(other), "--max-steps", "1", "--no-progress",
                         "--set", "train_size=8", "--set", "val_size=4", "--batch-size", "4"])
    assert_one_line(res, needle="--output")
    assert "config.json" in res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [])


def test_train_with_missing_data_writes_nothing(tmp_path: Path) -> None:
    """The dataset is read before the run's folder, marker or train_config.json is written."""
    before = tree_state(tmp_path)
    res = run_inprocess(["train", "-o", str(tmp_path / "run"), "--preset", "mnist", "--data",
                         str(tmp_path / "missing")])
    assert_one_line(res, needle="--data")
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["resume", "overwrite"])
def test_batch_rerun_keeps_users_part_files(tmp_path: Path, model: Path, extra: list[str]) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    _image(inp / "a.png", 1)
    assert _batch(inp, out, model).code == 0
    ours = tree_state(tmp_path)
    (out / ".my-notes.part").write_text("notes")
    (out / "sub").mkdir()
    (out / "sub" / ".a.cls.npz.abc123.part").write_text("looks like an old temp file, is the user's")
    before = _users(tree_state(tmp_path), ours, out.name)
    res = _batch(inp, out, model, *extra)  # a batch run's folder is resumed beside the user's files
    assert res.code == 0, res.stderr
    assert ("1 done" if extra else "1 skipped") in res.stdout
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    assert (out / ".my-notes.part").read_text() == "notes"


# ------------------------------------------------------------------------------------------------ catalogue
# Every folder-writing command, at its smallest settings. ``out``: the -o as typed; ``inp``: batch's input folder.
def _argv(command: str, out: str, model: Path, inp: Path) -> list[str]:
    return {
        "report": ["report", str(model), "-o", out, "--images", "4", "--localisation", "0", "--samples", "1"],
        "train": ["train", "-o", out, "--max-steps", "1", "--no-progress", "--batch-size", "4", "--set", "train_size=8",
                  "--set", "val_size=4", "--set", "snapshots=0", "--set", "num_workers=0", "--set", "depth=1",
                  "--set", "dim=16"],
        "demo": ["demo", "-o", out, "-m", str(model)],
        "batch": ["batch", str(inp), "-o", out, "-m", str(model), "--workers", "0", "-q", "--no-stats"],
    }[command]


#: What a command writes (a file of each, checked after a run that wrote beside the user's files).
WRITES = {"report": "report.md", "train": "model.safetensors", "demo": "viewer.html", "batch": "a.cls.npz"}


def _symlink_out(out: Path, root: Path) -> None:
    (root / "outside").mkdir(exist_ok=True)
    (root / "outside" / "victim.txt").write_text("outside")
    (out / "link.txt").symlink_to(Path("..") / "outside" / "victim.txt")


def _dir_symlink_out(out: Path, root: Path) -> None:
    (root / "outside").mkdir(exist_ok=True)
    (root / "outside" / "victim.txt").write_text("outside")
    (out / "elsewhere").symlink_to(Path("..") / "outside")


#: Files of the user's in -o, by kind: each is "a file vitscope did not write".
USER_FILES = {
    "thesis": lambda out, root: (out / "thesis.txt").write_text("four years"),
    "part": lambda out, root: (out / ".my-notes.part").write_text("notes"),
    "old-temp-lookalike": lambda out, root: (out / ".report.md.abc123.part").write_text("x"),
    "temp-mark-in-name": lambda out, root: (out / "notes.vitscope-tmp.txt").write_text("x"),
    "marker-garbage": lambda out, root: (out / ".vitscope.json").write_text("my own settings"),
    "marker-foreign": lambda out, root: (out / ".vitscope.json").write_text('{"files": {"x.txt": "0"}}'),
    "marker-wrong-hash": lambda out, root: ((out / "x.txt").write_text("mine"), (out / ".vitscope.json").write_text(
        '{"vitscope": 1, "command": "report", "files": {"x.txt": "' + "0" * 64 + '"}}')),
    "marker-undotted": lambda out, root: (out / "vitscope.json").write_text("{}"),
    "manifest-lookalike": lambda out, root: (out / "manifest.jsonl").write_text('{"rel": "a.png"}\n'),
    "batch-json-garbage": lambda out, root: (out / "batch.json").write_text("[1, 2]"),
    "other-model": lambda out, root: ((out / "config.json").write_text('{"hidden_size": 768}'),
                                      (out / "pytorch_model.bin").write_bytes(b"\0" * 32)),
    "nested": lambda out, root: ((out / "deep" / "er").mkdir(parents=True), (out / "deep" / "er" / "b.bin").write_bytes(
        b"\1\2")),
    "empty-subfolder": lambda out, root: (out / "keep").mkdir(),
    "symlink-to-file-outside": _symlink_out,
    "symlink-to-folder-outside": _dir_symlink_out,
}


def _world(tmp_path: Path) -> tuple[Path, Path]:
    """``tmp_path/in`` with two images, ``tmp_path/out`` (not created); returns (inp, out)."""
    inp = tmp_path / "in"
    _image(inp / "a.png", 1)
    _image(inp / "sub" / "b.png", 2)
    return inp, tmp_path / "out"


REFUSED = [pytest.param(c, k, id=f"{c}-{k}") for c in ("report", "train", "demo", "batch") for k in USER_FILES]


@pytest.mark.parametrize(("command", "kind"), REFUSED)
def test_a_folder_holding_the_users_files_is_refused(tmp_path: Path, model: Path, command: str, kind: str) -> None:
    """Refused with one line naming -o and --overwrite; nothing anywhere is created, changed or deleted."""
    inp, out = _world(tmp_path)
    out.mkdir()
    USER_FILES[kind](out, tmp_path)
    before = tree_state(tmp_path)
    res = run_inprocess(_argv(command, str(out), model, inp))
    line = assert_one_line(res, needle="--output")
    assert "did not write" in line and "--overwrite" in line
    assert tree_state(tmp_path) == before


BESIDE = [pytest.param(c, k, id=f"{c}-{k}") for c, kinds in {
    "report": ("thesis", "part", "old-temp-lookalike", "marker-undotted", "nested", "symlink-to-folder-outside"),
    "batch": ("thesis", "part", "temp-mark-in-name", "other-model", "empty-subfolder", "symlink-to-file-outside"),
    "train": ("thesis", "nested"),
}.items() for k in kinds]


@pytest.mark.parametrize(("command", "kind"), BESIDE)
def test_overwrite_writes_beside_the_users_files(tmp_path: Path, model: Path, command: str, kind: str) -> None:
    """With --overwrite the outputs are written beside the user's files, which stay as they were."""
    inp, out = _world(tmp_path)
    out.mkdir()
    USER_FILES[kind](out, tmp_path)
    before = tree_state(tmp_path)
    res = run_inprocess([*_argv(command, str(out), model, inp), "--overwrite"])
    assert res.code == 0 and "Traceback" not in res.stderr, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    assert (out / WRITES[command]).is_file()


#: A file of the user's at a name the command writes: refused even with --overwrite.
COLLISIONS = [
    ("report", "report.md"), ("report", "rollout.png"), ("report", ".vitscope.json"),
    ("train", "config.json"), ("train", "checkpoints/last/model.safetensors"), ("train", "metrics.csv"),
    ("demo", "viewer.html"), ("demo", "attention_distance.png"), ("demo", ".vitscope.json"),
    ("batch", "a.cls.npz"), ("batch", "sub/b.cls.png"), ("batch", "manifest.jsonl"), ("batch", "summary.json"),
]


@pytest.mark.parametrize(("command", "name"), [pytest.param(c, n, id=f"{c}-{n}") for c, n in COLLISIONS])
def test_overwrite_never_replaces_a_users_file(tmp_path: Path, model: Path, command: str, name: str) -> None:
    inp, out = _world(tmp_path)
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(b"the user's " + name.encode())
    before = tree_state(tmp_path)
    res = run_inprocess([*_argv(command, str(out), model, inp), "--overwrite"])
    assert_one_line(res, needle="--output")
    assert tree_state(tmp_path) == before


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


#: Symlinks in batch's input folder: (setup, outputs expected under OUT besides a.cls.npz and sub/b.cls.npz).
#: Every link is read, never written through; what lies outside the root is never written.
INPUT_LINKS = {
    "file-outside": (lambda inp: _link(inp / "link.jpg", "../outside/victim.jpg"), ["link.cls.npz"]),
    "file-outside-absolute": (lambda inp: _link(inp / "abs.jpg", str(inp.parent / "outside" / "victim.jpg")),
                              ["abs.cls.npz"]),
    "file-outside-nested": (lambda inp: _link(inp / "x" / "y" / "v.jpg", "../../../outside/victim.jpg"),
                            ["x/y/v.cls.npz"]),
    "file-inside": (lambda inp: _link(inp / "again.png", "a.png"), ["again.cls.npz"]),
    "chain-outside": (lambda inp: (_link(inp.parent / "outside" / "hop.jpg", "victim.jpg"),
                                   _link(inp / "hop.jpg", "../outside/hop.jpg")), ["hop.cls.npz"]),
    "folder-outside": (lambda inp: _link(inp / "ext", "../outside"), []),  # symlinked folders are not entered
    "loop": (lambda inp: _link(inp / "loop", "."), []),
    "broken": (lambda inp: _link(inp / "gone.jpg", "../outside/nothing.jpg"), []),
    "into-out": (lambda inp: _link(inp / "o.png", "../out/a.cls.png"), []),  # nothing there when scanned
}


@pytest.mark.parametrize("kind", INPUT_LINKS)
def test_batch_input_symlinks_never_decide_where_files_go(tmp_path: Path, model: Path, kind: str) -> None:
    inp, out = _world(tmp_path)
    _image(tmp_path / "outside" / "victim.jpg", 3)
    (tmp_path / "outside" / "victim.cls.npz").write_bytes(b"the user's")
    setup, expected = INPUT_LINKS[kind]
    setup(inp)
    before = tree_state(tmp_path)
    res = _batch(inp, out, model)
    assert res.code == 0 and "Traceback" not in res.stderr, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz"))
    assert written == sorted(["a.cls.npz", "sub/b.cls.npz", *expected])
    assert not any(".." in p.relative_to(out).parts for p in out.rglob("*"))


#: -o relative to batch's input folder: (the -o, the folder run from, exit code, needle of the error line).
OUT_PLACES = {
    "equal": ("in", ".", 2, "is the input folder"),
    "equal-dotted": ("in/sub/..", ".", 2, "is the input folder"),
    "equal-dot": (".", "in", 2, "is the input folder"),
    "equal-trailing-slash": ("in/", ".", 2, "is the input folder"),
    "symlink-to-input": ("inlink", ".", 2, "is the input folder"),
    "above": (".", ".", 2, "did not write"),
    "parent": ("..", "in", 2, "did not write"),
    "inside": ("in/maps", ".", 0, None),
    "inside-deep": ("in/sub/maps", ".", 0, None),
    "beside": ("maps", ".", 0, None),
    "dotted-name": ("maps_v1.2", ".", 0, None),
    "dotted-name-2": ("v1.0.0", ".", 0, None),
    "file-type-name": ("maps.png", ".", 2, "names a file"),
}


@pytest.mark.parametrize("place", OUT_PLACES)
def test_batch_output_places(tmp_path: Path, model: Path, place: str) -> None:
    _world(tmp_path)
    (tmp_path / "inlink").symlink_to("in")
    out, cwd, code, needle = OUT_PLACES[place]
    before = tree_state(tmp_path)
    res = _batch("in" if cwd == "." else ".", out, model, cwd=tmp_path / cwd)
    if code:
        assert_one_line(res, code, needle=needle)
        assert "--output" in res.stderr
        assert tree_state(tmp_path) == before
        return
    assert res.code == 0, res.stderr
    target = tmp_path / cwd / out
    check_contained(before, tree_state(tmp_path), tmp_path, [target])
    assert (target / "a.cls.npz").is_file() and (target / "sub" / "b.cls.npz").is_file()
    again = _batch("in", out, model, cwd=tmp_path / cwd)  # a re-run never scans its own outputs
    assert again.code == 0 and "0 done, 2 skipped" in again.stdout, again.stdout


#: report / train / demo: -o as typed, from a folder: (command, -o, run from, exit code, needle).
FOLDER_NAMES = {
    "report-dot-empty": ("report", ".", "empty", 0, None),
    "report-dot-busy": ("report", ".", "in", 2, "did not write"),
    "report-parent": ("report", "..", "in/sub", 2, "did not write"),
    "report-v1.2": ("report", "maps_v1.2", ".", 0, None),
    "report-run.d": ("report", "run.d", ".", 0, None),
    "report-md": ("report", "rep.md", ".", 2, "names a file"),
    "report-png": ("report", "rep.png", ".", 2, "names a file"),
    "report-is-a-file": ("report", "in/a.png", ".", 2, "existing file"),
    "train-dot-empty": ("train", ".", "empty", 0, None),
    "train-parent": ("train", "..", "in/sub", 2, "did not write"),
    "train-v1.2": ("train", "runs_v1.2", ".", 0, None),
    "train-json": ("train", "run.json", ".", 2, "names a file"),
    "demo-parent": ("demo", "..", "in/sub", 2, "did not write"),
    "demo-dot-busy": ("demo", ".", "in", 2, "did not write"),
    "demo-html": ("demo", "demo.html", ".", 2, "names a file"),
}


@pytest.mark.parametrize("case", FOLDER_NAMES)
def test_folder_names(tmp_path: Path, model: Path, case: str) -> None:
    inp, _ = _world(tmp_path)
    (tmp_path / "empty").mkdir()
    command, out, cwd, code, needle = FOLDER_NAMES[case]
    before = tree_state(tmp_path)
    res = run_inprocess(_argv(command, out, model, inp), cwd=tmp_path / cwd)
    if code:
        assert_one_line(res, code, needle=needle)
        assert "--output" in res.stderr
        assert tree_state(tmp_path) == before
        return
    assert res.code == 0, res.stderr
    target = (tmp_path / cwd / out).resolve()
    check_contained(before, tree_state(tmp_path), tmp_path, [target])
    assert (target / WRITES[command]).is_file()


def test_reruns_replace_only_vitscope_files(tmp_path: Path, model: Path) -> None:
    """A report re-run over its own folder replaces its files; once the user edits one, it is theirs."""
    inp, out = _world(tmp_path)
    assert run_inprocess(_argv("report", str(out), model, inp)).code == 0
    again = run_inprocess(_argv("report", str(out), model, inp))
    assert again.code == 0, again.stderr
    (out / "report.md").write_text("my edited report")
    before = tree_state(tmp_path)
    for extra in ([], ["--overwrite"]):
        res = run_inprocess([*_argv("report", str(out), model, inp), *extra])
        assert_one_line(res, needle="report.md")
        assert tree_state(tmp_path) == before


@pytest.mark.parametrize(("option", "value"), [("--images", "-1"), ("--localisation", "-1"), ("--samples", "0")])
def test_report_counts_name_their_option(tmp_path: Path, model: Path, option: str, value: str) -> None:
    before = tree_state(tmp_path)
    res = run_inprocess(["report", str(model), "-o", str(tmp_path / "r"), option, value])
    assert_one_line(res, needle=option)
    assert tree_state(tmp_path) == before


def _is_temp_name(name: str) -> bool:
    from vitscope._io import is_temp_name

    return is_temp_name(name)


_NAME = st.text(alphabet="abcXYZ019._- é~", min_size=1, max_size=24).filter(
    lambda n: n not in (".", "..") and n == n.strip())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.one_of(_NAME, _NAME.map(lambda n: f".{n}.part"), _NAME.map(lambda n: f".{n}.vitscope-tmp"))
                      .filter(lambda n: not _is_temp_name(n)),  # that exact pattern is vitscope's by definition
                      min_size=1, max_size=4, unique=True))
def test_generated_user_names_are_refused_and_never_cleaned(model: Path, names: list[str]) -> None:
    """Any name of the user's in -o: report refuses the folder (one line, nothing changed), and the cleanup of
    temporary files removes only what `atomic_path` made (a real leftover), never one of the user's files."""
    from vitscope._io import atomic_path, remove_temp_files

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        out.mkdir()
        for i, name in enumerate(names):
            (out / name).write_text(f"user {i}")
        before = tree_state(root)
        res = _report(out, model)
        assert_one_line(res, needle="--output")
        assert tree_state(root) == before
        with pytest.raises(KeyboardInterrupt), atomic_path(out / "x.cls.npz") as temp:  # a write cut short...
            temp.write_bytes(b"partial")
            leftover = temp.name
            raise KeyboardInterrupt
        (out / leftover).write_bytes(b"partial")  # ...whose file a SIGKILL would have left
        assert remove_temp_files(out) == 1
        assert tree_state(root) == before
