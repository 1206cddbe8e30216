"""Every CLI error's advice is for a command-line user: it names ``--options``, never Python call syntax.

The library writes a fix that names another argument as ```name=value``` (`vitscope.errors.ARGUMENT_IN_FIX`);
the command renders it as its own option (``--checkpoint FILE``, ``--random-weights``, ``--target <class
index>``). One table drives every error path found (the cases of tests/test_cli_errors.py and the hostile-value
catalogue of tests/hostile/test_cli_values.py, one or two values per option, plus the weight and method advice
below) through `vitscope.cli.run`, and two of them through the installed console script; each stderr line must
hold no Python syntax (``name=value``, a call ``f(``, ``True``/``False``/``None``) and, where it starts with an
input's name, that name must be the command's option, not the library's argument.

On the code before this change the timm offline advice (``checkpoint='path/to/model.safetensors' (with
pretrained=False)``) and the gradient methods' target advice (``target=<class index> or a callable
target(output)``) fail here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tiny_vit
from tests.hostile.harness import Result, run_inprocess, run_script
from tests.hostile.test_cli_values import BASE, SETS, TABLE
from tests.test_cli_errors import IN_PROCESS_CASES, SUBPROCESS_CASES
from vitscope.models.vit import save_vit

#: Python syntax a command-line user cannot type. ``--set KEY=VALUE`` (train's own syntax) is taken out first.
PYTHON_SYNTAX = {
    "name=value": re.compile(r"\b[A-Za-z_]\w*=(?!=)\S"),
    "a call": re.compile(r"\b[A-Za-z_][\w.]*\((?!s\))"),  # f(...), but "image(s)" is English
    "a Python constant": re.compile(r"\b(True|False|None)\b"),
}
SET_OPTION = re.compile(r"--set \S+")

#: the weight and method advice: (argv, what the line must name). {backbone}: a ViT without a classifier.
WEIGHT_CASES: list[tuple[list[str], list[str]]] = [
    (["info", "-m", "timm:vit_tiny_patch16_224"], ["--model", "offline", "--checkpoint", "--random-weights"]),
    (["maps", "{img}", "-m", "timm:vit_tiny_patch16_224"], ["--model", "--checkpoint", "--random-weights"]),
    (["info", "-m", "torchvision:vit_b_32"], ["--model", "offline", "--checkpoint", "--random-weights"]),
    (["info", "-m", "timm:vit_tiny_patch16_224", "--random-weights", "--checkpoint", "{root}/w.safetensors"],
     ["--random-weights", "--checkpoint"]),
    (["info", "-m", "vitscope:shapes", "--random-weights"], ["--random-weights: only applies"]),
    (["info", "-m", "timm:vit_tiny_patch16_224", "--checkpoint", "{root}/missing.safetensors"], ["--checkpoint"]),
    (["info", "-m", "torchvision:vit_b_32", "--checkpoint", "{root}/afile"], ["--checkpoint"]),
    (["info", "-m", "{model}", "--checkpoint", "{root}/w.safetensors"], ["--checkpoint: only applies", "--model"]),
    (["info", "-m", "open_clip:ViT-B-3", "--random-weights"], ["--model", "did you mean"]),
    (["info", "-m", "timm:vit_tiny_patch16_22"], ["--model", "did you mean"]),
    (["info", "-m", "timm:convnext_atto", "--random-weights"], ["--model", "not a ViT"]),
    (["info", "-m", "bogus:thing"], ["--model", "unknown scheme"]),
    (["maps", "{img}", "-m", "{backbone}", "--method", "attn_gradcam"], ["--target"]),
    (["maps", "{img}", "-m", "{backbone}", "--method", "chefer"], ["--target"]),
    (["capture", "{img}", "-m", "{model}", "--size", "64", "--max-memory", "0.0001"],
     ["--layers -1", "--queries cls", "--heads mean", "--max-memory"]),
    (["figure", "bogus", "{img}", "-m", "{model}"], ["KIND"]),
    (["maps", "{img}", "-m", "torchvision:vit_b_32", "--random-weights", "--policy", "native"], ["--policy resize"]),
]

#: one or two hostile values per (command, option) of the catalogue, and its --set fields
HOSTILE_CASES = [([cmd, *BASE[cmd], opt, value], [opt]) for cmd, opt, values in TABLE for value in values[:2]]
HOSTILE_CASES += [([*["train", *BASE["train"]], "--set", item], ["--set"]) for item in SETS]

ERROR_CASES = [(args, [needle]) for args, needle in [*SUBPROCESS_CASES, *IN_PROCESS_CASES]]
CASES = [pytest.param(args, needles, id=" ".join(args)[:80]) for args, needles in
         [*WEIGHT_CASES, *ERROR_CASES, *HOSTILE_CASES]]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("advice")
    inputs = root / "in"
    inputs.mkdir()
    img = inputs / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(img)
    (root / "out").mkdir()
    (root / "existing.npz").mkdir()
    (root / "existing.html").mkdir()
    (root / "afile").write_text("x")
    import transformers

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8)
    transformers.ViTModel(cfg).eval().save_pretrained(root / "backbone")  # no classifier: no class to take
    return {"root": root, "img": img, "inputs": inputs, "out": root / "out",
            "model": save_vit(make_tiny_vit(), root / "tiny"), "backbone": root / "backbone"}


@pytest.fixture(autouse=True)
def _offline_and_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """No download is tried (the hub and download.pytorch.org are unreachable, as on an offline machine), and a
    case wrongly accepted fails at once instead of training, reporting or serving."""
    from huggingface_hub import constants

    import vitscope.adapters._hub
    import vitscope.train.loop
    import vitscope.train.report
    import vitscope.viewer.server

    def accepted(*args: object, **kwargs: object) -> None:
        raise AssertionError("the case was accepted")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(vitscope.adapters._hub, "unreachable", lambda *a, **k: "offline (test)", raising=False)
    monkeypatch.setattr(vitscope.train.loop, "train", accepted)
    monkeypatch.setattr(vitscope.train.report, "model_report", accepted)
    monkeypatch.setattr(vitscope.viewer.server.ThreadingHTTPServer, "serve_forever", accepted)


def python_syntax(line: str) -> list[str]:
    """What in ``line`` is Python syntax: ``[]`` for a line a command-line user can follow."""
    text = SET_OPTION.sub("--set", line)
    return [f"{what}: {m.group(0)!r}" for what, rx in PYTHON_SYNTAX.items() for m in rx.finditer(text)]


def library_name_as_head(argv: list[str], line: str) -> str | None:
    """The line starts with an input's library name (``checkpoint:``, ``max_bytes:``) where the command has an
    option for it: that name, else None."""
    from vitscope.cli import _CARRIED_BY, _command

    head = line.removeprefix("error: ").split(": ", 1)[0]
    if not re.fullmatch(r"[a-z_]+", head):
        return None  # an --option, an ARGUMENT, a path, or a sentence
    command = _command().commands.get(argv[0])
    names = {p.name for p in command.params} if command is not None else set()
    carried = {**_CARRIED_BY["*"], **_CARRIED_BY.get(argv[0], {})}
    return head if head in names or carried.get(head) in names else None


def check(res: Result, argv: list[str], needles: list[str]) -> None:
    assert "Traceback" not in res.stderr, res.stderr
    notes = [ln for ln in res.lines() if ln.startswith("note: ")]  # said before the failure (random weights)
    lines = [ln for ln in res.lines() if ln not in notes]
    assert res.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (res.code, res.stderr)
    assert not any(python_syntax(note) for note in notes), notes
    line = lines[0]
    assert not python_syntax(line), f"Python advice on the command line: {python_syntax(line)} in {line}"
    assert library_name_as_head(argv, line) is None, f"names the library's argument, not the option: {line}"
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.parametrize(("args", "needles"), CASES)
def test_cli_error_advice_names_options_not_python(args: list[str], needles: list[str],
                                                   work: dict[str, Path]) -> None:
    argv = [a.format(**work) for a in args]
    check(run_inprocess(argv, cwd=work["root"]), argv, needles)


@pytest.mark.parametrize(("args", "needles"), [
    (["info", "-m", "timm:vit_tiny_patch16_224"], ["--checkpoint", "--random-weights"]),  # HF_HUB_OFFLINE=1
    (["maps", "{img}", "-m", "{backbone}", "--method", "grad_rollout", "-o", "{out}/m.npz"], ["--target"]),
])
def test_through_the_console_script(args: list[str], needles: list[str], work: dict[str, Path]) -> None:
    argv = [a.format(**work) for a in args]
    check(run_script(argv, cwd=work["root"]), argv, needles)


@pytest.mark.parametrize(("line", "bad"), [
    ("error: --model: offline (pass checkpoint='path/to/model.safetensors' (with pretrained=False))", True),
    ("error: target: no classifier (pass target=<class index> or a callable target(output) -> scores)", True),
    ("error: --model: offline (pass --checkpoint path/to/model.safetensors, or --random-weights)", False),
    ("error: --set depth: must be positive (pass e.g. --set depth=6)", False),
    ("error: --size: 0 is not a positive size (1 image(s))", False),
    ("error: capture: too large (ask for less: layers=[-1], heads='mean')", True),
    ("error: --tau: wrong (use None)", True),
])
def test_the_syntax_check_can_fail(line: str, bad: bool) -> None:
    """The check itself: today's bad advice is caught, a CLI line passes."""
    assert bool(python_syntax(line)) is bad, python_syntax(line)
