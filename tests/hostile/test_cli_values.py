"""The hostile-input catalogue: the CLI's option values.

Every command x every numeric or choice option x hostile values (inf, -inf, nan, -1, 0, 1e309, huge ints, empty,
non-ASCII, very long): exit 2, one stderr line that names the option, no traceback, and nothing written (the
whole work folder is hashed before and after). Values are checked before a model is loaded where they can be;
the few that need the model (a layer index) use the tiny one. A stray success can never hang or train: the
server's loop, training and the report are replaced by a function that fails the case.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import make_tiny_vit
from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, run_script, tree_state
from vitscope.models.vit import save_vit

HUGE = "9" * 30  # an int past every 64-bit field
LONG = "7" * 400  # a 400-digit number: inf as a float, too large as anything else
ODD = "é"  # non-ASCII

#: values no positive-size option (MB, GB, megapixels) may take
SIZE_VALUES = ["inf", "-inf", "nan", "-1", "0", "1e309", "-1e309", "1e-300", "", ODD, LONG]
#: values no count (>= 1) may take
COUNT_VALUES = ["-1", "0", HUGE, "", ODD, "1.5", "nan", "inf"]
#: values no name (a choice) may take
NAME_VALUES = ["bogus", "", ODD, "x" * 5000]

#: command -> the arguments that make it run (before its hostile option)
BASE = {
    "capture": ["{img}", "-m", "{model}", "-o", "{out}/a.npz"],
    "maps": ["{img}", "-m", "{model}", "-o", "{out}/m.npz"],
    "figure": ["heads", "{img}", "-m", "{model}", "-o", "{out}/f.png"],
    "view": ["{img}", "-m", "{model}", "-o", "{out}/v.html"],
    "serve": ["-m", "{model}"],
    "train": ["-o", "{out}/run"],
    "report": ["{model}", "-o", "{out}/report"],
    "batch": ["{inputs}", "-o", "{out}/batch", "-m", "{model}", "-q"],
}

#: (command, option, values): every value is refused, naming the option
TABLE: list[tuple[str, str, list[str]]] = [
    # the limits: finite and positive (`inf` used to be an OverflowError traceback)
    *[(cmd, "--max-pixels", SIZE_VALUES) for cmd in ("capture", "maps", "figure", "view", "batch")],
    *[(cmd, "--max-memory", SIZE_VALUES) for cmd in ("capture", "maps", "figure", "view", "batch")],
    ("figure", "--max-figure-pixels", SIZE_VALUES),
    ("view", "--budget-mb", SIZE_VALUES),
    ("view", "--target", ["-1", HUGE, "", ODD, "1.5", "text:a cat", "patch:9,9"]),
    ("view", "--prompt", ["a cat", ""]),
    ("serve", "--max-upload-mb", SIZE_VALUES),
    *[(cmd, "--max-tokens", ["-1", "0", "", ODD, "1.5", "inf", "9" * 400]) for cmd in ("capture", "maps", "view",
                                                                                         "batch")],
    # sizes and layers
    *[(cmd, "--size", ["0", "-5", HUGE, "1x2x3", "12xx", ODD, "nan", "inf"]) for cmd in ("capture", "maps", "view")],
    ("capture", "--layers", ["99", "-99", HUGE, "a:b", ODD, "1.5"]),
    *[(cmd, "--layer", ["99", "-99", HUGE, "", ODD, "nan"]) for cmd in ("maps", "figure")],
    # choices
    *[(cmd, "--policy", NAME_VALUES) for cmd in ("capture", "maps", "figure", "view", "batch")],
    ("capture", "--queries", NAME_VALUES),
    ("capture", "--heads", NAME_VALUES),
    ("maps", "--upsample", NAME_VALUES),
    ("maps", "--method", NAME_VALUES),
    ("maps", "--head", ["bogus", ODD, "99", HUGE]),
    ("maps", "--query", ["bogus", ODD, "register:99", "1e309,1", "99,99"]),
    ("figure", "--method", NAME_VALUES),
    ("figure", "--query", ["bogus", "99,99"]),
    ("capture", "--device", ["bogus", ODD]),
    ("train", "--device", ["bogus", ODD, "meta"]),
    ("train", "--preset", NAME_VALUES),
    # other numbers
    ("maps", "--tau", ["nan", "inf", "-inf", "-1", "0", "2", "1e309", "", ODD]),
    ("maps", "--target", ["-1", HUGE, "", ODD, "1.5", "text:a cat", "image:", "patch:x"]),
    ("figure", "--alpha", ["nan", "inf", "-1", "2", ODD]),
    ("figure", "--tau", ["nan", "-1", "2"]),
    ("figure", "--dpi", ["0", "-1", "5000", HUGE, "nan"]),
    ("serve", "--port", ["-1", "70000", HUGE, ODD, "nan"]),
    ("train", "--lr", ["nan", "inf", "-inf", "-1", "0", "1e309", ODD]),
    ("train", "--threads", COUNT_VALUES),
    ("train", "--epochs", COUNT_VALUES),
    ("train", "--max-steps", ["-5", *COUNT_VALUES]),
    ("train", "--batch-size", COUNT_VALUES),
    ("train", "--seed", ["-1", HUGE, "", ODD, "nan"]),
    ("report", "--images", ["-1", "0", HUGE, ODD]),
    ("report", "--localisation", ["-1", HUGE, ODD]),
    ("report", "--samples", ["-1", "0", HUGE, ODD]),
    ("report", "--seed", ["-1", HUGE]),
    ("batch", "--batch-size", ["0", "-1", "", ODD]),
    ("batch", "--workers", ["-1", "", ODD]),
    ("batch", "--format", NAME_VALUES),
    ("batch", "--size", ["0", "-5", HUGE, ODD]),
]

#: ``--set KEY=VALUE`` of train: the field, then the option named in the line
SETS = ["depth=abc", "depth=-3", "dim=1.5", "heads=0", "lr=nan", "lr=inf", "lr=-1", "image_size=abc",
        "image_size=[16]", "image_size=[16,\"a\"]", "dropout=2", "crop_scale=[0,1]", "max_steps=-5",
        "epochs=" + HUGE, "augment=maybe", "=5", "nokey", "bogus_field=1", "seed=-1", "device=bogus"]

CASES = [pytest.param(cmd, [opt, value], opt, id=f"{cmd} {opt} {value[:20]!r}")
         for cmd, opt, values in TABLE for value in values]
CASES += [pytest.param("train", ["--set", item], "--set", id=f"train --set {item[:30]!r}") for item in SETS]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("values")
    inputs = root / "in"
    inputs.mkdir()
    img = inputs / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(img)
    model = save_vit(make_tiny_vit(), root / "tiny")
    (root / "out").mkdir()
    (root / "out" / "notes.txt").write_text("the user's file")
    return {"root": root, "img": img, "model": model, "inputs": inputs, "out": root / "out"}


@pytest.fixture(autouse=True)
def _no_long_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value wrongly accepted fails its case at once instead of training, reporting or serving forever."""
    import vitscope.train.loop
    import vitscope.train.report
    import vitscope.viewer.server

    def accepted(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hostile value was accepted")

    monkeypatch.setattr(vitscope.train.loop, "train", accepted)
    monkeypatch.setattr(vitscope.train.report, "model_report", accepted)
    monkeypatch.setattr(vitscope.viewer.server.ThreadingHTTPServer, "serve_forever", accepted)


def _argv(cmd: str, tail: list[str], work: dict[str, Path]) -> list[str]:
    return [cmd, *[a.format(**work) for a in BASE[cmd]], *tail]


@pytest.mark.parametrize(("cmd", "tail", "option"), CASES)
def test_hostile_option_value_is_one_line_naming_it(cmd: str, tail: list[str], option: str,
                                                    work: dict[str, Path]) -> None:
    before = tree_state(work["root"])
    res = run_inprocess(_argv(cmd, tail, work), cwd=work["root"])
    assert_one_line(res, 2, needle=option)
    check_contained(before, tree_state(work["root"]), work["root"], outputs=[])


SCRIPT_CASES = [
    ("capture", ["--max-pixels", "inf"], "--max-pixels"),
    ("train", ["--set", "depth=abc"], "--set depth"),
    ("serve", ["--max-upload-mb", "nan"], "--max-upload-mb"),
]


@pytest.mark.parametrize(("cmd", "tail", "option"), SCRIPT_CASES)
def test_through_the_console_script(cmd: str, tail: list[str], option: str, work: dict[str, Path]) -> None:
    before = tree_state(work["root"])
    assert_one_line(run_script(_argv(cmd, tail, work), cwd=work["root"]), 2, needle=option)
    check_contained(before, tree_state(work["root"]), work["root"], outputs=[])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from([("capture", "--max-pixels"), ("capture", "--max-memory"), ("view", "--budget-mb"),
                               ("figure", "--max-figure-pixels"), ("serve", "--max-upload-mb")]),
       value=st.floats(max_value=0.0) | st.sampled_from([math.inf, 1e-300, 5e-324]) | st.floats(min_value=1e308))
def test_any_non_positive_or_infinite_size_is_refused(option: tuple[str, str], value: float,
                                                      work: dict[str, Path]) -> None:
    cmd, opt = option
    res = run_inprocess(_argv(cmd, [opt, repr(value)], work), cwd=work["root"])
    assert_one_line(res, 2, needle=opt)


@pytest.mark.parametrize("name", ["max_pixels", "max_tokens", "max_bytes", "max_figure_pixels"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 0, -1, 0.5, True, "5"])
def test_library_limits_refuse_what_no_limit_can_be(name: str, value: object) -> None:
    from vitscope.errors import VitscopeError
    from vitscope.limits import limits

    with pytest.raises(VitscopeError) as err, limits(**{name: value}):  # type: ignore[arg-type]
        pass
    assert err.value.argument == name


@pytest.mark.parametrize(("value", "expected"), [(2.9, 2), (np.int64(7), 7), (10**40, 10**40)])
def test_library_limits_take_any_positive_number(value: object, expected: int) -> None:
    from vitscope import limits as lim

    with lim.limits(max_tokens=value):  # type: ignore[arg-type]
        assert lim.max_tokens() == expected
    assert lim.max_tokens() == lim.MAX_TOKENS
