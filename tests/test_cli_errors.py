"""The installed ``vitscope`` console script: every usage error, bad value and I/O problem is one line on stderr
and exit code 2; Ctrl-C is exit 130 with what was saved and how to resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tiny_vit
from vitscope.models.vit import save_vit

SCRIPT = Path(sys.executable).parent / "vitscope"  # the venv's console script, not `python -m`
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def one_line(res: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    img = root / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(img)
    model = save_vit(make_tiny_vit(), root / "tiny")
    (root / "existing.npz").mkdir()
    (root / "existing.html").mkdir()
    (root / "afile").write_text("x")
    return {"root": root, "img": img, "model": model}


def test_console_script_is_installed() -> None:
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)


#: The acceptance cases, run through the installed console script (each start imports torch: a few seconds).
SUBPROCESS_CASES = [
    ([], "no command given"),
    (["foo"], "No such command 'foo'"),
    (["view"], "Missing argument 'image'"),
    (["maps", "{img}", "--bogus"], "No such option: --bogus"),
    (["maps", "{img}", "--layer", "abc"], "'--layer'"),
    (["capture", "{img}", "-m", "{model}", "-o", "{root}/existing.npz"], "is an existing folder"),
    (["serve", "--port", "70000"], "--port: 70000 is not a port number"),
]

#: The rest of the issue's list, through the same entry point in-process (`vitscope.cli.run`).
IN_PROCESS_CASES = [
    (["view", "{img}", "-m", "{model}", "-o", "{root}/existing.html"], "is an existing folder"),
    (["maps", "{img}", "-m", "{model}", "-o", "{img}/x.npz"], "is a file, so"),
    (["maps", "{img}", "-m", "{model}", "-o", "{root}/afile"], "is an existing file, not a folder"),
    (["batch", "{root}", "-m", "{model}", "-o", "{root}/afile"], "is an existing file, not a folder"),
    (["batch", "{root}", "-m", "{model}", "-o", "{root}/new", "--layer", "99"], "layer: layer 99 out of range"),
    (["batch", "{root}", "-m", "{model}", "-o", "{root}/new", "--masks", "{root}/nomasks"], "masks: not a folder"),
    (["batch", "{root}", "-m", "{model}", "-o", "{root}/new", "--masks", "{root}", "--policy", "crop"],
     "masks: masks need the whole image"),
    (["figure", "heads", "{img}", "-m", "{model}", "--dpi", "0"], "--dpi"),
    (["figure", "heads", "{img}", "-m", "{model}", "--dpi", "5000"], "--dpi"),
    (["capture", "{img}", "-m", "{model}", "--size", "0"], "--size"),
    (["capture", "{img}", "-m", "{model}", "--size", "-5"], "--size"),
    (["capture", "{img}", "-m", "vitscope:shapes", "--size", "1024", "--queries", "cls", "--heads", "mean",
      "--layers", "-1"], "token limit"),
    (["capture", "{img}", "-m", "vitscope:shapes", "--size", "8192"], "token limit"),
    (["capture", "{img}", "-m", "{model}", "--size", "64", "--max-memory", "0.0001"], "--max-memory"),
    (["info", "-m", "timm:convnext_atto", "--random-weights"], "is not a ViT"),
    (["info", "-m", "timm:vit_tiny_patch16_224"], "offline"),  # pretrained by default; no hub here
    (["info", "-m", "{model}", "--checkpoint", "{root}/w.safetensors"], "--checkpoint: only applies to timm"),
    (["capture", "{root}/missing.png", "-m", "{model}"], "image: file not found"),
    (["capture", "{img}", "-m", "{model}", "--policy", "squash"], "--policy: unknown value"),
    (["capture", "{img}", "-m", "{model}", "-o", "{root}/x.gif"], "unsupported file type"),
    (["report", "-o", "{root}/rep.md"], "writes a folder"),
]


@pytest.mark.parametrize(("args", "needle"), SUBPROCESS_CASES)
def test_console_script_usage_errors_are_one_line_exit_2(args: list[str], needle: str,
                                                         files: dict[str, Path]) -> None:
    line = one_line(cli(*[a.format(**files) for a in args]))
    assert needle in line and line.startswith("error: "), line


@pytest.mark.parametrize(("args", "needle"), IN_PROCESS_CASES)
def test_usage_errors_are_one_line_exit_2(args: list[str], needle: str, files: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from vitscope.cli import run

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = run([a.format(**files) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and lines[0].startswith("error: "), lines[0]


def test_wrong_output_is_refused_before_computing(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import vitscope
    from vitscope.cli import run

    def no(*a: object, **k: object) -> None:
        raise AssertionError("computed before refusing the output")

    monkeypatch.setattr(vitscope, "capture", no)
    monkeypatch.setattr(vitscope, "load", no)
    out = files["root"] / "existing.npz"
    assert run(["capture", str(files["img"]), "-m", str(files["model"]), "-o", str(out)]) == 2
    assert not list(out.iterdir())


def test_unreadable_or_broken_input(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscope.cli import run

    broken = tmp_path / "broken.png"
    broken.write_bytes(files["img"].read_bytes()[:60])
    assert run(["capture", str(broken), "-m", str(files["model"]), "-o", str(tmp_path / "a.npz")]) == 2
    assert "cannot read" in capsys.readouterr().err
    locked = tmp_path / "locked.png"
    locked.write_bytes(files["img"].read_bytes())
    locked.chmod(0)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert run(["capture", str(locked), "-m", str(files["model"]), "-o", str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err
    assert "locked.png" in err and ("not readable" in err or "permission denied" in err) and err.count("\n") == 1
    assert not (tmp_path / "b.npz").exists()
    from vitscope.errors import ImageError
    from vitscope.images import load_image

    with pytest.raises(ImageError, match=r"cannot read .*permission denied"):
        load_image(locked)


def test_port_in_use_is_one_line(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from vitscope.cli import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert run(["serve", "--port", str(port), "-m", str(files["model"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --port: port") and "already in use" in err and err.count("\n") == 1


def test_random_weights_are_said_and_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    from vitscope.cli import run

    assert run(["info", "-m", "timm:vit_tiny_patch16_224", "--random-weights", "--json"]) == 0
    res = capsys.readouterr()
    assert "random weights" in res.err
    info = json.loads(res.out)
    assert info["num_layers"] == 12 and info["num_heads"] == 3 and info["prefix"] == ["cls"]
    assert info["patch_size"] == [16, 16]


def test_timm_checkpoint_loads_fine_tuned_weights(tmp_path: Path, files: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    import vitscope

    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    torch.nn.init.constant_(model.head.bias, 0.25)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ft.safetensors"))
    from vitscope.cli import run

    assert run(["capture", str(files["img"]), "-m", "timm:vit_tiny_patch16_224", "--checkpoint",
                str(tmp_path / "ft.safetensors"), "-o", str(tmp_path / "out"), "--layers", "-1",
                "--queries", "cls", "--size", "32"]) == 0
    saved = vitscope.Attentions.load(tmp_path / "out" / "cat.capture.npz")  # -o without suffix: a folder
    vit = vitscope.load("timm:vit_tiny_patch16_224", checkpoint=tmp_path / "ft.safetensors")
    ref = vitscope.capture(vit, files["img"], layers=[-1], queries="cls", size=32)
    torch.testing.assert_close(saved.weights, ref.weights, atol=1e-5, rtol=0)


def _wait_for(pred, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _ok_lines(manifest: Path) -> list[str]:
    if not manifest.exists():
        return []
    return [json.loads(ln)["rel"] for ln in manifest.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("status") == "ok"]


def test_sigint_to_batch_says_how_to_resume_and_resume_completes_each_once(tmp_path: Path,
                                                                            files: dict[str, Path]) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / f"im{i:02d}.png")
    argv = [str(SCRIPT), "batch", str(src), "-o", str(out), "-m", str(files["model"]), "--method", "rollout",
            "--batch-size", "1", "--workers", "0", "-q"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(lambda: len(_ok_lines(out / "manifest.jsonl")) >= 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # pragma: no cover - finished before the signal landed
        pytest.skip("the batch finished before Ctrl-C")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "run the same command again to resume" in err
    done = len(_ok_lines(out / "manifest.jsonl"))
    assert f"{done} image(s) saved" in err and 0 < done < 16
    res = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{done} skipped" in res.stdout
    ok = Counter(_ok_lines(out / "manifest.jsonl"))
    assert len(ok) == 16 and set(ok.values()) == {1}  # every image exactly once over both runs
    assert len(list(out.glob("*.rollout.npz"))) == 16 and not list(out.rglob("*.part"))


def test_sigint_to_train_and_serve(tmp_path: Path, files: dict[str, Path]) -> None:
    run = tmp_path / "run"
    sets = ["--set", "image_size=[16,16]", "--set", "depth=1", "--set", "dim=16", "--set", "heads=2",
            "--set", "train_size=64", "--set", "val_size=8", "--set", "batch_size=8", "--set", "val_every=1000",
            "--set", "checkpoint_every=1"]
    proc = subprocess.Popen([str(SCRIPT), "train", "-o", str(run), "--epochs", "100000", "--no-progress", *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(lambda: (run / "checkpoints" / "last" / "trainer_state.pt").exists() or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    text = out + err
    assert "interrupted" in text and "--resume" in text and "no final model yet" in text
    assert "Traceback" not in text and "finished" not in text
    assert not (run / "model.safetensors").exists()

    srv = subprocess.Popen([str(SCRIPT), "serve", "-m", str(files["model"])], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ENV)
    assert srv.stdout is not None
    line = srv.stdout.readline()
    assert "vitscope viewer at http://127.0.0.1:" in line
    srv.send_signal(signal.SIGINT)
    _, err = srv.communicate(timeout=30)
    assert srv.returncode == 130 and err.strip() == "interrupted"


@pytest.mark.parametrize("where", ["vitscope.load", "vitscope.capture"])
def test_ctrl_c_in_any_command_is_exit_130(where: str, files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscope.cli import run

    def interrupt(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    code = run(["capture", str(files["img"]), "-m", str(files["model"]), "-o", str(tmp_path / "a.npz")])
    assert code == 130 and capsys.readouterr().err.strip() == "interrupted"
    assert not (tmp_path / "a.npz").exists()


def test_an_unknown_exception_is_one_internal_error_line_exit_1(files: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in vitscope: one line that says so, exit 1 (not 2: the hostile catalogue must still catch it);
    VITSCOPE_DEBUG=1 adds the traceback."""
    from vitscope.cli import run

    def bug(*a: object, **k: object) -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr("vitscope.load", bug)
    argv = ["capture", str(files["img"]), "-m", str(files["model"]), "-o", str(tmp_path / "a.npz")]
    monkeypatch.delenv("VITSCOPE_DEBUG", raising=False)
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert err == ("error: internal error: ZeroDivisionError: division by zero second line (a bug in vitscope; "
                   "VITSCOPE_DEBUG=1 shows the traceback; please report it)\n")
    monkeypatch.setenv("VITSCOPE_DEBUG", "1")
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in bug" in err and err.rstrip().endswith("please report it)")


