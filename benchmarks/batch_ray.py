"""Issue 12: the Ray engine against local batch mode, on the same images and model, in one run.

Generates ``--images`` random 224x224 images (photo-like, PNG and JPEG) and a random-weight ViT-S/16 (vitscope's
own ViT: 12 layers, 6 heads, dim 384), then times, with the same batch size and the same number of compute
threads (``--threads``, default 2 = this machine's cores):

- ``local``:          `run_batch` in a child process (DataLoader workers load, the child computes with
                      ``--threads`` threads, npz written atomically, manifest fsynced), timed from before its
                      ``import torch`` (each Ray run's actors import torch and vitscope inside the timed run)
- ``ray, 1 actor``:   `run_batch(engine="ray")`, one actor with ``num_cpus=--threads`` (its torch threads)
- ``ray, N actors``:  ``--threads`` actors with one CPU (one thread) each

All runs compute the same maps (method ``cls``, ``stats=False``: no prediction/distance extras); the Ray runs
write Parquet parts; a local Ray is started once before the timed runs (its start-up is printed separately), actor
start-up (worker process, imports, model load) is inside each timed run. Two last runs add ``stats=True`` (the
prediction, token norms and mean attention distance per image, the default of both engines) and the summary, on
each engine: the measures ride on the map's forward pass (`vitscope.batch.compute_batch`, issue 21), and the
steady rate with them is printed against the same engine's maps-only rate (target >= 85%, as local mode's).

Each run is repeated on ``--part-size`` images (one part) to separate its start-up (processes, imports, model
loads, pipeline) from its steady rate. ``--rounds`` interleaves repeats, keeping the best (the machine is shared).
Target: the Ray engine within 25% of local batch mode's throughput. Prints a markdown table.

    python benchmarks/batch_ray.py [--images 640] [--rounds 1] [--batch-size 8] [--threads 2] [--part-size 16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_images(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((224, 224), Image.Resampling.BILINEAR)
        p = root / f"set{i % 4}" / f"img{i:04d}.{'jpg' if i % 2 else 'png'}"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)


def make_model(folder: Path) -> None:
    import torch

    from vitscope.models.vit import ViT, ViTConfig, save_vit

    torch.manual_seed(0)
    save_vit(ViT(ViTConfig(image_size=(224, 224), patch_size=16, dim=384, depth=12, heads=6, num_classes=10,
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))).eval(), folder)


def run_local(src: Path, out: Path, model: Path, batch_size: int, threads: int, stats: bool) -> tuple[float, int]:
    """Local batch mode in a fresh child process (its DataLoader workers fork; the parent holds a Ray driver),
    timed inside the child from before ``import torch``: like each Ray run, which starts a fresh actor process
    that imports torch and vitscope, every timed run pays one such start-up."""
    code = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import torch; torch.set_num_threads(int(sys.argv[5]))\n"
        "from vitscope.batch import run_batch\n"
        "s = run_batch(sys.argv[1], sys.argv[2], model=sys.argv[3], batch_size=int(sys.argv[4]), workers=2,"
        " formats='npz', stats=sys.argv[6] == '1', summary=sys.argv[6] == '1', progress=False)\n"
        "print(json.dumps([time.perf_counter() - t, s.done]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(src), str(out), str(model), str(batch_size), str(threads),
                          "1" if stats else "0"], check=True, capture_output=True, text=True)
    secs, done = json.loads(res.stdout.strip().splitlines()[-1])
    return float(secs), int(done)


def _bare_forwards(model: str, batch_size: int, threads: int, repeats: int = 8) -> float:
    """Seconds for ``repeats`` forwards of one ``batch_size`` batch of random 224x224 pixels, after a warm-up."""
    import torch

    from vitscope.adapters import load

    torch.set_num_threads(threads)
    vit = load(model)
    x = torch.randn(batch_size, 3, 224, 224)
    with torch.no_grad():
        vit(x)
        t = time.perf_counter()
        for _ in range(repeats):
            vit(x)
    return time.perf_counter() - t


def compute_in_actor_vs_process(ray, model: Path, batch_size: int, threads: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Where the steady-state time goes: the same bare forwards in a Ray actor with ``num_cpus=threads`` and
    in a fresh plain process, best of two each."""
    here = str(Path(__file__).resolve().parent)

    class BareForwards:  # defined here, so Ray ships it by value; it imports this file's function in the actor
        def run(self, model: str, batch_size: int, threads: int) -> float:
            sys.path.insert(0, here)
            from batch_ray import _bare_forwards

            return _bare_forwards(model, batch_size, threads)

    actor = ray.remote(num_cpus=threads)(BareForwards).remote()
    in_actor = min(ray.get(actor.run.remote(str(model), batch_size, threads)) for _ in range(2))
    ray.kill(actor)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from batch_ray import _bare_forwards; "
            "print(min(_bare_forwards(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])) for _ in range(2)))")
    res = subprocess.run([sys.executable, "-c", code, here, str(model), str(batch_size), str(threads)],
                         check=True, capture_output=True, text=True)
    return in_actor, float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--part-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repeats of each run; the best is kept")
    ap.add_argument("--no-stats-run", action="store_true", help="skip the last run with stats=True")
    args = ap.parse_args()

    import ray
    import torch

    from vitscope.batch import run_batch

    tmp = Path(tempfile.mkdtemp(prefix="vitscope-ray-bench-"))
    try:
        src, small, model = tmp / "images", tmp / "small", tmp / "model"
        n, bs, threads, k = args.images, args.batch_size, args.threads, args.part_size
        make_images(src, n)
        make_images(small, k)  # one part: what a run costs before its first image is done
        make_model(model)
        t0 = time.perf_counter()
        ray.init(num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        names = [f"local batch mode (2 loader workers, {threads} torch threads, npz)",
                 f"ray engine, 1 actor x {threads} CPUs", f"ray engine, {threads} actors x 1 CPU"]
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # (full run, k-image run)
        stats_name = f"ray engine, {threads} actors x 1 CPU, stats=True + summary"
        local_stats_name = "local batch mode, stats=True + summary (the default)"

        def ray_run(images: Path, actors: int, cpus: float, stats: bool) -> tuple[float, int]:
            out = tmp / "out-ray"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            res = run_batch(images, out, model=model, batch_size=bs, engine="ray", concurrency=actors, num_cpus=cpus,
                            part_size=k, stats=stats, summary=stats, progress=False)
            return time.perf_counter() - t, res.done

        def local_run(images: Path, stats: bool = False) -> tuple[float, int]:
            shutil.rmtree(tmp / "out-local", ignore_errors=True)
            return run_local(images, tmp / "out-local", model, bs, threads, stats)

        runs = [lambda d: local_run(d), lambda d: ray_run(d, 1, float(threads), False),
                lambda d: ray_run(d, threads, 1.0, False)]
        for _ in range(args.rounds):
            for name, fn in zip(names, runs, strict=True):
                secs, done = fn(src)
                secs_small, done_small = fn(small)
                assert (done, done_small) == (n, k), (name, done, done_small)
                times[name].append((secs, secs_small))
        if not args.no_stats_run:
            times[local_stats_name] = [(local_run(src, True)[0], local_run(small, True)[0])]
            times[stats_name] = [(ray_run(src, threads, 1.0, True)[0], ray_run(small, threads, 1.0, True)[0])]
        in_actor, in_process = compute_in_actor_vs_process(ray, model, bs, threads)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    best = {name: min(ts) for name, ts in times.items()}
    base = best[names[0]][0] / n
    base_steady = (best[names[0]][0] - best[names[0]][1]) / (n - k)
    print(f"\n{datetime.date.today()}: {n} images 224x224, random ViT-S/16 (vitscope ViT), method cls, batch size "
          f"{bs}, part size {k}, torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} cores, best "
          f"of {args.rounds} round(s); local Ray start-up (once, not in the times): {ray_start:.1f} s\n")
    print(f"`start-up` = the same run on {k} images (one part); `steady` = the other {n - k} images' rate, "
          f"(n - {k}) / (full - start-up).\n")
    print("| run | full run s | images/s | vs local | overhead per image | start-up s | steady images/s | "
          "steady vs local |")
    print("|---|---|---|---|---|---|---|---|")
    for name in times:
        full, start = best[name]
        per, steady = full / n, (full - start) / (n - k)
        over = "" if name == names[0] else f"{1000 * (per - base):+.0f} ms"
        print(f"| {name} | {full:.1f} | {n / full:.2f} | {100 * base / per:.0f}% | {over} | {start:.1f} | "
              f"{1 / steady:.2f} | {100 * base_steady / steady:.0f}% |")
    print(f"\nCompute alone: 8 bare forwards of a batch of {bs} with {threads} torch threads take {in_actor:.2f} s in "
          f"a Ray actor (num_cpus={threads}) and {in_process:.2f} s in a plain process ({in_actor / in_process:.2f}x). "
          "The rest of a Ray run's extra time is its start-up (the `start-up s` column: new actor processes "
          "importing torch and vitscope, model loads, the pipeline) and the pipeline around the compute.")
    for with_stats, without in ((local_stats_name, names[0]), (stats_name, names[2])):
        if with_stats in best:
            rate = {name: (n - k) / (best[name][0] - best[name][1]) for name in (with_stats, without)}
            share = rate[with_stats] / rate[without]
            print(f"\nMeasures (one forward per batch): {with_stats} steady at {share:.0%} of the maps-only rate "
                  f"({'PASS' if share >= 0.85 else 'FAIL'}: target >= 85%)")
    worst = max(best[names[1]][0], best[names[2]][0]) / n
    verdict = "PASS" if base / worst >= 0.75 else "FAIL"
    print(f"\nTarget (Ray engine, same threads, within 25% of local throughput, whole runs): {verdict} "
          f"(slowest Ray run at {100 * base / worst:.0f}%)")


if __name__ == "__main__":
    main()
