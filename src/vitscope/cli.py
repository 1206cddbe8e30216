"""The ``vitscope`` command: thin wrappers that parse options, call the library and print.

Every usage error, bad value and I/O problem is one line on stderr naming the CLI option and the fix, exit
code 2 (no traceback); a bug in vitscope is one ``internal error`` line, exit 1; Ctrl-C prints ``interrupted``
(for ``batch``/``train``: what was saved and how to resume) and exits 130. One rule for ``-o``: a path with a suffix is a file, one without is a folder.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from collections.abc import Iterator
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
    str, typer.Option("--model", "-m", metavar="SPEC", help="vitscope:shapes, hf:<id|folder>, timm:<name>, "
                      "torchvision:<name>, open_clip:<name> (pretrained), dino:<file.pth>, a folder")
]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="A file (with a suffix) or a folder (without one).")]
FolderOpt = Annotated[Path, typer.Option("--output", "-o", help="Output folder.")]
SizeOpt = Annotated[
    str | None, typer.Option(metavar="N|HxW", help="Input size: N for the shorter side (aspect kept) or HxW "
                             "(default: the policy's).")
]
PolicyOpt = Annotated[str | None, typer.Option(metavar="resize|crop|native", help="How images meet the model's "
                                                                                   "input (default: the model's).")]
#: where to run; "auto": CUDA, then MPS, then the CPU
DEVICES = "auto|cpu|cuda|mps"
DeviceOpt = Annotated[str, typer.Option(metavar=DEVICES, help="Where to run (auto: CUDA, then MPS, then the CPU).")]
CheckpointOpt = Annotated[Path | None, typer.Option(
    metavar="FILE", help="Fine-tuned weights (.safetensors/.pth) for a timm:, torchvision: or open_clip: "
    "architecture, instead of its pretrained ones.")]
RandomOpt = Annotated[bool, typer.Option(
    "--random-weights", help="A timm:, torchvision: or open_clip: architecture untrained (said on stderr), "
    "instead of its pretrained weights.")]
MaxPixelsOpt = Annotated[float | None, typer.Option(help="Largest decoded input, megapixels (default 100).")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Most tokens per capture (default 20000).")]
MaxVideoPixelsOpt = Annotated[float | None, typer.Option(
    help="Largest decoded video file, gigapixels over all its frames (frames x height x width; default 20).")]
MaxMemoryOpt = Annotated[float | None, typer.Option(help="Largest estimated attention memory, GB (default 4.3).")]


class Interrupted(Exception):
    """Ctrl-C inside a command, with what was saved and how to resume (printed by `main`, exit 130)."""


def _amount(option: str, value: float, scale: float, unit: str, base: str) -> int:
    """A size option given in ``unit`` s (MB, megapixels, ...) as a whole count of ``base`` s (bytes, pixels),
    ``scale`` of them per unit: finite, positive, and at least one."""
    import math

    from vitscope.errors import VitscopeError

    if not value > 0:  # also nan
        raise VitscopeError(option, f"must be a positive, finite number of {unit}, got {value}",
                            "pass a positive number")
    try:
        count = value * scale
        finite = math.isfinite(count)
    except OverflowError:  # an int past every float
        count, finite = 0, False
    if not finite:
        raise VitscopeError(option, f"{str(value)[:20]} {unit} is too large", "pass a smaller number")
    if int(count) < 1:
        raise VitscopeError(option, f"{value} {unit} is less than one {base}", "pass a larger number")
    return int(count)


def _limits(max_pixels: float | None = None, max_tokens: int | None = None, max_memory: float | None = None,
            max_figure_pixels: float | None = None, max_video_pixels: float | None = None,
            ) -> contextlib.AbstractContextManager[None]:
    from vitscope.limits import limits

    def amount(option: str, value: float | None, scale: float, unit: str, base: str) -> int | None:
        return None if value is None else _amount(option, value, scale, unit, base)  # None: the default

    return limits(
        max_pixels=amount("--max-pixels", max_pixels, 1e6, "megapixels", "pixel"),
        max_tokens=amount("--max-tokens", max_tokens, 1, "tokens", "token"),
        max_bytes=amount("--max-memory", max_memory, 1e9, "GB", "byte"),
        max_figure_pixels=amount("--max-figure-pixels", max_figure_pixels, 1e6, "megapixels", "pixel"),
        max_video_pixels=amount("--max-video-pixels", max_video_pixels, 1e9, "gigapixels", "pixel"),
    )


#: largest --size side (a 65,536-pixel side is far past every token limit already)
_MAX_SIDE = 1 << 16


def _parse_size(text: str | None) -> int | tuple[int, int] | None:
    """'224' -> 224 (shorter side), '224x320' -> (224, 320) (height x width)."""
    from vitscope.errors import VitscopeError

    if text is None or text == "":
        return None
    fix = "use a positive number like 224 (shorter side) or HxW like 224x320"
    try:
        parts = [int(t) for t in text.lower().split("x")]
    except ValueError:
        raise VitscopeError("--size", f"cannot parse {text!r}", fix) from None
    if len(parts) not in (1, 2) or any(p <= 0 for p in parts):
        raise VitscopeError("--size", f"{text!r} is not a positive size", fix)
    if any(p > _MAX_SIDE for p in parts):
        raise VitscopeError("--size", f"{text!r} is more than {_MAX_SIDE:,} pixels a side", fix)
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _check_policy(policy: str | None) -> None:
    from vitscope.errors import VitscopeError

    if policy is not None and policy not in ("resize", "crop", "native"):
        raise VitscopeError("--policy", f"unknown value {policy!r}", "use resize, crop or native")


def _load_model(model: str, checkpoint: Path | None = None, random_weights: bool = False,
                device: str | None = None) -> Any:
    """``vitscope.load`` for the CLI, under the library's one rule for weights (``timm:``, ``torchvision:`` and
    ``open_clip:`` names are pretrained unless ``--checkpoint`` or ``--random-weights``); the library's
    announcements (random weights) are printed as ``note:`` lines on stderr."""
    import warnings

    import vitscope
    from vitscope.errors import VitscopeError, VitscopeWarning

    kwargs: dict[str, Any] = {}
    if checkpoint is not None:
        kwargs["checkpoint"] = checkpoint
    if random_weights:
        kwargs["random_weights"] = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", VitscopeWarning)
            vit = vitscope.load(model, **kwargs)
    except VitscopeError as exc:  # the library names its arguments: a model file's (path, num_heads...) is --model
        if exc.argument.startswith("-") or exc.argument in ("checkpoint", "random_weights", "model"):
            raise
        raise type(exc)("model", exc.problem, exc.fix) from None
    for w in caught:
        if issubclass(w.category, VitscopeWarning):
            typer.echo(f"note: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if device is not None:
        from vitscope.capture.prepare import resolve_device

        dev = resolve_device(device, vit.device, argument="--device")
        if dev != vit.device:
            vit.module.to(dev)
    return vit


def _output(out: Path, suffixes: tuple[str, ...] | None, name: str | None = None) -> Path:
    from vitscope._io import output_target

    return output_target(out, suffixes=suffixes, name=name)


OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Write into a folder that holds files vitscope did not write (they are kept, never replaced).")]


def _stem(images: list[Path]) -> str:
    return images[0].stem if len(images) == 1 else "images"


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
def info(
    model: ModelOpt = DEFAULT_MODEL,
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as one JSON object.")] = False,
) -> None:
    """Describe a model: layers (which attend globally, which within windows), heads, patch size, prefix and
    suffix tokens, preprocessing."""
    vit = _load_model(model, checkpoint, random_weights)
    i, p = vit.info, vit.info.preprocess
    if as_json:
        import json

        typer.echo(json.dumps({
            "name": i.name, "family": i.family, "num_layers": i.num_layers, "num_heads": i.num_heads,
            "patch_size": list(i.patch_size), "prefix": list(i.prefix), "num_prefix_tokens": i.num_prefix_tokens,
            "suffix": list(i.suffix), "num_suffix_tokens": i.num_suffix_tokens,  # after the patches (YOLOS: "det")
            "weights": i.weights,
            "labels": len(i.labels) if i.labels is not None else None,
            "global_layers": list(i.global_layers), "windowed_layers": list(i.windowed_layers),
            "layer_kinds": list(i.layer_kinds), "frames": i.frames, "tubelet": i.tubelet,  # video: T input frames
            "preprocess": {"policy": p.policy, "image_size": list(p.image_size), "mean": list(p.mean),
                           "std": list(p.std), "resample": p.resample, "dynamic_size": p.dynamic_size,
                           "channels": p.channels},
        }))
        return
    typer.echo(i.describe())
    typer.echo(f"preprocess: policy={p.policy} mean={p.mean} std={p.std} resample={p.resample}")


@app.command("capture")
def capture_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image file(s).")],
    model: ModelOpt = DEFAULT_MODEL,
    output: OutOpt = Path("attentions.npz"),
    layers: Annotated[str | None, typer.Option(help="Layers: -1, 0,3,-1 or 0:4 (default all).")] = None,
    queries: Annotated[str, typer.Option(help="'all' rows or 'cls' only.")] = "all",
    heads: Annotated[str, typer.Option(help="'all' or 'mean'.")] = "all",
    policy: PolicyOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    max_pixels: MaxPixelsOpt = None,
    max_tokens: MaxTokensOpt = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Capture attention of IMAGES and write it to an .npz (weights + JSON header 'meta_json')."""
    import vitscope
    from vitscope.errors import VitscopeError

    if queries not in ("all", "cls"):
        raise VitscopeError("--queries", f"unknown value {queries!r}", "use 'all' or 'cls'")
    if heads not in ("all", "mean"):
        raise VitscopeError("--heads", f"unknown value {heads!r}", "use 'all' or 'mean'")
    _check_policy(policy)
    target = _output(output, (".npz",), f"{_stem(images)}.capture.npz")
    layer_ids, the_size = _parse_layers(layers), _parse_size(size)
    with _limits(max_pixels, max_tokens, max_memory):
        vit = _load_model(model, checkpoint, random_weights, device)
        attn = vitscope.capture(
            vit, [str(p) for p in images], layers=layer_ids, size=the_size,
            queries=None if queries == "all" else "cls", heads=heads, policy=policy,  # type: ignore[arg-type]
        )
    path = attn.save(target)
    typer.echo(f"{attn!r}\nwrote {path}")


