"""The smoke program of the wheel check (`.ci/wheel_check.py`): run inside a fresh venv that holds only the
built wheel and its declared dependencies (core, or core plus one extra), from a folder outside the
repository.

It reads what to cover from the *installed* package, so nothing new slips by: every subcommand of the
``vitscope`` app (a subcommand without a step in `COMMAND_STEPS` is itself a failing step) and every method of
the registry (each through ``vitscope maps --method M``). Each model family that needs an optional package
loads where its package is installed, and (in the core venv) is refused with the one-line ``pip install ...``
error, exit 2, no traceback, where it is not.

A step fails on an exit code other than the expected one, a traceback, "No module named" anywhere in its
output, a missing expected line, or (for an expected usage error) more than one line on stderr.

Run: ``python wheel_smoke.py --work DIR --results results.json`` (the check does this); ``--list`` prints the
plan without running it. Standard library only (plus the installed vitscope), so it runs in any of the venvs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

#: output that means an import (or anything else) blew up, whatever the exit code says
BAD_OUTPUT = ("Traceback (most recent call last)", "No module named", "internal error")


@dataclass
class Step:
    """One command of the smoke run and what it must give."""

    name: str  # what the summary table shows, e.g. "maps --method flow"
    argv: list[str]  # after the program: ``["maps", "img.png", ...]``; for kind "python", the code to run
    expect_rc: int = 0
    expect: list[str] = field(default_factory=list)  # substrings of stdout + stderr
    one_line_error: bool = False  # exit 2 with exactly one line on stderr
    kind: str = "cli"  # "cli" (the vitscope console script), "python" (python -c), "serve"
    covers: str = ""  # "command:<name>", "method:<name>", "family:<name>" (what the coverage test reads)
    timeout: float = 600.0


@dataclass
class Family:
    """A model family (or engine) that needs an optional distribution."""

    name: str
    dists: tuple[str, ...]  # installed when all of these are
    hint: str  # the install command the one-line error must name
    load: Callable[[Path], list[Step]]  # the steps that show it loads, given the work folder
    refuse: Callable[[Path], Step]  # the step that shows it is refused when absent


def _tiny_hf(work: Path) -> list[Step]:
    folder = work / "hf-tiny"
    build = (
        "import torch, transformers\n"
        "torch.manual_seed(0)\n"
        "cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,\n"
        "    intermediate_size=64, image_size=32, patch_size=8, num_labels=3)\n"
        f"transformers.ViTForImageClassification(cfg).save_pretrained({str(folder)!r})\n"
    )
    spec = f"hf:{folder}"
    return [
        Step("hf: save a tiny ViT", [build], kind="python", covers="family:hf"),
        Step("hf: maps rollout", ["maps", "img.png", "--model", spec, "--method", "rollout", "-o", "hf/rollout.npz"],
             expect=["wrote"], covers="family:hf"),
    ]


def _tiny_mat(work: Path) -> list[Step]:
    """ImageNet-Segmentation's layout in a two-image v7.3 .mat (HDF5 references), scored by ``evaluate``."""
    path = work / "gtsegs_tiny.mat"
    build = (
        "import h5py, numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        f"with h5py.File({str(path)!r}, 'w') as f:\n"
        "    r = f.create_group('#refs#'); imgs, gts = [], []\n"
        "    for i in range(2):\n"
        "        d = r.create_dataset(f'i{i}', data=rng.integers(0, 256, (3, 40, 32), dtype=np.uint8))\n"
        "        g = r.create_dataset(f'g{i}', data=(rng.random((40, 32)) < 0.5).astype(np.uint8))\n"
        "        c = r.create_dataset(f'c{i}', data=np.array([[g.ref]], dtype=h5py.ref_dtype))\n"
        "        imgs.append([d.ref]); gts.append([c.ref])\n"
        "    v = f.create_group('value')\n"
        "    v.create_dataset('img', data=np.array(imgs, dtype=h5py.ref_dtype))\n"
        "    v.create_dataset('gt', data=np.array(gts, dtype=h5py.ref_dtype))\n"
    )
    return [
        Step("evaluate: write a tiny gtsegs .mat", [build], kind="python", covers="family:evaluate"),
        Step("evaluate: gtsegs .mat", ["evaluate", str(path), "-o", "eval-mat", "--methods", "cls",
                                       "--sanity-images", "0", "--deletion-steps", "2", "--quiet"],
             expect=["| cls |", "2 of 2 images scored"], covers="family:evaluate"),
    ]


