"""The ``vitscope`` command: thin wrappers that parse options, call the library and print.

Every command turns a `VitscopeError` into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="vitscope",
    help="See and measure what a Vision Transformer attends to.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_MODEL = "vitscope:shapes"

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="vitscope:shapes, hf:<id|folder>, timm:<name>, dino:<file.pth>, a folder")
]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Output file or folder.")]


def _parse_layers(text: Optional[str]) -> Optional[list[int]]:
    """'-1' / '0,3,-1' / '0:4' -> indices (None = all)."""
    from vitscope.errors import VitscopeError

    if text is None or text in ("", "all"):
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return list(range(int(a or 0), int(b)))
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise VitscopeError("--layers", f"cannot parse {text!r}", "use e.g. -1, 0,3,-1 or 0:4") from None


# ---------------------------------------------------------------------------------------------- foundation
@app.command()
def info(model: ModelOpt = DEFAULT_MODEL) -> None:
    """Describe a model: layers, heads, patch size, prefix tokens, preprocessing."""
    import vitscope

    vit = vitscope.load(model)
    typer.echo(vit.info.describe())
    p = vit.info.preprocess
    typer.echo(f"preprocess: policy={p.policy} mean={p.mean} std={p.std} resample={p.resample}")


@app.command("capture")
def capture_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image file(s).")],
    model: ModelOpt = DEFAULT_MODEL,
    output: OutOpt = Path("attentions.npz"),
    layers: Annotated[Optional[str], typer.Option(help="Layers: -1, 0,3,-1 or 0:4 (default all).")] = None,
    queries: Annotated[str, typer.Option(help="'all' rows or 'cls' only.")] = "all",
    heads: Annotated[str, typer.Option(help="'all' or 'mean'.")] = "all",
    policy: Annotated[Optional[str], typer.Option(help="resize | crop | native (default: the model's).")] = None,
) -> None:
    """Capture attention of IMAGES and write it to an .npz (weights + JSON header 'meta_json')."""
    import vitscope
    from vitscope.errors import VitscopeError

    if queries not in ("all", "cls"):
        raise VitscopeError("--queries", f"unknown value {queries!r}", "use 'all' or 'cls'")
    if heads not in ("all", "mean"):
        raise VitscopeError("--heads", f"unknown value {heads!r}", "use 'all' or 'mean'")
    vit = vitscope.load(model)
    attn = vitscope.capture(
        vit, [str(p) for p in images], layers=_parse_layers(layers),
        queries=None if queries == "all" else "cls", heads=heads, policy=policy,  # type: ignore[arg-type]
    )
    path = attn.save(output)
    typer.echo(f"{attn!r}\nwrote {path}")


# ---------------------------------------------------------------------------------------------- maps (#3)

# ---------------------------------------------------------------------------------------------- train (#4)

# ---------------------------------------------------------------------------------------------- show (#5)

# ---------------------------------------------------------------------------------------------- batch (#6)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: run the app, turning vitscope's errors into one line and exit code 2."""
    from vitscope.errors import VitscopeError

    try:
        app(args=argv, standalone_mode=False)
    except VitscopeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors etc.
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