# ---------------------------------------------------------------------------------------------- maps (#3)
@app.command("methods")
def methods_cmd() -> None:
    """List the registered maps: name, what each needs, its parameters and paper."""
    from vitscope.methods.api import get_method, method_names

    width = max(len(n) for n in method_names())
    for name in method_names():
        m = get_method(name)
        params = ", ".join(f"{k}={v!r}" for k, v in m.params.items())
        typer.echo(f"{name:<{width}} [{m.needs}] {m.summary}")
        typer.echo(f"{'':<{width}} params: {params or 'none'}; {m.paper}")


def _parse_target(values: list[str] | None) -> object:
    """``--target`` values as the library's target: ``None``, a class index, a name or prompt, or a list of
    prompts/references (repeated ``--target``)."""
    from vitscope.errors import VitscopeError

    if not values:
        return None
    items: list[object] = []
    for v in values:
        v = v.strip()
        if not v:
            raise VitscopeError("--target", "empty target", "pass a class index or name, 'text:a cat', "
                                "'image:ref.png' or 'patch:ROW,COL'")
        if v.lstrip("-").isdigit():
            if not 0 <= int(v) < 2**31:
                raise VitscopeError("--target", f"{v} is not a class index", "pass a class index >= 0, or a name")
            items.append(int(v))
        else:
            items.append(v)
    return items[0] if len(items) == 1 else items