def _mat_refused(work: Path) -> Step:
    path = work / "not-read.mat"
    path.write_bytes(b"a .mat only h5py can open")
    return Step("evaluate: refused without it", ["evaluate", str(path), "-o", "eval-refused", "--quiet"],
                expect_rc=2, expect=["pip install 'vitscope[evaluate]'"], one_line_error=True,
                covers="family:evaluate")


def _tiny_video(work: Path) -> list[Step]:
    """A tiny VideoMAE (4 frames of 32 px), a lossless clip written with PyAV and a frames folder: maps of the
    clip, then batch over the folder holding both."""
    folder, videos = work / "videomae-tiny", work / "videos"
    build = (
        "import av, numpy as np, torch, transformers\n"
        "from pathlib import Path\n"
        "from PIL import Image\n"
        "torch.manual_seed(0)\n"
        "cfg = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2,\n"
        "    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)\n"
        f"transformers.VideoMAEModel(cfg).save_pretrained({str(folder)!r})\n"
        f"videos = Path({str(videos)!r}); (videos / 'frames').mkdir(parents=True, exist_ok=True)\n"
        "rng = np.random.default_rng(0)\n"
        "frames = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)\n"
        "with av.open(str(videos / 'clip.mkv'), 'w') as c:\n"
        "    s = c.add_stream('ffv1', rate=10); s.width = s.height = 32; s.pix_fmt = 'bgr0'\n"
        "    for f in frames:\n"
        "        for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(p)\n"
        "    for p in s.encode(): c.mux(p)\n"
        "for i, f in enumerate(frames): Image.fromarray(f).save(videos / 'frames' / f'{i:02d}.png')\n"
    )
    spec = f"hf:{folder}"
    return [
        Step("video: save a tiny VideoMAE and a clip", [build], kind="python", covers="family:video"),
        Step("video: maps of a video file", ["maps", str(videos / "clip.mkv"), "--model", spec, "-o",
                                             "video/clip.npz"], expect=["maps 2 frames x 4x4", "wrote"],
             covers="family:video"),
        Step("video: batch over a video folder", ["batch", str(videos), "-o", "video-batch", "--model", spec,
                                                  "--workers", "0", "--quiet", "--device", "cpu"],
             expect=["2 done", "0 failed"], covers="family:video"),
    ]


def _video_refused(work: Path) -> Step:
    clip = work / "not-read.mp4"
    clip.write_bytes(b"a video file only PyAV can open")
    code = (  # the library's one-line error on stderr, exit 2 (as the CLI says a refused family)
        "import sys\n"
        "from vitscope.errors import VitscopeError\n"
        "from vitscope.video import read_video\n"
        f"try:\n    read_video({str(clip)!r}, 4)\n"
        "except VitscopeError as exc:\n    print(f'error: {exc}', file=sys.stderr)\n    sys.exit(2)\n"
    )
    return Step("video: refused without it", [code], kind="python", expect_rc=2,
                expect=["pip install 'vitscope[video]'"], one_line_error=True, covers="family:video")


def _loads(family: str, spec: str, *extra: str, method: str = "rollout") -> Callable[[Path], list[Step]]:
    def steps(_work: Path) -> list[Step]:
        return [
            Step(f"{family}: maps {method}", ["maps", "img.png", "--model", spec, *extra, "--method", method,
                                              "-o", f"{family}/{method}.npz"], expect=["wrote"],
                 covers=f"family:{family}"),
        ]

    return steps


def _refused(family: str, argv: list[str], hint: str) -> Callable[[Path], Step]:
    def step(_work: Path) -> Step:
        return Step(f"{family}: refused without it", argv, expect_rc=2, expect=[hint], one_line_error=True,
                    covers=f"family:{family}")

    return step


