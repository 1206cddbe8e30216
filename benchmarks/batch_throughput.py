"""Issues 6 and 21: batch mode throughput vs a bare loop of forwards, and a SIGKILL-restart check.

Generates ``--images`` random images of four sizes in nested folders, a random-weight ViT-S/16 (vitscope's own
ViT: 12 layers, 6 heads, dim 384), and measures, with the same batch size and the same size grouping:

- ``bare forwards``:   images preloaded and preprocessed beforehand, only ``model(pixels)`` is timed
- ``load + forward``:  a plain sequential loop that loads, preprocesses and runs each batch
- ``vitscope batch``:  `run_batch` (DataLoader workers, [CLS] maps of the last layer, npz + png written
  atomically, manifest fsynced per image), with ``stats=False`` (maps only) and with the default per-image
  measures and summary (read from the map's own forward pass: one forward per batch)

The three are interleaved ``--repeats`` times (bare, --no-stats, default, bare, ...) and each figure is the median,
so a machine whose speed drifts affects them alike. Targets: ``--no-stats`` >= 90% and the default >= 85% of the
bare forwards' throughput.

The compute alone (no loading, no writing), per pass over the preloaded batches: CPU time of this process
(`time.process_time`: every thread's, so the measures' distance reductions count wherever they run; what the
forward pass and the method cost, whatever else the machine runs) and wall time, for a bare forward,
`compute_batch` without and with the per-image measures, and the previous way (the map, then the measures in a
second forward pass), and the measures reduced inside the forward pass. With a spare core (torch threads <
cores, and a load average that leaves one idle) the default reduces each layer's distances on a thread of
their own beside the forward (`vitscope.batch.stats.spare_core`): CPU time then exceeds wall time.

Then ``vitscope batch`` runs as a CLI subprocess, is SIGKILLed midway and restarted: every output must be present
and loadable, equal to a direct computation, and each image finished exactly once in the manifest.

    python benchmarks/batch_throughput.py [--images 500] [--batch-size 8] [--workers 2] [--repeats 3]
        [--no-kill] [--no-compute]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _common as C
import numpy as np

SIZES = [(224, 224), (192, 256), (256, 192), (240, 320)]  # (height, width), all multiples of 16


def make_images(root: Path, n: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)  # smooth, photo-like content
        p = root / f"set{i % 5}" / f"img{i:04d}.{'jpg' if i % 2 else 'png'}"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)
        paths.append(p)
    return paths


def make_model(folder: Path):  # type: ignore[no-untyped-def]
    import torch

    from vitscope.models.vit import ViT, ViTConfig, save_vit

    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=(224, 224), patch_size=16, dim=384, depth=12, heads=6, num_classes=0,
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))).eval()
    save_vit(model, folder)
    return model


def grouped(paths: list[Path], vit, batch_size: int) -> list[list[Path]]:  # type: ignore[no-untyped-def]
    """The batches batch mode forms: inputs in order, grouped by preprocessed size."""
    from PIL import Image

    from vitscope.images import _target_size

    buckets: dict[tuple[int, int], list[Path]] = {}
    batches = []
    for p in paths:
        with Image.open(p) as im:
            key = _target_size(im.width, im.height, vit.info.preprocess, vit.info.patch_size, "native", None)
        bucket = buckets.setdefault(key, [])
        bucket.append(p)
        if len(bucket) == batch_size:
            batches.append(buckets.pop(key))
    batches.extend(b for b in buckets.values() if b)
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each timed run")
    ap.add_argument("--no-kill", action="store_true", help="skip the SIGKILL-restart check")
    ap.add_argument("--no-compute", action="store_true", help="skip the compute-only table")
    ap.add_argument("--keep", action="store_true", help="keep the generated images and outputs")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import vitscope
    from vitscope.batch import run_batch

    tmp = Path(tempfile.mkdtemp(prefix="vitscope-bench-"))
    src = tmp / "images"
    paths = make_images(src, args.images)
    module = make_model(tmp / "model")
    vit = vitscope.wrap(module)
    batches = grouped(paths, vit, args.batch_size)
    print(f"# batch throughput, {datetime.date.today()}; machine: {C.machine()}; threads {args.threads}")
    print(f"# {len(paths)} images of {len(SIZES)} sizes, {len(batches)} batches of <= {args.batch_size}, "
          f"ViT-S/16 (random weights), method cls, formats npz+png, workers {args.workers}")

    pixels = [vit.preprocess([str(p) for p in b], policy="native") for b in batches]

    def bare() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            for x in pixels:
                vit(x)
            return time.perf_counter() - t0

    def batch_run(stats: bool, k: int) -> float:
        summary = run_batch(src, tmp / f"out-{int(stats)}-{k}", model=vit, policy="native",
                            batch_size=args.batch_size, workers=args.workers, progress=False, stats=stats)
        assert summary.done == len(paths), summary
        assert not stats or summary.summary["images"] == len(paths), summary
        return float(summary.seconds)

    cpu: dict[str, list[float]] = {"bare": [], "no-stats": [], "default": []}
    load: dict[str, list[float]] = {"bare": [], "no-stats": [], "default": []}

    def timed(name: str, fn) -> float:  # type: ignore[no-untyped-def]
        """``fn()``'s seconds; its CPU seconds (this process and its loader workers) and the machine's 1-minute
        load average before it are kept beside."""
        load[name].append(os.getloadavg()[0])
        c0 = cpu_seconds()
        seconds = float(fn())
        cpu[name].append(cpu_seconds() - c0)
        return seconds

    bare()  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            vit(vit.preprocess([str(p) for p in b], policy="native"))
    t_loop = time.perf_counter() - t0
    runs: dict[str, list[float]] = {"bare": [], "no-stats": [], "default": []}
    for k in range(args.repeats):  # interleaved: bare, --no-stats, default, bare, ...
        runs["bare"].append(timed("bare", bare))
        runs["no-stats"].append(timed("no-stats", lambda: batch_run(False, k)))  # noqa: B023 (called at once)
        runs["default"].append(timed("default", lambda: batch_run(True, k)))  # noqa: B023
    med = {name: statistics.median(ts) for name, ts in runs.items()}
    # per round: bare time / batch time (throughput ratio), then the median over rounds
    ratio = {name: statistics.median(b / t for b, t in zip(runs["bare"], runs[name], strict=True))
             for name in ("no-stats", "default")}

    n = len(paths)
    print(f"## end to end: median of {args.repeats} interleaved repeats (wall clock; CPU: this process and its "
          "loader workers, all threads; load: the machine's 1-minute load average before each run, per repeat)")
    print("| run | seconds | images/s | throughput vs bare forwards (spread over repeats) | CPU s | load |")
    print("|---|---|---|---|---|---|")

    def spread(name: str) -> str:
        rs = [b / t for b, t in zip(runs["bare"], runs[name], strict=True)]
        return f"{min(rs):.1%}-{max(rs):.1%}"

    def usage(name: str) -> str:
        return f"{statistics.median(cpu[name]):.1f} | {' '.join(f'{x:.1f}' for x in load[name])}"

    print(f"| bare forwards (preloaded) | {med['bare']:.1f} | {n / med['bare']:.2f} | 100.0% | {usage('bare')} |")
    print(f"| load + forward loop (once) | {t_loop:.1f} | {n / t_loop:.2f} | {med['bare'] / t_loop:.1%} | | |")
    print(f"| vitscope batch --no-stats (maps only) | {med['no-stats']:.1f} | {n / med['no-stats']:.2f} | "
          f"{ratio['no-stats']:.1%} ({spread('no-stats')}) | {usage('no-stats')} |")
    print(f"| vitscope batch (default: + per-image measures, summary.json) | {med['default']:.1f} | "
          f"{n / med['default']:.2f} | {ratio['default']:.1%} ({spread('default')}) | {usage('default')} |")
    for name, target in (("no-stats", 0.90), ("default", 0.85)):
        verdict = "PASS" if ratio[name] >= target else "FAIL"
        print(f"batch {name} throughput = {ratio[name]:.1%} of bare forwards (target >= {target:.0%}): {verdict}")
    if not args.no_compute:
        compute_cost(vit, pixels, args.repeats)
    pixels.clear()

    try:
        if not args.no_kill:
            kill_check(src, tmp, paths, vit, args)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread) and of its finished children (the DataLoader's
    workers, reaped when a run ends)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compute_cost(vit, pixels, repeats: int) -> None:  # type: ignore[no-untyped-def]
    """CPU time of this process (every thread) and wall time per pass over the preloaded batches: bare forwards,
    `compute_batch` (cls) without and with the measures, and the previous two-pass way; interleaved, medians."""
    import torch

    from vitscope.batch import compute_batch
    from vitscope.batch.stats import image_statistics, spare_core
    from vitscope.methods.api import get_method

    cls = get_method("cls")

    def bare(x):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            vit(x)

    def two_pass(x):  # type: ignore[no-untyped-def]
        compute_batch(vit, x, cls, stats=False)
        image_statistics(vit, x)

    ways = {"bare forward": bare, "cls map (--no-stats)": lambda x: compute_batch(vit, x, cls, stats=False),
            "cls map + measures, one pass (default)": lambda x: compute_batch(vit, x, cls),
            "cls map + measures, one pass, reduced inside the forward (no spare core)":
                lambda x: compute_batch(vit, x, cls, background=False),
            "cls map, then measures in a second pass (before)": two_pass}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    wall: dict[str, list[float]] = {name: [] for name in ways}
    for fn in ways.values():
        fn(pixels[0])  # warm-up (and the per-model probes)
    for _ in range(repeats):
        for name, fn in ways.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for x in pixels:
                fn(x)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    base_c, base_w = statistics.median(cpu["bare forward"]), statistics.median(wall["bare forward"])
    beside = "beside the forward, on a spare core" if spare_core(pixels[0].device) else "inside the forward"
    print(f"## compute only: CPU seconds of this process (all threads) and wall seconds, median of {repeats} "
          f"interleaved repeats (measures' distances reduced {beside})")
    print("| per pass over every batch | CPU s | bare / this (CPU) | wall s | bare / this (wall) |")
    print("|---|---|---|---|---|")
    for name in ways:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"| {name} | {c:.2f} | {base_c / c:.1%} | {w:.2f} | {base_w / w:.1%} |")


def kill_check(src: Path, tmp: Path, paths: list[Path], vit, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    from vitscope.batch import collect_inputs, output_bases
    from vitscope.capture import capture
    from vitscope.methods.cls_attention import cls_map

    out = tmp / "killed"
    cmd = [sys.executable, "-m", "vitscope", "batch", str(src), "-o", str(out), "--model", str(tmp / "model"),
           "--policy", "native", "--batch-size", str(args.batch_size), "--workers", str(args.workers), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    manifest = out / "manifest.jsonl"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = int(0.4 * len(paths))
    while proc.poll() is None:
        if manifest.exists() and manifest.read_text().count('"status": "ok"') >= target:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    before = sum(1 for line in manifest.read_text().splitlines() if '"status": "ok"' in line)
    leftovers = len(list(out.rglob("*.part")))
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    t_resume = time.perf_counter() - t0
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    ok = Counter(e["rel"] for e in entries if e["status"] == "ok")
    rels = {p.relative_to(src).as_posix() for p in paths}
    bases = output_bases(collect_inputs(src))  # where batch writes each input's outputs
    loadable = 0
    for rel in rels:
        with np.load(out / f"{bases[rel]}.cls.npz") as data:
            data["map"]
            loadable += 1
    sample = paths[:: max(1, len(paths) // 25)]
    max_err = 0.0
    for p in sample:
        with np.load(out / f"{bases[p.relative_to(src).as_posix()]}.cls.npz") as data:
            direct = cls_map(capture(vit, str(p), layers=[-1], queries="cls", policy="native"))[0].numpy()
            max_err = max(max_err, float(np.abs(data["map"] - direct).max()))
    checks = {
        "killed midway": 0 < before < len(paths),
        "restart exit code 0": rc.returncode == 0,
        "every image ok exactly once": set(ok) == rels and set(ok.values()) == {1},
        "every npz loadable": loadable == len(rels),
        "no .part files left": not list(out.rglob("*.part")),
        f"sampled maps equal direct capture (max err {max_err:.1e})": max_err < 1e-5,
        "summary.json covers every image": json.loads((out / "summary.json").read_text())["images"] == len(paths),
    }
    print(f"SIGKILL after {before}/{len(paths)} images ({leftovers} temp file(s) left by the kill); "
          f"restart finished the rest in {t_resume:.1f} s: {rc.stdout.strip()}")
    for name, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}: {name}")


if __name__ == "__main__":
    main()
