"""The ``vitscope`` command: thin wrappers that parse options, call the library and print.

Every command turns a `VitscopeError` into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

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


def _version(value: bool) -> None:
    if value:
        from vitscope import __version__

        typer.echo(f"vitscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """See and measure what a Vision Transformer attends to."""


def _parse_layers(text: str | None) -> list[int] | None:
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
    layers: Annotated[str | None, typer.Option(help="Layers: -1, 0,3,-1 or 0:4 (default all).")] = None,
    queries: Annotated[str, typer.Option(help="'all' rows or 'cls' only.")] = "all",
    heads: Annotated[str, typer.Option(help="'all' or 'mean'.")] = "all",
    policy: Annotated[str | None, typer.Option(help="resize | crop | native (default: the model's).")] = None,
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
@app.command("maps")
def maps_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[
        str, typer.Option(help="cls | rollout | flow | grad_rollout | chefer | legrad | dino_mask")
    ] = "cls",
    layer: Annotated[int, typer.Option(help="Layer for cls / dino_mask (negative counts from the end).")] = -1,
    head: Annotated[str, typer.Option(help="mean | max | min | a head index (cls, dino_mask).")] = "mean",
    query: Annotated[
        str | None, typer.Option(help="cls | mean | register:K | ROW,COL (default: cls, or mean without one).")
    ] = None,
    target: Annotated[int | None, typer.Option(help="Class for gradient methods (default: predicted).")] = None,
    tau: Annotated[float, typer.Option(help="Mass kept by dino_mask.")] = 0.6,
    upsample: Annotated[str, typer.Option(help="nearest | bilinear | bicubic for map_upsampled.")] = "bilinear",
    output: OutOpt = Path("maps.npz"),
) -> None:
    """Compute one attention map of IMAGE; write an .npz (map, map_upsampled, meta_json) and a PNG overlay."""
    import vitscope
    from vitscope.errors import VitscopeError
    from vitscope.methods.export import compute_map, parse_head, parse_query, save_map

    if upsample not in ("nearest", "bilinear", "bicubic"):
        raise VitscopeError("--upsample", f"unknown mode {upsample!r}", "use nearest, bilinear or bicubic")
    vit = vitscope.load(model)
    result = compute_map(
        vit, str(image), method, layer=layer, head=parse_head(head), query=parse_query(query), target=target,
        tau=tau, upsample_mode=upsample,  # type: ignore[arg-type]
    )
    result.meta["image"] = str(image)
    npz, png = save_map(result, output, stem=image.stem)
    rows, cols = result.map.shape[-2:]
    typer.echo(f"{method} map {rows}x{cols} of {image.name} with {vit.info.name}\nwrote {npz}\nwrote {png}")


# ---------------------------------------------------------------------------------------------- train (#4)
def _parse_overrides(items: list[str] | None) -> dict[str, object]:
    """``["key=value", ...]`` -> dict; values are read as JSON when they parse (numbers, lists, null)."""
    import json

    from vitscope.errors import VitscopeError

    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VitscopeError("--set", f"cannot parse {item!r}", "use KEY=VALUE, e.g. --set depth=6")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


@app.command("train")
def train_cmd(
    output: OutOpt = Path("runs/shapes"),
    preset: Annotated[str, typer.Option("--preset", "-p", help="shapes, mnist, cifar10, cifar100, tiny-imagenet, seed004.")] = "shapes",
    data: Annotated[Path | None, typer.Option(help="Dataset folder or archive (not needed for shapes).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUTPUT from its last checkpoint.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimisation steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the preset's batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Override the preset's peak learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed (default 0).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, auto.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any TrainConfig field: KEY=VALUE (repeatable).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a vitscope ViT from scratch (e.g. the bundled model: vitscope train --preset shapes -o runs/shapes)."""
    import torch

    from vitscope.train.loop import preset as make_preset
    from vitscope.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    overrides = _parse_overrides(set_)
    for key, value in (("epochs", epochs), ("max_steps", max_steps), ("batch_size", batch_size), ("lr", lr),
                       ("seed", seed), ("device", device), ("data", str(data) if data else None)):
        if value is not None:
            overrides[key] = value
    if resume and not overrides:
        result = train(None, output, resume=True, progress=progress, log=typer.echo)
    else:
        result = train(make_preset(preset, **overrides), output, resume=resume, progress=progress, log=typer.echo)
    typer.echo(f"{result.stopped}: step {result.step}, best val accuracy {result.best_val_accuracy:.4f} "
               f"(step {result.best_step}); model in {result.output}")


