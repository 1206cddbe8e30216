"""``vitscope <command> --help`` in a command-line user's words: no Python types (``<bool>`` on a flag reads as if
it took a value, ``<list[Path]>``, ``{image}``), and no default in the help text that contradicts the code's.

Every subcommand's help is rendered through `vitscope.cli.run` (what the console script runs), wide enough that
no token is wrapped.
"""

from __future__ import annotations

import re

import pytest

from vitscope.cli import _command, run

COMMANDS = sorted(_command().commands)
#: what typer shows for Python types, or click-style braces around an argument
PYTHON_TYPES = re.compile(r"<(bool|str|int|float|path|list\[[^>]*)>|list\[|Path\]|\{")
#: a default stated in an option's own help text: "(default: cpu)", "(default 100)"
STATED_DEFAULT = re.compile(r"\(default:? ([^);,]+)")


def _help(command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("TERMINAL_WIDTH", "250")
    assert run([command, "--help"] if command else ["--help"]) == 0
    return capsys.readouterr().out


def test_root_help_shows_no_python_types(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = _help("", capsys, monkeypatch)
    assert "--version" in text and not PYTHON_TYPES.findall(text), text


def test_every_command_is_covered() -> None:
    assert {"info", "capture", "maps", "figure", "view", "serve", "batch", "train", "report", "demo",
            "methods"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_python_types(command: str, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    text = _help(command, capsys, monkeypatch)
    assert f"Usage: vitscope {command}" in text
    assert not PYTHON_TYPES.findall(text), (PYTHON_TYPES.findall(text), text)
    params = _command().commands[command].params
    for p in params:
        if p.param_type_name == "argument":  # IMAGE / IMAGES... / [MODEL] in the usage line
            shown = p.name.upper() + ("..." if p.nargs != 1 else "")
            assert (shown if p.required else f"[{shown}]") in text.splitlines()[1], (shown, text)


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_value_and_lists_show_dots(command: str, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    text = _help(command, capsys, monkeypatch)
    for line in text.splitlines():
        for p in _command().commands[command].params:
            long = next((o for o in getattr(p, "opts", []) if o.startswith("--")), None)
            if long is None or not re.search(rf"│\s*{re.escape(long)}\s", line):
                continue
            if getattr(p, "is_flag", False):  # "--random-weights   <help>": nothing between option and help
                after = line.split(long, 1)[1]
                assert not re.match(r"\s+(?:--no-\S+\s+)?(?:[A-Z]{2,}|<)", after), line
    if command in ("capture", "figure"):
        assert "PATH..." in text  # IMAGES: a list of paths


@pytest.mark.parametrize("command", COMMANDS)
def test_no_stated_default_contradicts_the_code(command: str) -> None:
    """An option's help text that states a default agrees with the value the code uses (typer shows the
    code's as ``[default: ...]``); a choice option's default is one of the choices it lists."""
    for p in _command().commands[command].params:
        stated = STATED_DEFAULT.search(p.help or "")
        if stated and p.default is not None and not isinstance(p.default, bool):
            assert stated.group(1).strip() == str(p.default), (command, p.name, p.help, p.default)
        choices = p.metavar if isinstance(p.metavar, str) and "|" in p.metavar else None
        if choices and p.default is not None:
            assert str(p.default) in choices.split("|"), (command, p.name, choices, p.default)


@pytest.mark.parametrize("command", ["capture", "maps", "figure", "view", "serve", "batch"])
def test_device_lists_its_choices_and_true_default(command: str, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    text = _help(command, capsys, monkeypatch)
    line = next(ln for ln in text.splitlines() if "--device" in ln)
    assert "auto|cpu|cuda|mps" in line
    device = next(p for p in _command().commands[command].params if p.name == "device")
    block = text[text.index("--device"):].split("│ --", 1)[0]
    assert f"[default: {device.default}]" in block and device.default in ("cpu", "auto"), block


def test_the_check_fails_on_typer_types() -> None:
    """The patterns catch what typer printed before (`vitscope figure --help` of the old CLI)."""
    old = "│ --random-weights  <bool>  timm:<name> ...\n│ *  images...  <list[Path]>\nUsage: vitscope maps {image}"
    assert len(PYTHON_TYPES.findall(old)) >= 3