@app.command("maps")
def maps_cmd(
    image: Annotated[list[Path], typer.Argument(
        help="Image file(s); several write into the -o folder (for a video model: a folder of frames each).")],
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="A registered method (list them: vitscope methods).")] = "cls",
    layer: Annotated[int, typer.Option(help="Layer for cls / dino_mask (negative counts from the end).")] = -1,
    head: Annotated[str, typer.Option(help="mean | max | min | a head index (cls, dino_mask).")] = "mean",
    query: Annotated[
        str | None, typer.Option(help="cls | mean | register:K | ROW,COL (default: cls, or mean without one).")
    ] = None,
    target: Annotated[list[str] | None, typer.Option(
        help="What gradient methods explain (default: the predicted class): a class index or name (tabby), "
             "'text:a cat' (CLIP, SigLIP, open_clip; repeat for one map each), 'image:ref.png' or 'patch:ROW,COL' "
             "(backbones).")] = None,
    tau: Annotated[float, typer.Option(help="Mass kept by dino_mask.")] = 0.6,
    upsample: Annotated[str, typer.Option(help="nearest | bilinear | bicubic for map_upsampled.")] = "bilinear",
    output: Annotated[
        Path, typer.Option("--output", "-o", help="x.npz or x.png (both are written), or a folder (no suffix).")
    ] = Path("maps.npz"),
    policy: PolicyOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    max_pixels: MaxPixelsOpt = None,
    max_tokens: MaxTokensOpt = None,
    max_memory: MaxMemoryOpt = None,
    max_video_pixels: MaxVideoPixelsOpt = None,
) -> None:
    """Compute one attention map of each IMAGE; write an .npz (map, map_upsampled, meta_json) and a PNG overlay
    at the image's size (several images: into the -o folder, each on its own grid: variable-resolution models
    such as SigLIP2 and NaFlexViT run every image at its own aspect ratio). With a video model, IMAGE is a
    video file (PyAV: pip install vitscope[video]) or a folder of frames, sampled to the model's frames: the
    maps per frame and their temporal profile go to the .npz (map, profile, meta_json), the overlay to an
    animated GIF."""
    from vitscope.errors import VitscopeError
    from vitscope.layout import parse_query
    from vitscope.methods.api import get_method
    from vitscope.viz.export import compute_map, output_paths, parse_head, save_map

    if upsample not in ("nearest", "bilinear", "bicubic"):
        raise VitscopeError("--upsample", f"unknown mode {upsample!r}", "use nearest, bilinear or bicubic")
    spec = get_method(method, argument="--method")
    _check_policy(policy)
    if target and "target" not in spec.params:
        from vitscope.methods.api import method_names

        grads = [n for n in method_names() if get_method(n).needs == "gradients"]
        raise VitscopeError("--target", f"method {method!r} takes no target",
                            f"use --target with a gradient method: {', '.join(grads)}")
    if not 0 < tau <= 1:  # also nan
        raise VitscopeError("--tau", f"{tau} is outside (0, 1]", "pass the mass to keep, e.g. 0.6")
    the_target = _parse_target(target)
    the_head, the_query, the_size = parse_head(head), parse_query(query), _parse_size(size)
    if len(image) > 1:  # one .npz + .png per image: -o is a folder
        if output == Path("maps.npz"):
            output = Path("maps")
        elif output.suffix:
            raise VitscopeError("--output", f"{len(image)} images but -o {output} names one file",
                                "pass a folder (a path without a suffix), e.g. -o maps")
    if len({one.stem for one in image}) < len(image):
        raise VitscopeError("--output", "two images have the same name, so their maps would overwrite each other",
                            "rename one, or run them one at a time")
    for one in image:
        output_paths(output, one.stem, method)  # refuse a wrong -o before computing
    with _limits(max_pixels, max_tokens, max_memory, max_video_pixels=max_video_pixels):
        vit = _load_model(model, checkpoint, random_weights, device)
        for one in image:
            if vit.info.frames:  # a video model: IMAGE is a frames folder (or one frame); per-frame maps and a GIF
                from vitscope.viz.video import save_video_map

                given = {"layer": layer, "head": the_head, "query": the_query, "target": the_target, "tau": tau}
                npz, gif, vmaps = save_video_map(vit, str(one), method, output, stem=one.stem, params=given,
                                                 policy=policy, size=the_size)
                _, T, rows, cols = vmaps.map.shape
                profile = ", ".join(f"{p:.2f}" for p in vmaps.profile[0].tolist())
                typer.echo(f"{method} maps {T} frames x {rows}x{cols} of {one.name} with {vit.info.name} (attention "
                           f"per frame: {profile})\nwrote {npz}\nwrote {gif}")
                continue
            result = compute_map(
                vit, str(one), method, layer=layer, head=the_head, query=the_query, target=the_target,
                tau=tau, upsample_mode=upsample, policy=policy, size=the_size,  # type: ignore[arg-type]
            )
            result.meta["image"] = str(one)
            used = (policy or vit.info.preprocess.policy) if the_size is None else None
            npz, png = save_map(result, output, stem=one.stem, image=str(one), policy=used)
            rows, cols = result.map.shape[-2:]
            typer.echo(f"{method} map {rows}x{cols} of {one.name} with {vit.info.name}\nwrote {npz}\nwrote {png}")


# ---------------------------------------------------------------------------------------------- train (#4)
def _parse_overrides(items: list[str] | None) -> dict[str, object]:
    """``["key=value", ...]`` -> dict; values are read as JSON when they parse (numbers, lists, null)."""
    import json

    from vitscope.errors import VitscopeError

    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VitscopeError("--set", f"cannot parse {item!r}", "use --set KEY=VALUE, e.g. --set depth=6")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


