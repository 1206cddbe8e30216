"""Containment: vitscope deletes or overwrites only files it wrote itself, inside the ``-o`` it was given.

The four data-loss cases of issue #16 first (each failed before the fix), then one generated table of hostile
output folders and inputs, each run in-process with the whole tmp tree hashed before and after.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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


def test_batch_rerun_keeps_users_part_files(tmp_path: Path, model: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    _image(inp / "a.png", 1)
    assert _batch(inp, out, model).code == 0
    ours = tree_state(tmp_path)
    (out / ".my-notes.part").write_text("notes")
    (out / "sub").mkdir()
    (out / "sub" / ".a.cls.npz.abc123.part").write_text("looks like an old temp file, is the user's")
    before = _users(tree_state(tmp_path), ours, out.name)
    res = _batch(inp, out, model, "--overwrite")
    assert res.code == 0, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [out])
    assert (out / ".my-notes.part").read_text() == "notes"