@app.command("report")
def report_cmd(
    model: Annotated[str, typer.Argument(help="vitscope:shapes, a run folder, or any model spec.")] = DEFAULT_MODEL,
    output: OutOpt = Path("report"),
    images: Annotated[int, typer.Option(help="Fresh shapes images for the accuracy.")] = 1000,
    localisation: Annotated[int, typer.Option(help="Images for the localisation table (0: skip it).")] = 100,
    samples: Annotated[int, typer.Option(help="Images in the rollout figure.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the fresh images.")] = 2024,
    methods: Annotated[str | None, typer.Option(help="Comma-separated subset of the compared methods.")] = None,
) -> None:
    """Report on a trained model: accuracy, mean attention distance, rollout, localisation (markdown + PNGs)."""
    from vitscope.train.report import model_report

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    rep = model_report(model, output, images=images, localisation_images=localisation, samples=samples, seed=seed,
                       methods=chosen, log=typer.echo)
    if rep.accuracy is not None:
        typer.echo(f"accuracy {100 * rep.accuracy:.2f}% on {rep.images} fresh images")
    for name, row in rep.localisation.items():
        typer.echo(f"{name:>17}: pointing game {100 * row['pointing_game']:.1f}%  mask IoU {row['mask_iou']:.3f}")
    typer.echo(f"wrote {output / 'report.md'}")


# ---------------------------------------------------------------------------------------------- show (#5)
@app.command("figure")
def figure_cmd(
    kind: Annotated[str, typer.Argument(help="heads | panel | grid | batch | distance | norms")],
    images: Annotated[list[Path], typer.Argument(help="Image file(s).")],
    model: ModelOpt = DEFAULT_MODEL,
    output: OutOpt = Path("figure.png"),
    layer: Annotated[int, typer.Option(help="Layer of the map (heads, panel, batch --method cls, norms).")] = -1,
    layers: Annotated[str | None, typer.Option(help="Layers of the grid: -1, 0,3,-1 or 0:4.")] = None,
    query: Annotated[str | None, typer.Option(help="cls (default), mean, register:K, ROW,COL or an index.")] = None,
    cmap: Annotated[str, typer.Option(help="matplotlib colormap.")] = "inferno",
    alpha: Annotated[float, typer.Option(help="Overlay opacity in [0, 1].")] = 0.6,
    per_head_scale: Annotated[bool, typer.Option(help="Each panel its own colour scale.")] = False,
    tau: Annotated[float | None, typer.Option(help="Contour DINO's mask holding this share of the mass.")] = None,
    nearest: Annotated[bool, typer.Option(help="Upsample maps as patch blocks, not bilinear.")] = False,
    method: Annotated[str, typer.Option(help="Map of the batch figure: rollout | cls.")] = "rollout",
    policy: Annotated[str | None, typer.Option(help="resize | crop | native (default: the model's).")] = None,
    dpi: Annotated[int, typer.Option(help="Resolution of .png output.")] = 150,
) -> None:
    """Draw a publication figure of IMAGES to -o (.png, .svg or .pdf)."""
    from vitscope.viz import save_figure
    from vitscope.viz.make import make_figure, parse_query

    fig = make_figure(
        kind, [str(p) for p in images], model, layer=layer, layers=_parse_layers(layers), query=parse_query(query),
        cmap=cmap, alpha=alpha, shared_scale=not per_head_scale, mask_tau=tau,
        mode="nearest" if nearest else "bilinear", policy=policy, method=method,
        titles=[p.name for p in images] if kind == "batch" else None,
    )
    typer.echo(f"wrote {save_figure(fig, output, dpi=dpi)}")