@app.command("train")
def train_cmd(
    output: FolderOpt = Path("runs/shapes"),
    preset: Annotated[str, typer.Option("--preset", "-p", help="shapes, mnist, cifar10, cifar100, tiny-imagenet, seed004.")] = "shapes",
    data: Annotated[Path | None, typer.Option(help="Dataset folder or archive (not needed for shapes).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUTPUT from its last checkpoint.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimisation steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the preset's batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Override the preset's peak learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed (default 0).")] = None,
    device: Annotated[str | None, typer.Option(metavar=DEVICES, help="Where to train (default: cpu; auto: CUDA, "
                                               "then MPS, then the CPU).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="Any TrainConfig field (repeatable).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a vitscope ViT from scratch (e.g. the bundled model: vitscope train --preset shapes -o runs/shapes)."""
    import torch

    from vitscope.errors import VitscopeError
    from vitscope.train.loop import preset as make_preset
    from vitscope.train.loop import train

    if threads is not None and not 1 <= threads <= 4096:
        raise VitscopeError("--threads", f"must be a positive number of threads, got {threads}", "pass e.g. 4")
    overrides = _parse_overrides(set_)
    for key, value in (("epochs", epochs), ("max_steps", max_steps), ("batch_size", batch_size), ("lr", lr),
                       ("seed", seed), ("device", device), ("data", str(data) if data else None)):
        if value is not None:
            overrides[key] = value
    config = make_preset(preset, **overrides) if overrides or not resume else None  # every value checked here
    if threads:
        torch.set_num_threads(threads)
    out = _output(output, None)
    try:
        result = train(config, out, resume=resume, progress=progress, log=typer.echo, overwrite=overwrite)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped mid-step
        raise Interrupted(_train_saved(out)) from None
    if result.stopped == "interrupted":  # the loop saved a checkpoint and said so
        raise Interrupted("")
    # the loop has printed its one summary line


def _train_saved(out: Path) -> str:
    """What an interrupted run left in ``out`` and how to continue it."""
    from vitscope.train.loop import _find_checkpoint

    ckpt = _find_checkpoint(out / "checkpoints" / "last")
    if ckpt is None:
        return f"interrupted before the first checkpoint: nothing saved in {out} (start again)"
    step = "?"
    with contextlib.suppress(Exception):
        import torch

        step = str(torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)["state"]["step"])
    return (f"interrupted: checkpoint of step {step} saved in {ckpt}, no final model yet "
            f"(continue with: vitscope train -o {out} --resume)")


@app.command("report")
def report_cmd(
    model: Annotated[str, typer.Argument(help="vitscope:shapes, a run folder, or any model spec.")] = DEFAULT_MODEL,
    output: FolderOpt = Path("report"),
    images: Annotated[int, typer.Option(help="Fresh shapes images for the accuracy.")] = 1000,
    localisation: Annotated[int, typer.Option(help="Images for the localisation table (0: skip it).")] = 100,
    samples: Annotated[int, typer.Option(help="Images in the rollout figure.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the fresh images.")] = 2024,
    methods: Annotated[str | None, typer.Option(help="Comma-separated subset of the compared methods.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Report on a trained model: accuracy, mean attention distance, rollout, localisation (markdown + PNGs)."""
    from vitscope.errors import VitscopeError
    from vitscope.train.report import model_report

    for option, value, least, example in (("--images", images, 1, 1000), ("--localisation", localisation, 0, 100),
                                          ("--samples", samples, 1, 8), ("--seed", seed, 0, 2024)):
        if not least <= value < 2**62:
            raise VitscopeError(option, f"must be {'>= 0' if least == 0 else 'positive'}, got {value}",
                                f"pass e.g. {option} {example}")
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    output = _output(output, None)
    rep = model_report(model, output, images=images, localisation_images=localisation, samples=samples,
                       seed=seed, methods=chosen, log=typer.echo, overwrite=overwrite)
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
    output: Annotated[
        Path, typer.Option("--output", "-o", help="x.png, x.svg or x.pdf, or a folder (no suffix).")
    ] = Path("figure.png"),
    layer: Annotated[int, typer.Option(help="Layer of the map (heads, panel, batch --method cls, norms).")] = -1,
    layers: Annotated[str | None, typer.Option(help="Layers of the grid: -1, 0,3,-1 or 0:4.")] = None,
    query: Annotated[str | None, typer.Option(help="cls (default), mean, register:K, ROW,COL or an index.")] = None,
    cmap: Annotated[str, typer.Option(help="matplotlib colormap.")] = "inferno",
    alpha: Annotated[float, typer.Option(help="Overlay opacity in [0, 1].")] = 0.6,
    per_head_scale: Annotated[bool, typer.Option(help="Each panel its own colour scale.")] = False,
    tau: Annotated[float | None, typer.Option(help="Contour DINO's mask holding this share of the mass.")] = None,
    nearest: Annotated[bool, typer.Option(help="Upsample maps as patch blocks, not bilinear.")] = False,
    method: Annotated[str, typer.Option(help="Map of the batch figure: rollout | cls.")] = "rollout",
    policy: PolicyOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    dpi: Annotated[int, typer.Option(help="Resolution of .png output (1-1200).")] = 150,
    max_pixels: MaxPixelsOpt = None,
    max_tokens: MaxTokensOpt = None,
    max_memory: MaxMemoryOpt = None,
    max_figure_pixels: Annotated[float | None, typer.Option(help="Largest figure, megapixels (default 50).")] = None,
) -> None:
    """Draw a publication figure of IMAGES to -o (.png, .svg or .pdf)."""
    from vitscope.errors import VitscopeError
    from vitscope.layout import parse_query
    from vitscope.viz import save_figure
    from vitscope.viz.figures import check_dpi
    from vitscope.viz.make import KINDS, make_figure

    if kind not in KINDS:
        raise VitscopeError("kind", f"unknown figure {kind!r}", f"use one of {', '.join(KINDS)}")
    if method not in ("rollout", "cls"):
        raise VitscopeError("--method", f"unknown map {method!r}", "use rollout or cls")
    _check_policy(policy)
    check_dpi(dpi, "--dpi")
    target = _output(output, (".png", ".svg", ".pdf"), f"{_stem(images)}.{kind}.png")
    layer_ids, the_query, the_size = _parse_layers(layers), parse_query(query), _parse_size(size)
    with _limits(max_pixels, max_tokens, max_memory, max_figure_pixels):
        vit = _load_model(model, checkpoint, random_weights, device)
        if vit.info.frames:  # a video model: IMAGES is one frames folder; token frames x heads
            from vitscope.viz.video import video_heads_figure

            if kind != "heads":
                raise VitscopeError("kind", f"a video model draws the heads figure (token frames x heads), not {kind!r}",
                                    "use: vitscope figure heads FRAMES_FOLDER -m <video model>")
            if len(images) != 1:
                raise VitscopeError("images", f"{len(images)} videos given", "pass one folder of frames")
            fig = video_heads_figure(vit, str(images[0]), layer=layer, query=the_query, cmap=cmap, alpha=alpha,
                                     policy=policy, size=the_size)
            typer.echo(f"wrote {save_figure(fig, target, dpi=dpi)}")
            return
        fig = make_figure(
            kind, [str(p) for p in images], vit, layer=layer, layers=layer_ids, query=the_query,
            cmap=cmap, alpha=alpha, shared_scale=not per_head_scale, mask_tau=tau,
            mode="nearest" if nearest else "bilinear", policy=policy, method=method, size=the_size,
            titles=[p.name for p in images] if kind == "batch" else None,
        )
        typer.echo(f"wrote {save_figure(fig, target, dpi=dpi)}")


@app.command("view")
def view_cmd(
    image: Annotated[Path, typer.Argument(help="Image file (for a video model: a folder of frames).")],
    model: ModelOpt = DEFAULT_MODEL,
    output: Annotated[Path, typer.Option("--output", "-o", help="x.html, or a folder (no suffix).")] = Path(
        "attention.html"),
    policy: PolicyOpt = None,
    size: SizeOpt = None,
    device: DeviceOpt = "cpu",
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    dtype: Annotated[str, typer.Option(help="Packing: uint8 (per-row scaled) or float16.")] = "uint8",
    budget_mb: Annotated[float, typer.Option(help="Cap on the stored attention, MB (fewer layers/heads past it).")] = 6.0,
    cmap: Annotated[str, typer.Option(help="matplotlib colormap.")] = "inferno",
    target: Annotated[list[str] | None, typer.Option(
        help="Also show the gradient maps (chefer, legrad, grad_rollout, attn_gradcam) for this target: a class "
             "index or name, 'text:a cat', 'image:ref.png' or 'patch:ROW,COL' (repeatable).")] = None,
    prompt: Annotated[list[str] | None, typer.Option(
        help="Same as --target 'text:PROMPT' (CLIP, SigLIP, open_clip; repeatable: one map each).")] = None,
    max_pixels: MaxPixelsOpt = None,
    max_tokens: MaxTokensOpt = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Write one self-contained, offline HTML viewer of IMAGE's attention (every layer, head and query). With a
    video model, IMAGE is a folder of frames: the page has a frame slider (and play button), hovering a patch of
    the shown frame draws that space-time token's attention on every frame."""
    import warnings

    from vitscope.errors import VitscopeError
    from vitscope.viewer import view, view_video

    budget = _amount("--budget-mb", budget_mb, 1e6, "MB", "byte")
    _check_policy(policy)
    wanted = [*(target or []), *(f"text:{p}" for p in prompt or [])]
    the_target = _parse_target(wanted)
    out = _output(output, (".html",), f"{image.stem}.view.html")
    the_size = _parse_size(size)
    with _limits(max_pixels, max_tokens, max_memory), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the viewer's notes are printed below
        vit = _load_model(model, checkpoint, random_weights, device)
        if vit.info.frames:  # the video branch: IMAGE is a frames folder (or one frame); a time slider
            if wanted:
                raise VitscopeError("--prompt" if prompt and not target else "--target",
                                    f"{vit.info.name} is a video model: its viewer shows attention and rollout, "
                                    "not gradient maps", "drop it, or use 'vitscope maps FRAMES --target'")
            v = view_video(str(image), vit, policy=policy, size=the_size, dtype=dtype,  # type: ignore[arg-type]
                           budget_bytes=budget, cmap=cmap)
        else:
            try:
                v = view(str(image), vit, policy=policy, size=the_size, dtype=dtype,  # type: ignore[arg-type]
                         budget_bytes=budget, cmap=cmap, target=the_target)
            except VitscopeError as exc:  # prompts alone: the error is about --prompt
                if exc.argument == "target" and prompt and not target:
                    raise VitscopeError("--prompt", exc.problem, exc.fix) from None
                raise
    path = v.save(out)
    for note in v.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("serve")
def serve_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless you mean it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 0,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, MB.")] = 10.0,
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Serve the viewer locally; upload your own images in the browser. Ctrl-C stops it."""
    from vitscope.viewer.server import is_loopback, make_server

    max_upload = _amount("--max-upload-mb", max_upload_mb, 2**20, "MB", "byte")
    server = make_server(model, host=host, port=port, max_upload=max_upload)  # port errors first
    try:
        if not is_loopback(host):
            typer.echo(f"warning: binding {host}: anyone who can reach this machine can use the server", err=True)
        server.model_spec = _load_model(model, checkpoint, random_weights, device)
        server.vit()
        typer.echo(f"vitscope viewer at {server.url} (Ctrl-C to stop)")
        server.serve_forever()
    finally:
        server.server_close()


@app.command("demo")
def demo_cmd(
    output: FolderOpt = Path("vitscope-demo"),
    model: ModelOpt = DEFAULT_MODEL,
    overwrite: OverwriteOpt = False,
) -> None:
    """Offline showcase: figures and a viewer page from the bundled model, written to -o."""
    from vitscope.demo import run_demo

    run_demo(_output(output, None), model, log=typer.echo, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- batch (#6)
@app.command("batch")
def batch_cmd(
    inputs: Annotated[str, typer.Argument(help="A folder (recursive), a quoted glob, a .txt list of paths, or a file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (mirrors the inputs' paths).")],
    method: Annotated[str, typer.Option(help="A registered method (list them: vitscope methods).")] = "cls",
    model: ModelOpt = DEFAULT_MODEL,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 8,
    workers: Annotated[int | None, typer.Option(help="local: loader processes (0: load in this process; "
                                                     "default 2).")] = None,
    formats: Annotated[str | None, typer.Option("--format", help="local: npz, png or npz,png (default both).")] = None,
    policy: PolicyOpt = None,
    size: SizeOpt = None,
    layer: Annotated[int, typer.Option(help="Layer of the cls map.")] = -1,
    device: Annotated[str, typer.Option(metavar=DEVICES, help="Where to run (auto: CUDA, then MPS, then the CPU)."
                                        )] = "auto",
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    verify: Annotated[bool | None, typer.Option("--verify/--no-verify", help="local: on resume, check outputs' "
                                                "sha256 (default: their size).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over (the previous run's outputs are removed), or write "
                                                 "beside files vitscope did not write (kept).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    max_pixels: MaxPixelsOpt = None,
    max_tokens: MaxTokensOpt = None,
    max_memory: MaxMemoryOpt = None,
    max_video_pixels: MaxVideoPixelsOpt = None,
    engine: Annotated[str, typer.Option(help="local, or ray: Ray Data, Parquet parts + summary.json.")] = "local",
    address: Annotated[str | None, typer.Option(help="ray: a running cluster (default RAY_ADDRESS, else local).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="ray: actors, each with the model loaded once (default "
                                                         "1).")] = None,
    num_cpus: Annotated[float | None, typer.Option("--num-cpus", help="ray: CPUs per actor (its torch threads; "
                                                                      "default 1).")] = None,
    num_gpus: Annotated[float | None, typer.Option("--num-gpus", help="ray: GPUs per actor (default 0).")] = None,
    max_retries: Annotated[int | None, typer.Option("--max-retries", help="ray: retries of a call whose actor "
                                                    "died; then its images fail alone (default 3).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="ray: show Ray's own log lines (default: they go to "
                                                          "a file named in the summary line).")] = False,
    masks: Annotated[Path | None, typer.Option(help="Folder of object masks mirroring the inputs: pointing game, "
                                                    "mask IoU.")] = None,
    stats: Annotated[bool, typer.Option(help="Per-image prediction, token norms and attention distance, and "
                                             "summary.json + distance.png (from the map's own forward pass).")] = True,
    norm_threshold: Annotated[float | None, typer.Option(help="Fixed cut for high-norm tokens (default: per image "
                                                              "and layer, q75 + 3 IQR).")] = None,
) -> None:
    """Maps for many images: <stem>.<method>.npz / .png per image, resumable (manifest.jsonl), bad files logged;
    summary.json over the dataset. With a video model, INPUTS is a folder of video files and/or frame folders:
    per video the per-frame maps (.npz) and a PNG strip of them (local engine). An option the chosen --engine
    does not use is refused."""
    from vitscope.batch import run_batch

    _check_policy(policy)
    out = _output(output, None)
    the_size = _parse_size(size)
    # only what the user set: run_batch refuses an option the engine cannot honour, and checks every range
    chosen: dict[str, Any] = {"workers": workers, "formats": formats, "verify": verify, "address": address,
                              "concurrency": concurrency, "num_cpus": num_cpus, "num_gpus": num_gpus,
                              "max_retries": max_retries, "verbose": verbose or None}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    try:
        with _limits(max_pixels, max_tokens, max_memory, max_video_pixels=max_video_pixels):
            spec: Any = model
            if checkpoint is not None or random_weights:  # else the library's rule: pretrained for timm: & co
                spec = _load_model(model, checkpoint, random_weights)
            summary = run_batch(
                inputs, out, method=method, model=spec, batch_size=batch_size, policy=policy,  # type: ignore[arg-type]
                size=the_size, layer=layer, device=device, overwrite=overwrite, progress=not quiet, masks=masks,
                stats=stats, norm_threshold=norm_threshold, engine=engine, **chosen,
            )
    except KeyboardInterrupt:
        raise Interrupted(_batch_saved(out, engine)) from None
    typer.echo(str(summary))
    for rel, error in summary.errors[:10]:
        typer.echo(f"  failed: {rel}: {error}", err=True)
    if len(summary.errors) > 10:
        typer.echo(f"  ... and {len(summary.errors) - 10} more (see the manifest)", err=True)


def _batch_saved(out: Path, engine: str = "local") -> str:
    """The 'interrupted' line of a batch run: what ``engine`` saved in ``out`` (it counts its own records)."""
    from vitscope.batch import saved_counts

    try:
        ok, failed, where = saved_counts(out, engine)
    except Exception:  # never a second error while reporting Ctrl-C
        return f"interrupted: run the same command again to resume ({out})"
    return (f"interrupted: {ok} image(s) saved in {out} ({failed} failed), recorded in {where}; "
            "run the same command again to resume (finished images are skipped)")


@app.command("evaluate")
def evaluate_cmd(
    images: Annotated[str, typer.Argument(help="A folder of images (labels from parent folders named after the "
                                               "model's classes), a quoted glob, a .txt list, or gtsegs_ijcv.mat.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder: table.csv/.json, summary.md, "
                                                                "curves.png, records.jsonl (resume).")],
    masks: Annotated[Path | None, typer.Option(help="Mask folder mirroring IMAGES, or COCO annotations (.json): "
                                                    "segmentation test and pointing game.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods (default: every registered one; "
                                                     "a random baseline is always added).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per chunk (one records write each).")] = 64,
    deletion_steps: Annotated[int, typer.Option("--deletion-steps", help="RISE deletion/insertion steps.")] = 10,
    sanity_images: Annotated[int, typer.Option("--sanity-images", help="The first N images also get the "
                                                                       "randomisation sanity check.")] = 16,
    limit: Annotated[int | None, typer.Option(help="Only the first N images.")] = None,
    seed: Annotated[int, typer.Option(help="Random baseline and randomisation draws.")] = 0,
    policy: PolicyOpt = None,
    size: SizeOpt = None,
    device: Annotated[str, typer.Option(metavar=DEVICES, help="Where to run (auto: CUDA, then MPS, then the CPU)."
                                        )] = "cpu",
    checkpoint: CheckpointOpt = None,
    random_weights: RandomOpt = False,
    overwrite: Annotated[bool, typer.Option(help="Start over (previous records removed), or write beside files "
                                                 "vitscope did not write (kept).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    engine: Annotated[str, typer.Option(help="local, or ray: chunks scored by Ray actors.")] = "local",
    address: Annotated[str | None, typer.Option(help="ray: a running cluster (default RAY_ADDRESS, else local).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="ray: actors, each with the model loaded once (default "
                                                         "1).")] = None,
    num_cpus: Annotated[float | None, typer.Option("--num-cpus", help="ray: CPUs per actor (default 1).")] = None,
) -> None:
    """Which map to trust: every method scored by the published protocols (Chefer's perturbation and segmentation
    tests, pointing game, RISE deletion/insertion, cascading-randomisation sanity check) beside a random map;
    prints the table. Resumable: run the same command again."""
    from vitscope.evaluate import evaluate

    _check_policy(policy)
    out = _output(output, None)
    try:
        spec: Any = model
        if checkpoint is not None or random_weights:
            spec = _load_model(model, checkpoint, random_weights)
        table = evaluate(images, out, model=spec, methods=methods, masks=masks, batch_size=batch_size,
                         deletion_steps=deletion_steps, sanity_images=sanity_images, limit=limit, seed=seed,
                         policy=policy, size=_parse_size(size), device=device, overwrite=overwrite,
                         progress=not quiet, engine=engine, address=address, concurrency=concurrency,
                         num_cpus=num_cpus)
    except KeyboardInterrupt:
        raise Interrupted(_evaluate_saved(out)) from None
    typer.echo(table.to_markdown(), nl=False)
    m = table.meta
    typer.echo(f"{m['scored']} of {m['images']} images scored ({m['failed']} failed); written to {out}")
    for rel, error in m["errors"][:10]:
        typer.echo(f"  failed: {rel}: {error}", err=True)


def _evaluate_saved(out: Path) -> str:
    """The 'interrupted' line of an evaluate run: the images whose records are saved."""
    from vitscope.evaluate.core import RECORDS

    try:
        path = out / RECORDS
        n = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.exists() else 0
    except Exception:  # never a second error while reporting Ctrl-C
        return f"interrupted: run the same command again to resume ({out})"
    return (f"interrupted: {n} image(s) scored and saved in {out / RECORDS}; run the same command again to resume "
            "(scored images are skipped); no table was written")


# ---------------------------------------------------------------------------------------------- entry point
def _framework_error(exc: BaseException) -> bool:
    """A usage error of the CLI framework (click, or the click typer bundles): duck-typed, wherever it lives."""
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "format_message", None))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage_line(exc: BaseException) -> str:
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "vitscope"
    if type(exc).__name__ == "NoArgsIsHelpError":
        return f"error: no command given (run '{command} --help' to see the commands)"
    message = exc.format_message()  # type: ignore[attr-defined]
    first = next((ln for ln in str(message).splitlines() if ln.strip()), type(exc).__name__)
    return f"error: {_one_line(first)} (see '{command} --help')"


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:  # e.g. `vitscope info | head -1`
        with contextlib.suppress(Exception):
            sys.stdout = open(__import__("os").devnull, "w")  # noqa: SIM115
        raise SystemExit(0) from None


@functools.cache
def _command() -> Any:
    """The click command typer builds from `app` (what ``app()`` builds on every call), its help in the
    command line's words (`_plain_help`): built once, as the in-process runs of the tests call `run` many times."""
    command = typer.main.get_command(app)
    for cmd in (command, *getattr(command, "commands", {}).values()):
        for param in cmd.params:
            _plain_help(param)
        help_option = cmd.get_help_option  # made per context: --help itself is a flag too

        def plain_help_option(ctx: Any, made: Any = help_option) -> Any:
            option = made(ctx)
            if option is not None:
                _plain_help(option)
            return option

        cmd.get_help_option = plain_help_option
    return command


#: typer's Python type names -> what a command line user reads (click's words)
_KINDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "Path": "PATH", "bool": ""}


def _plain_help(param: Any) -> None:
    """``--help`` without Python types: a flag shows no value (not ``<bool>``), a value its kind as click names
    it (``INTEGER``, ``PATH``; a list ``PATH...``), an argument in the usage line as ``IMAGE`` (required) or
    ``[MODEL]`` (optional), not ``{image}``. Options with a ``metavar`` keep it."""
    shown_type = str(param.display_type(None)).strip("<>")  # typer's Python type: "int", "list[Path]", "path"
    many = "..." if param.nargs != 1 or getattr(param, "multiple", False) else ""
    if shown_type.startswith("list[") and shown_type.endswith("]"):
        shown_type, many = shown_type[len("list["):-1], "..."
    kind = _KINDS.get(shown_type, shown_type.upper())
    if param.param_type_name == "argument":
        shown = f"{param.name.upper()}{many}"
        usage = shown if param.required else f"[{shown}]"
        param.display_type_rich = lambda ctx=None: f"{kind}{many}"  # the type column of the Arguments panel
        param._usage_display_name = lambda: usage
    elif getattr(param, "is_flag", False):
        param.metavar = ""
    elif param.metavar is None:
        param.metavar = f"{kind}{many}"


#: library argument -> the CLI parameter that carries it, where the names differ ("*": every command)
_CARRIED_BY: dict[str, dict[str, str]] = {
    "*": {"max_bytes": "max_memory", "queries": "query", "layers": "layer", "mask_tau": "tau",
          "upsample_mode": "upsample", "budget_bytes": "budget_mb", "max_upload": "max_upload_mb",
          "localisation_images": "localisation", "root": "data", "formats": "formats"},
    "capture": {"queries": "queries", "layers": "layers"},
    "maps": {"images": "image"},
    "view": {"images": "image"},  # a video model's frames folder (vitscope.video reads it as images)
    "train": {"config": "set_", "cfg": "set_"},
}
_PYTHON_SYNTAX = re.compile(r"\b[a-z_]+=(?:\s|[A-Za-z0-9'\"\[(])")


def _cli_error(exc: Any, argv: list[str]) -> str:
    """A library `VitscopeError` as the CLI says it: its argument named as the command's option (``max_bytes``
    -> ``--max-memory``, a training field -> ``--set depth``), and each argument its fix names (```name=value```,
    `vitscope.errors.ARGUMENT_IN_FIX`) rendered as that option too (``--checkpoint FILE``, ``--random-weights``).
    A fix left in Python syntax (``queries=None``) is replaced by a pointer to the command's help."""
    words = [a for a in argv if not a.startswith("-")]
    name = words[0] if words else ""
    command = _command().commands.get(name) if name else None  # type: ignore[attr-defined]
    if command is None:
        return _one_line(str(exc))
    params = {p.name: p for p in command.params}

    def option_of(arg: str) -> str | None:
        """The command's option (or ARGUMENT) that carries the library's ``arg``, or None."""
        if arg.startswith("-"):
            return arg
        key = _CARRIED_BY.get(name, {}).get(arg) or _CARRIED_BY["*"].get(arg, arg)
        if name == "figure" and arg == "layers" and "--layers" in argv:
            key = "layers"
        option = None
        if key in params and getattr(params[key], "opts", None):
            opts = params[key].opts
            option = next((o for o in opts if o.startswith("--")), opts[0])
            if getattr(params[key], "param_type_name", "") == "argument":
                option = key.upper()
        elif name == "train" and arg in _train_fields():
            option = f"--set {arg}"
        if name == "train" and any(a.replace("-", "_").startswith(f"{arg}=") for a in argv):  # given with --set
            option = f"--set {arg}"
        return option

    def as_option(match: re.Match[str]) -> str:
        """```checkpoint='a/b'``` -> ``--checkpoint a/b``; ```random_weights=True``` -> ``--random-weights``."""
        arg, value = match.group(1), match.group(2).strip()
        option = option_of(arg)
        if option is None:
            return match.group(0)  # not an option of this command: left in Python syntax (replaced below)
        if option.startswith("--set "):
            return f"{option}={value.strip(chr(39) + chr(34))}"
        param = params.get(_CARRIED_BY.get(name, {}).get(arg) or _CARRIED_BY["*"].get(arg, arg))
        if getattr(param, "is_flag", False) and value in ("True", "False"):
            if value == "True":
                return option
            off = getattr(param, "secondary_opts", None)
            return off[0] if off else match.group(0)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"{option} {value}"

    from vitscope.errors import ARGUMENT_IN_FIX

    option = option_of(exc.argument)
    fix = ARGUMENT_IN_FIX.sub(as_option, exc.fix) if exc.fix else exc.fix
    if fix and name != "train" and (_PYTHON_SYNTAX.search(fix) or ARGUMENT_IN_FIX.search(fix)):
        fix = f"see 'vitscope {name} --help'"
    return _one_line(f"{option or exc.argument}: {exc.problem}" + (f" ({fix})" if fix else ""))


def _train_fields() -> set[str]:
    from dataclasses import fields

    from vitscope.train.loop import TrainConfig

    return {f.name for f in fields(TrainConfig)}


_OOM = "error: out of memory (ask for less: --layers -1, --queries cls, --heads mean or a smaller --size)"


def _dispatch(argv: list[str] | None) -> tuple[int, str | None]:
    """Run the app: its exit code and the one line to print on stderr (None: nothing more to say)."""
    import os

    from vitscope.errors import VitscopeError

    try:
        with _quiet_broken_pipe():
            result = _command()(args=argv, standalone_mode=False, prog_name="vitscope")
        if result == 130:  # the framework turned a Ctrl-C into an exit code
            return 130, "interrupted"
        return (result if isinstance(result, int) and not isinstance(result, bool) else 0), None
    except Interrupted as exc:
        return 130, str(exc) or None  # empty: the command has said what it saved
    except KeyboardInterrupt:
        return 130, "interrupted"
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)), None
    except VitscopeError as exc:
        return 2, f"error: {_cli_error(exc, list(sys.argv[1:] if argv is None else argv))}"
    except MemoryError:
        return 2, _OOM
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return 2, f"error: {where}{exc.strerror or _one_line(str(exc))} (check the path, its permissions and free space)"
    except Exception as exc:
        if type(exc).__name__ == "Abort":
            return 130, "interrupted"
        if _framework_error(exc):
            return 2, _usage_line(exc)
        if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
            return 2, _OOM
        if os.environ.get("VITSCOPE_DEBUG", "") not in ("", "0"):
            import traceback

            with contextlib.suppress(Exception):
                traceback.print_exc()
        return 1, (f"error: internal error: {type(exc).__name__}: {_one_line(str(exc))[:500]} (a bug in vitscope; "
                   "VITSCOPE_DEBUG=1 shows the traceback; please report it)")


def run(argv: list[str] | None = None) -> int:
    """Run the app; return the exit code (0 ok, 2 usage/input/IO error, 130 interrupted, 1 a bug in vitscope).
    Never raises: each outcome is at most one line on stderr (``VITSCOPE_DEBUG=1`` adds a bug's traceback).

    Ctrl-C is handled here too (`vitscope._interrupt`): one that something swallowed on its way (a bare
    ``except`` around an import, a per-image error handler) still ends the run with "interrupted", 130.
    """
    from vitscope import _interrupt

    def err(line: str) -> None:
        with contextlib.suppress(Exception):
            typer.echo(line, err=True)

    try:
        with _interrupt.handling():
            code, line = _dispatch(argv)
            if code != 130 and _interrupt.requested():
                code, line = 130, "interrupted"
            if line:
                err(line)
    except KeyboardInterrupt:  # a Ctrl-C while the outcome was being said
        err("interrupted")
        code = 130
    return code


def main(argv: list[str] | None = None) -> None:
    """`run`, then exit with its code (the console script's entry is `vitscope._console.main`, which also
    handles a Ctrl-C while this module loads)."""
    code = run(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
