"""``vitscope evaluate`` on the bundled shapes model with its own ground-truth masks: time and table.

Writes ``N`` generated test-split images (32x32, the model's size) as ``<work>/images/<class>/<i>.png`` with
masks mirroring them, runs `vitscope.evaluate` with every registered method (plus the random baseline) and
prints the table, the wall and CPU seconds (all of the process's threads), and a contention probe measured just
before and after: the model's forward throughput at batch 512, per wall second and per CPU second. On an idle
machine the two agree; on a shared one the wall figure falls below the CPU figure by the share of the cores the
run did not get, and the run's own wall time means little. `evaluate` keeps ``--threads`` cores busy (forward
passes on that many threads while the next map is computed), so on idle cores the run takes about
``max(cpu_seconds / threads, the calling thread's cpu_seconds)`` (the maps are computed on the calling thread).

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


def throughput(vit: object, batch: int = 512, reps: int = 3) -> tuple[float, float]:
    """Images per wall second and per CPU second of the model's forward pass (one intra-op thread)."""
    x = torch.randn(batch, 3, 32, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            vit(x)  # type: ignore[operator]
            t, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                vit(x)  # type: ignore[operator]
            wall, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        torch.set_num_threads(threads)
    return batch * reps / wall, batch * reps / cpu


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
    t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
    table = vitscope.evaluate(images, args.work / "out", model=vit, masks=masks, progress=False)
    wall, cpu, main_cpu = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0
    after = throughput(vit)
    print(table.to_markdown())
    print(f"images {table.meta['scored']} of {table.meta['images']}; methods {len(table.rows)} (with random)")
    n = max(1, table.meta["scored"])
    print(f"wall {wall:.1f} s, cpu {cpu:.1f} s ({cpu / n:.3f} cpu-s per image), utilisation cpu/wall "
          f"{cpu / wall:.2f} (threads {args.threads}, cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.1f})")
    for when, (w, c) in (("before", before), ("after", after)):
        print(f"contention probe {when}: forward at batch 512, {w:.0f} img per wall s, {c:.0f} img per cpu s "
              f"(share of a core this process got: {w / c:.2f})")
    estimate = max(cpu / args.threads, main_cpu)
    print(f"cpu of the calling thread (maps, metrics, records) {main_cpu:.1f} s, of the forward threads "
          f"{cpu - main_cpu:.1f} s")
    print(f"idle {args.threads}-core estimate: max(cpu / {args.threads}, calling thread's cpu) = {estimate:.1f} s "
          f"({estimate / 60:.1f} min)")


if __name__ == "__main__":
    main()
