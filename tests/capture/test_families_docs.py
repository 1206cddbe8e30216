"""docs/models.md's table of tested families is generated from the family test table (tests/capture/families.py):
this test fails when a family is added to (or removed from) the tests without the docs following.

Regenerate the block with ``python -m tests.capture.test_families_docs`` and paste it between the markers.
"""

from __future__ import annotations

from pathlib import Path

from tests.capture.families import FAMILIES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "models.md"
START, END = "<!-- families:start -->", "<!-- families:end -->"
_SOURCE = {"hf": "transformers", "timm": "timm", "torchvision": "torchvision", "open_clip": "open_clip",
           "vitscope": "vitscope", "custom": "`vitscope.wrap`"}


def _tokens(prefix: tuple[str, ...]) -> str:
    out, regs = [], prefix.count("register")
    for kind in dict.fromkeys(prefix):
        out.append(f"REG x {regs}" if kind == "register" else kind.upper())
    return "[" + ", ".join([*out, "patches"]) + "]"


def table() -> str:
    rows = ["| source | class | test id | tokens | sizes |", "| --- | --- | --- | --- | --- |"]
    for f in FAMILIES:
        sizes = "its own square size" if f.square_only else "square and non-square"
        rows.append(f"| {_SOURCE[f.source]} | `{f.cls_name}` | `{f.id}` | `{_tokens(f.prefix)}` | {sizes} |")
    return "\n".join(rows)


def test_docs_table_matches_the_family_tests() -> None:
    text = DOCS.read_text()
    assert START in text and END in text
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == table(), "docs/models.md is out of date: run python -m tests.capture.test_families_docs"


if __name__ == "__main__":
    print(f"{START}\n{table()}\n{END}")
