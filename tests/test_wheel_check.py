"""The wheel check's plan (`.ci/wheel_smoke.py`, `.ci/wheel_check.py`), checked without making a venv: it covers
every subcommand of the CLI and every registered method, each extra loads some model family, and its judge
fails a step on the outputs an undeclared import gives (a traceback, "No module named", an internal error)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer

from vitscope.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_ci_{name}", ROOT / ".ci" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


smoke = _load("wheel_smoke")
check = _load("wheel_check")


def _cli_steps(steps: list[Any]) -> list[list[str]]:
    return [s.argv for s in steps if s.kind in ("cli", "serve") and not s.argv[0].startswith("-")]


def test_the_plan_runs_every_subcommand(tmp_path: Path) -> None:
    registered = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"maps", "report", "serve", "train"} <= registered  # the enumeration sees the app
    run = {argv[0] for argv in _cli_steps(smoke.plan(tmp_path))}
    assert run == registered


def test_the_plan_maps_every_registered_method_with_the_bundled_model(tmp_path: Path) -> None:
    import vitscope.methods.api  # noqa: F401  (registers every method)
    from vitscope.methods.registry import REGISTRY

    assert {"cls", "rollout", "flow", "chefer"} <= REGISTRY.keys()
    mapped = {argv[argv.index("--method") + 1] for argv in _cli_steps(smoke.plan(tmp_path))
              if argv[0] == "maps" and "--model" not in argv}
    assert mapped == set(REGISTRY)


def test_the_plan_draws_every_figure_kind(tmp_path: Path) -> None:
    from vitscope.viz.make import KINDS

    drawn = {argv[1] for argv in _cli_steps(smoke.plan(tmp_path)) if argv[0] == "figure"}
    assert drawn == set(KINDS)


def test_a_new_subcommand_without_a_smoke_step_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "registered_commands", list(app.registered_commands))
    app.command("zz-new")(lambda: None)
    steps = [s for s in smoke.plan(tmp_path) if s.covers == "command:zz-new"]
    assert len(steps) == 1
    why, _seconds, _tail = smoke.run_step(steps[0], tmp_path)
    assert "no smoke step" in why


def _requirement_names(extra: str) -> set[str]:
    import tomllib

    reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("-", "_") for r in reqs}


@pytest.mark.parametrize("extra", check.extras())
def test_each_extra_loads_a_family_and_its_hint_names_it(extra: str, tmp_path: Path) -> None:
    names = _requirement_names(extra)
    steps = smoke.plan(tmp_path, core=False, is_installed=lambda d: d.lower().replace("-", "_") in names)
    loaded = {s.covers for s in steps if not s.one_line_error and s.covers.startswith("family:")}
    assert loaded, f"vitscope[{extra}] loads no model family in the wheel check"
    for family in smoke.FAMILIES:  # a family whose packages this extra brings says to install this extra
        if all(d.replace("-", "_") in names for d in family.dists) and "vitscope[" in family.hint:
            assert family.hint.split("[")[1].split("]")[0] in check.extras()


def test_core_refuses_each_family_with_one_line(tmp_path: Path) -> None:
    steps = smoke.plan(tmp_path, is_installed=lambda d: False)
    refused = [s for s in steps if s.covers.startswith("family:")]
    assert {s.covers for s in refused} == {f"family:{f.name}" for f in smoke.FAMILIES}
    for step in refused:
        assert step.expect_rc == 2 and step.one_line_error and any("pip install" in e for e in step.expect)


@pytest.mark.parametrize(("rc", "out", "err", "failure"), [
    (0, "maps map 8x8\nwrote x.npz", "", ""),
    (1, "", "error: internal error: ModuleNotFoundError: No module named 'scipy' (a bug in vitscope; ...)",
     "exit 1"),
    (0, "wrote x.npz", "Traceback (most recent call last):\n  File ...", "Traceback"),
    (0, "wrote x.npz", "warning: No module named 'scipy', skipping", "No module named"),
    (0, "nothing", "", "lacks 'wrote'"),
])
def test_judge_fails_a_step_on_an_import_error(rc: int, out: str, err: str, failure: str) -> None:
    why = smoke.judge(smoke.Step("maps", ["maps"], expect=["wrote"]), rc, out, err)
    assert (failure in why) if failure else why == ""


def test_judge_wants_one_line_for_a_refused_family() -> None:
    step = smoke.Step("timm refused", ["info"], expect_rc=2, expect=["pip install 'vitscope[timm]'"],
                      one_line_error=True)
    line = "error: --model: this model family needs the timm package (pip install 'vitscope[timm]')"
    assert smoke.judge(step, 2, "", line + "\n") == ""
    assert "one line" in smoke.judge(step, 2, "", line + "\nmore\n")
    assert "lacks" in smoke.judge(step, 2, "", "error: --model: needs timm (pip install timm)\n")


def test_uv_is_told_pips_indexes(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ("global.extra-index-url='file:///a/simple file:///b/simple'\n:env:.find-links='/w'\n"
              "global.cert='/etc/x.crt'\nglobal.find-links='/w'\n")

    class Done:
        stdout = config

    monkeypatch.setattr(check.subprocess, "run", lambda *a, **k: Done())
    assert check.pip_sources() == ["--index", "file:///a/simple", "--index", "file:///b/simple", "--find-links",
                                   "/w", "--index-strategy", "unsafe-best-match"]


def test_ci_runs_the_wheel_check_after_the_test_command() -> None:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines.index("make wheel-check") > lines.index("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "wheel-check:" in makefile and ".ci/wheel_check.py" in makefile
    assert re.search(r"^uv==\S+$", (ROOT / "constraints.txt").read_text(), re.M)  # pinned, as pip installs it
    assert check.variants()[0] == "core" and "dev" not in check.variants()