def _hf_refused(work: Path) -> Step:
    # a folder that only transformers can load: its config.json is not vitscope's
    folder = work / "hf-config-only"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    return Step("hf: refused without it", ["info", "--model", f"hf:{folder}"], expect_rc=2,
                expect=["pip install 'vitscope[hf]'"], one_line_error=True, covers="family:hf")


FAMILIES: tuple[Family, ...] = (
    Family("hf", ("transformers",), "pip install 'vitscope[hf]'", _tiny_hf, _hf_refused),
    Family("timm", ("timm",), "pip install 'vitscope[timm]'",
           _loads("timm", "timm:vit_tiny_patch16_224", "--random-weights"),
           _refused("timm", ["info", "--model", "timm:vit_tiny_patch16_224", "--random-weights"],
                    "pip install 'vitscope[timm]'")),
    Family("open_clip", ("open_clip_torch",), "pip install 'vitscope[open_clip]'",
           _loads("open_clip", "open_clip:ViT-B-32", "--random-weights"),
           _refused("open_clip", ["info", "--model", "open_clip:ViT-B-32", "--random-weights"],
                    "pip install 'vitscope[open_clip]'")),
    Family("torchvision", ("torchvision",), "pip install 'vitscope[torchvision]'",
           _loads("torchvision", "torchvision:vit_b_16", "--random-weights"),
           _refused("torchvision", ["info", "--model", "torchvision:vit_b_16", "--random-weights"],
                    "pip install 'vitscope[torchvision]'")),
    Family("lrp", ("lxt", "torchvision"), "pip install 'vitscope[lrp]'",
           _loads("lrp", "torchvision:vit_b_16", "--random-weights", method="attnlrp"),
           _refused("lrp", ["maps", "img.png", "--method", "attnlrp", "-o", "lrp/refused.npz"],
                    "pip install 'vitscope[lrp]'")),
    Family("ray", ("ray", "pyarrow"), "pip install 'vitscope[ray]'",
           lambda _w: [Step("ray: batch --engine ray", ["batch", "imgs", "-o", "ray-out", "--engine", "ray",
                                                        "--method", "cls", "--quiet"],
                            expect=["2 done", "0 failed"], covers="family:ray", timeout=900)],
           _refused("ray", ["batch", "imgs", "-o", "ray-out", "--engine", "ray", "--quiet"],
                    "pip install 'vitscope[ray]'")),
    Family("evaluate", ("h5py",), "pip install 'vitscope[evaluate]'", _tiny_mat, _mat_refused),
    Family("video", ("av", "transformers"), "pip install 'vitscope[video]'", _tiny_video, _video_refused),
)


#: methods that need an optional package: (its distributions, the install hint without them, the refusal
#: the bundled model gets with them); their own family above shows them work
METHOD_EXTRAS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "attnlrp": (("lxt", "torchvision"), "pip install 'vitscope[lrp]'", "only vision table is torchvision"),
}


def _figure_steps() -> list[Step]:
    from vitscope.viz.make import KINDS

    steps = []
    for kind in KINDS:
        images = ["img.png", "img2.png"] if kind == "batch" else ["img.png"]
        steps.append(Step(f"figure {kind}", ["figure", kind, *images, "-o", f"fig/{kind}.png"], expect=["wrote"],
                          covers="command:figure"))
    return steps


