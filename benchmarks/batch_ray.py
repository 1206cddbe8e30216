"""Issue 12: the Ray engine against local batch mode, on the same images and model, in one run.

Generates ``--images`` random 224x224 images (photo-like, PNG and JPEG) and a random-weight ViT-S/16 (vitscope's
own ViT: 12 layers, 6 heads, dim 384), then times, with the same batch size and the same number of compute
threads (``--threads``, default 2 = this machine's cores):

- ``local``:          `run_batch` (DataLoader workers load, this process computes with ``--threads`` threads,
                      npz + png written atomically, manifest fsynced)
- ``ray, 1 actor``:   `run_batch(engine="ray")`, one actor with ``num_cpus=--threads`` (its torch threads)
- ``ray, N actors``:  ``--threads`` actors with one CPU (one thread) each

The Ray runs compute the same maps (method ``cls``, ``stats=False``: no prediction/distance extras) and write
Parquet parts; a local Ray is started once before the timed runs (its start-up is printed separately), actor
start-up (worker process, imports, model load) is inside each timed run. A last run adds ``stats=True`` (the
prediction, token norms and mean attention distance per image) and the engine-side summary, for reference.

Target: the Ray engine within 25% of local batch mode's throughput. Prints a markdown table.

    python benchmarks/batch_ray.py [--images 160] [--batch-size 8] [--threads 2] [--part-size 32]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
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

    from vitscope.train.model import ViT, ViTConfig, save_vit

    torch.manual_seed(0)
    save_vit(ViT(ViTConfig(image_size=(224, 224), patch_size=16, dim=384, depth=12, heads=6, num_classes=10,
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))).eval(), folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--part-size", type=int, default=32)
    ap.add_argument("--no-stats-run", action="store_true", help="skip the last run with stats=True")
    args = ap.parse_args()

    import torch

    from vitscope.batch import run_batch

    tmp = Path(tempfile.mkdtemp(prefix="vitscope-ray-bench-"))
    try:
        src, model = tmp / "images", tmp / "model"
        make_images(src, args.images)
        make_model(model)
        n, bs, threads = args.images, args.batch_size, args.threads
        rows: list[tuple[str, float, int]] = []

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        local = run_batch(src, tmp / "out-local", model=model, batch_size=bs, workers=2, progress=False)
        rows.append((f"local batch mode (2 loader workers, {threads} torch threads)", time.perf_counter() - t0,
                     local.done))

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        configs = [(f"ray engine, 1 actor x {threads} CPUs", 1, float(threads), False),
                   (f"ray engine, {threads} actors x 1 CPU", threads, 1.0, False)]
        if not args.no_stats_run:
            configs.append((f"ray engine, {threads} actors x 1 CPU, stats=True + summary", threads, 1.0, True))
        for name, actors, cpus, stats in configs:
            t0 = time.perf_counter()
            res = run_batch(src, tmp / f"out-{actors}-{stats}", model=model, batch_size=bs, engine="ray",
                            concurrency=actors, num_cpus=cpus, part_size=args.part_size, stats=stats,
                            summary=stats, progress=False)
            rows.append((name, time.perf_counter() - t0, res.done))
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = rows[0][1] / rows[0][2]
    print(f"\n{datetime.date.today()}: {n} images 224x224, random ViT-S/16 (vitscope ViT), method cls, batch size "
          f"{bs}, part size {args.part_size}, torch {torch.__version__}, ray {ray.__version__}, "
          f"{os.cpu_count()} cores; local Ray start-up (not in the times below): {ray_start:.1f} s\n")
    print("| run | seconds | images/s | vs local | overhead per image |")
    print("|---|---|---|---|---|")
    for name, secs, done in rows:
        per = secs / done
        over = "" if name.startswith("local") else f"{1000 * (per - base):+.0f} ms"
        print(f"| {name} | {secs:.1f} | {done / secs:.2f} | {100 * base / per:.0f}% | {over} |")
    worst = max(secs / done for name, secs, done in rows[1:3])
    verdict = "PASS" if base / worst >= 0.75 else "FAIL"
    print(f"\nTarget (Ray engine, same threads, within 25% of local throughput): {verdict} "
          f"(slowest Ray run at {100 * base / worst:.0f}%)")


if __name__ == "__main__":
    main()
