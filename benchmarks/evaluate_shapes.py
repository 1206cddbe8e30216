"""``vitscope evaluate`` on the bundled shapes model with its own ground-truth masks: time and table.

Writes ``N`` generated test-split images (32x32, the model's size) as ``<work>/images/<class>/<i>.png`` with
masks mirroring them, runs `vitscope.evaluate` with every registered method (plus the random baseline) and
prints the table, the wall and CPU seconds, and the model's forward throughput (batch 512) measured just before
and after, so a run on a shared machine can be read against an idle one: on 2 idle cores the run takes about
``cpu_seconds / 2`` (both cores busy all along), and the throughput probe says how contended the machine was.

    PYTHONPATH=src python benchmarks/evaluate_shapes.py --images 2000 --work /tmp/evshapes2000
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_dataset(root: Path, n: int) -> tuple[Path, Path]:
    from vitscope.train.shapes import SHAPE_CLASSES, render_shape

    images, masks = root / "images", root / "masks"
    for i in range(n):
        s = render_shape(0, i, (32, 32), "test")
        for base, arr in ((images, s.image), (masks, s.mask.astype(np.uint8) * 255)):
            d = base / SHAPE_CLASSES[s.label]
            d.mkdir(parents=True, exist_ok=True)
            if not (d / f"{i:05d}.png").exists():
                Image.fromarray(arr).save(d / f"{i:05d}.png")
    return images, masks


def throughput(vit: object, batch: int = 512, reps: int = 3) -> float:
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        vit(x)  # type: ignore[operator]
        t = time.perf_counter()
        for _ in range(reps):
            vit(x)  # type: ignore[operator]
    return batch * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vitscope-evaluate-shapes"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import vitscope

    images, masks = write_dataset(args.work, args.images)
    vit = vitscope.load("vitscope:shapes")
    before = throughput(vit)
    t0, c0 = time.perf_counter(), time.process_time()
    table = vitscope.evaluate(images, args.work / "out", model=vit, masks=masks, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = throughput(vit)
    print(table.to_markdown())
    print(f"images {table.meta['scored']} of {table.meta['images']}; methods {len(table.rows)} (with random)")
    print(f"wall {wall:.1f} s, cpu {cpu:.1f} s (threads {args.threads}, cpu count {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f})")
    print(f"forward throughput at batch 512: {before:.0f} img/s before, {after:.0f} img/s after")
    print(f"idle 2-core estimate: cpu / 2 = {cpu / 2:.1f} s")


if __name__ == "__main__":
    main()