#: subcommand -> the steps that run it (in this order; later steps may use what earlier ones wrote)
COMMAND_STEPS: dict[str, Callable[[], list[Step]]] = {
    "info": lambda: [Step("info", ["info"], expect=["prefix tokens"]),
                     Step("info --json", ["info", "--json"], expect=['"num_layers"'])],
    "capture": lambda: [Step("capture", ["capture", "img.png", "-o", "cap.npz"], expect=["wrote"])],
    "methods": lambda: [Step("methods", ["methods"], expect=["rollout"])],
    "maps": lambda: [],  # one step per registered method, below
    "train": lambda: [Step("train 1 step", ["train", "-o", "run", "--max-steps", "1", "--no-progress"],
                           expect=["finished at step 1"])],
    "report": lambda: [Step("report (run of 1 step)", ["report", "run", "-o", "report", "--images", "16",
                                                       "--localisation", "4", "--samples", "2"],
                            expect=["wrote report"])],
    "figure": _figure_steps,
    "view": lambda: [Step("view", ["view", "img.png", "-o", "view.html"], expect=["wrote"])],
    "serve": lambda: [Step("serve + one request", ["serve", "--port", "0"], kind="serve", expect_rc=130,
                           expect=["vitscope viewer at"])],
    "demo": lambda: [Step("demo", ["demo", "-o", "demo"], expect=["viewer"])],
    "batch": lambda: [Step("batch (local)", ["batch", "imgs", "-o", "batch-out", "--workers", "0", "--quiet"],
                           expect=["2 done", "0 failed"])],
    "evaluate": lambda: [Step("evaluate (local)", ["evaluate", "imgs", "-o", "eval-out", "--methods", "cls",
                                                   "--sanity-images", "1", "--deletion-steps", "2", "--quiet"],
                              expect=["| cls |", "| random |", "2 of 2 images scored"])],
}


def subcommands() -> list[str]:
    """The subcommands of the installed ``vitscope`` app, as typer registers them."""
    import typer

    from vitscope.cli import app

    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def method_names() -> list[str]:
    """The registered methods of the installed vitscope."""
    from vitscope.methods.api import method_names as names

    return list(names())


def installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def plan(work: Path, core: bool = True, is_installed: Callable[[str], bool] = installed) -> list[Step]:
    """Every step of the smoke run: (with ``core``) each subcommand and each registered method; then each
    optional family: loaded when its distributions are installed, else (with ``core``) refused."""
    steps = [Step("--version", ["--version"], expect=["vitscope "]), Step("--help", ["--help"])]
    if core:
        commands = subcommands()
        for command in [c for c in COMMAND_STEPS if c in commands] + [c for c in commands if c not in COMMAND_STEPS]:
            make = COMMAND_STEPS.get(command)
            if make is None:  # fails the run: a new subcommand needs its smoke step
                steps.append(Step(f"{command}: NO SMOKE STEP (add one to .ci/wheel_smoke.py COMMAND_STEPS)",
                                  ["__missing__"], covers=f"command:{command}"))
                continue
            for step in make():
                step.covers = step.covers or f"command:{command}"
                steps.append(step)
        for method in method_names():
            argv = ["maps", "img.png", "--method", method, "-o", f"maps/{method}.npz"]
            dists = METHOD_EXTRAS.get(method)
            if dists is None:
                steps.append(Step(f"maps --method {method}", argv, expect=[f"{method} map", "wrote"],
                                  covers=f"method:{method}"))
            else:  # refused on the bundled model: not installed, or (installed) not a family the package patches
                hint, why = dists[1], dists[2]
                ok = all(is_installed(d) for d in dists[0])
                steps.append(Step(f"maps --method {method} (refused)", argv, expect_rc=2, one_line_error=True,
                                  expect=[why if ok else hint], covers=f"method:{method}"))
    for family in FAMILIES:
        if all(is_installed(d) for d in family.dists):
            steps.extend(family.load(work))
        elif core:  # (an extra's venv only shows what the extra adds)
            steps.append(family.refuse(work))
    return steps


def make_inputs(work: Path) -> None:
    """A few small PNGs: img.png, img2.png and imgs/ (two images) for batch."""
    from PIL import Image, ImageDraw

    (work / "imgs").mkdir(parents=True, exist_ok=True)
    for i, path in enumerate([work / "img.png", work / "img2.png", work / "imgs" / "a.png", work / "imgs" / "b.png"]):
        im = Image.new("RGB", (64 + 8 * i, 48), (20, 30 + 20 * i, 40))
        draw = ImageDraw.Draw(im)
        draw.ellipse((6 + 4 * i, 6, 36 + 4 * i, 36), fill=(220, 60, 40))
        draw.rectangle((40, 20, 58, 44), fill=(40, 200, 90))
        im.save(path)