def test_a_swallowed_ctrl_c_still_ends_the_run_interrupted(files: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Reported: a Ctrl-C swallowed during an import left numpy half-imported, and the run went on to fail (or
    record every image as an error) and exit 0. The handler's flag survives the swallowing: exit 130."""
    from vitscope.cli import run

    def half_import(*a: object, **k: object) -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C inside an import that catches everything
            time.sleep(0.5)
        except BaseException:
            pass
        raise AttributeError("module 'numpy' has no attribute 'logical_or'")

    monkeypatch.setattr("vitscope.load", half_import)
    code = run(["capture", str(files["img"]), "-m", str(files["model"]), "-o", str(tmp_path / "a.npz")])
    assert code == 130 and capsys.readouterr().err == "interrupted\n"
    assert not (tmp_path / "a.npz").exists()


def test_a_ctrl_c_during_batch_is_never_recorded_as_an_image_error(files: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import vitscope.batch.local as local

    calls: list[int] = []
    real = local.preprocess_image

    def flaky(*a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # a Ctrl-C swallowed mid-import, then the image's load fails because of it
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            except BaseException:
                pass
            raise AttributeError("module 'numpy' has no attribute 'logical_or'")
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "preprocess_image", flaky)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(src / f"im{i}.png")
    with pytest.raises(KeyboardInterrupt):
        local.run_local(src, tmp_path / "out", model=files["model"], batch_size=1, workers=0, progress=False,
                        stats=False)
    lines = [json.loads(ln) for ln in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines() if ln.strip()]
    assert [e["status"] for e in lines] == ["ok"] * len(lines) and len(lines) <= 1