@app.command("view")
def view_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    model: ModelOpt = DEFAULT_MODEL,
    output: OutOpt = Path("attention.html"),
    policy: Annotated[str | None, typer.Option(help="resize | crop | native (default: the model's).")] = None,
    dtype: Annotated[str, typer.Option(help="Packing: uint8 (per-row scaled) or float16.")] = "uint8",
    budget_mb: Annotated[float, typer.Option(help="Cap on the stored attention, MB (fewer layers/heads past it).")] = 6.0,
    cmap: Annotated[str, typer.Option(help="matplotlib colormap.")] = "inferno",
) -> None:
    """Write one self-contained, offline HTML viewer of IMAGE's attention (every layer, head and query)."""
    from vitscope.viewer import view

    v = view(str(image), model, policy=policy, dtype=dtype, budget_bytes=int(budget_mb * 1e6), cmap=cmap)  # type: ignore[arg-type]
    path = v.save(output)
    for note in v.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("serve")
def serve_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless you mean it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, MB.")] = 10.0,
) -> None:
    """Serve the viewer locally; upload your own images in the browser. Ctrl-C stops it."""
    from vitscope.viewer.server import is_loopback, serve

    if not is_loopback(host):
        typer.echo(f"warning: binding {host}: anyone who can reach this machine can use the server", err=True)
    serve(
        model, host=host, port=port, max_upload=int(max_upload_mb * 2**20),
        on_ready=lambda s: typer.echo(f"vitscope viewer at {s.url} (Ctrl-C to stop)"),
    )


@app.command("demo")
def demo_cmd(
    output: OutOpt = Path("vitscope-demo"),
    model: ModelOpt = DEFAULT_MODEL,
) -> None:
    """Offline showcase: figures and a viewer page from the bundled model, written to -o."""
    from vitscope.demo import run_demo

    run_demo(output, model, log=typer.echo)


# ---------------------------------------------------------------------------------------------- batch (#6)
@app.command("batch")
def batch_cmd(
    inputs: Annotated[str, typer.Argument(help="A folder (recursive), a quoted glob, a .txt list of paths, or a file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (mirrors the inputs' paths).")],
    method: Annotated[
        str, typer.Option(help="cls (last-layer [CLS] attention), rollout, chefer, grad_rollout or legrad.")
    ] = "cls",
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 8,
    workers: Annotated[int, typer.Option(help="Loader processes (0: load in this process).")] = 2,
    formats: Annotated[str, typer.Option("--format", help="npz, png or npz,png.")] = "npz,png",
    policy: Annotated[str | None, typer.Option(help="resize | crop | native (default: the model's).")] = None,
    layer: Annotated[int, typer.Option(help="Layer of the cls map.")] = -1,
    device: Annotated[str, typer.Option(help="auto (CUDA, MPS, CPU), cpu, cuda, mps.")] = "auto",
    verify: Annotated[bool, typer.Option(help="On resume, check outputs' sha256 (default: their size).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over, ignoring an existing manifest.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    engine: Annotated[str, typer.Option(help="local, or ray: Ray Data, Parquet parts + summary.json.")] = "local",
    address: Annotated[str | None, typer.Option(help="ray: a running cluster (default RAY_ADDRESS, else local).")] = None,
    concurrency: Annotated[int, typer.Option(help="ray: actors, each with the model loaded once.")] = 1,
    num_cpus: Annotated[float, typer.Option("--num-cpus", help="ray: CPUs per actor (its torch threads).")] = 1.0,
    num_gpus: Annotated[float, typer.Option("--num-gpus", help="ray: GPUs per actor.")] = 0.0,
    masks: Annotated[Path | None, typer.Option(help="ray: folder of object masks: pointing game, mask IoU.")] = None,
) -> None:
    """Maps for many images: one .npz / .png per image, resumable (manifest.jsonl), bad files logged."""
    from vitscope.batch import run_batch

    ray_options: dict[str, Any] = {"address": address, "concurrency": concurrency, "num_cpus": num_cpus,
                                   "num_gpus": num_gpus, "masks": masks} if engine == "ray" else {}
    summary = run_batch(
        inputs, output, method=method, model=model, batch_size=batch_size, workers=workers, formats=formats,
        policy=policy, layer=layer, device=device, verify=verify, overwrite=overwrite,  # type: ignore[arg-type]
        progress=not quiet, engine=engine, **ray_options,
    )
    typer.echo(str(summary))
    for rel, error in summary.errors[:10]:
        typer.echo(f"  failed: {rel}: {error}", err=True)
    if len(summary.errors) > 10:
        typer.echo(f"  ... and {len(summary.errors) - 10} more (see the manifest)", err=True)



def main(argv: list[str] | None = None) -> None:
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