def judge(step: Step, rc: int | None, out: str, err: str) -> str:
    """'' when the step did what it must, else why not (one line)."""
    both = out + "\n" + err
    if rc != step.expect_rc:
        return f"exit {rc}, expected {step.expect_rc}"
    for bad in BAD_OUTPUT:
        if bad in both:
            return f"output has {bad!r}"
    for want in step.expect:
        if want not in both:
            return f"output lacks {want!r}"
    if step.one_line_error:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if len(lines) != 1:
            return f"expected one line on stderr, got {len(lines)}"
    return ""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0")
    return env


def _serve(step: Step, vitscope: str, work: Path) -> tuple[int | None, str, str]:
    """Start ``vitscope serve``, GET its page once, then Ctrl-C it: (exit code, stdout, stderr)."""
    proc = subprocess.Popen([vitscope, *step.argv], cwd=work, env=_clean_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out, note = "", ""
    watchdog = threading.Timer(step.timeout, proc.kill)  # a server that never says its address
    watchdog.start()
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        out += line
        if "vitscope viewer at " in line:
            url = line.split("vitscope viewer at ", 1)[1].split()[0]
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    page = resp.read()
                if resp.status != 200 or b"<html" not in page.lower():
                    note = f"GET {url}: status {resp.status}, {len(page)} bytes, no page\n"
            except OSError as exc:
                note = f"GET {url} failed: {exc}\n"
            break
    watchdog.cancel()
    proc.send_signal(signal.SIGINT)
    try:
        rest, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, err = proc.communicate()
        err += "\n(serve did not stop on Ctrl-C within 60 s)"
        return None, out + rest, err
    if note:  # a failed request fails the step through its exit code
        return -1, out + rest, note + err
    return proc.returncode, out + rest, err


def run_step(step: Step, work: Path) -> tuple[str, float, str]:
    """Run one step in ``work``: (why it failed or '', seconds, the tail of its output)."""
    bindir = Path(sys.executable).parent
    vitscope = str(bindir / "vitscope")
    start = time.monotonic()
    if step.argv == ["__missing__"]:
        return "no smoke step for this subcommand", 0.0, ""
    try:
        if step.kind == "serve":
            rc, out, err = _serve(step, vitscope, work)
        else:
            argv = [sys.executable, "-c", step.argv[0]] if step.kind == "python" else [vitscope, *step.argv]
            res = subprocess.run(argv, cwd=work, env=_clean_env(), capture_output=True, text=True,
                                 timeout=step.timeout, stdin=subprocess.DEVNULL)
            rc, out, err = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = None, str(exc.stdout or ""), f"timed out after {step.timeout:.0f} s"
    seconds = time.monotonic() - start
    why = judge(step, rc, out, err)
    tail = "\n".join((out.strip().splitlines() + err.strip().splitlines())[-12:])
    return why, seconds, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Folder to run in (outside the repository).")
    parser.add_argument("--results", type=Path, help="Write each step's outcome here as JSON.")
    parser.add_argument("--no-core", action="store_true", help="Only the families (and --help, --version).")
    parser.add_argument("--select", help="Comma-separated words: run only the steps whose name has one (debugging).")
    parser.add_argument("--list", action="store_true", help="Print the plan and exit.")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = plan(work, core=not args.no_core)
    if args.select:
        words = [w for w in args.select.split(",") if w]
        steps = [s for s in steps if any(w in s.name for w in words)]
    if args.list:
        for step in steps:
            print(f"{step.covers:<24} {step.name}")
        return 0
    make_inputs(work)
    results = []
    for step in steps:
        why, seconds, tail = run_step(step, work)
        print(f"{'ok  ' if not why else 'FAIL'} {seconds:6.1f}s  {step.name}" + (f"  -- {why}" if why else ""),
              flush=True)
        if why:
            print("       | " + tail.replace("\n", "\n       | "), flush=True)
        results.append({**asdict(step), "ok": not why, "why": why, "seconds": round(seconds, 1), "tail": tail})
    if args.results:
        args.results.write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
