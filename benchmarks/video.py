"""Issue 22: the [CLS] maps of a video ViT against the model's plain forward, in one run (ratios count).

Models (random weights, built from configs, saved and loaded through ``vitscope.load("hf:<folder>")``, SDPA):

- VideoMAE-S: 16 frames at 224 px, tubelet 2, patch 16 (8 x 14 x 14 = 1568 tokens), 12 layers x 6 heads, dim 384.
  It has no [CLS]: its map is the default query's (the mean over every patch row), ``vitscope.video_maps(vit,
  x, "cls")`` (the last layer's rows, every head, split per frame, with the temporal profile).
- ViViT-S (the same geometry plus [CLS]): ``vitscope.capture(vit, x, queries="cls")``, the [CLS] rows of every
  layer and head, as benchmarks/speed.py's ``cls_maps``, and ``video_maps(vit, x, "cls")``.

Target: maps <= 1.10x the plain forward. Times: median of ``--repeats`` interleaved rounds after one warm-up (the
layout probe runs once per model and geometry, in the warm-up; its cost is printed on its own). Each round runs
the paths in turn, its order reversed every other round (A B, B A, ...), so a machine that slows down or speeds
up within a round weighs on each path alike; ``x plain`` is the median of the per-round ratios.

    python benchmarks/video.py [--repeats 5] [--threads 1] [--frames 16] [--size 224] [--models videomae,vivit]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch


def _build(kind: str, frames: int, size: int, folder: str) -> Any:
    import transformers

    import vitscope

    common = dict(image_size=size, num_frames=frames, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                  intermediate_size=1536)
    if kind == "videomae":
        model = transformers.VideoMAEModel(transformers.VideoMAEConfig(patch_size=16, tubelet_size=2, **common))
    else:
        model = transformers.VivitModel(transformers.VivitConfig(tubelet_size=[2, 16, 16], **common))
    model.eval().save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vitscope.load(f"hf:{folder}")


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", default="videomae,vivit", help="comma-separated: videomae, vivit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import vitscope

    print(f"# vitscope video maps vs plain forward; {args.frames} frames at {args.size} px, batch 1, threads "
          f"{args.threads}, median of {args.repeats} (seconds)")
    print("| model | path | time (s) | x plain |")
    print("|---|---|---|---|")
    for kind in [m for m in args.models.split(",") if m]:
        with tempfile.TemporaryDirectory() as folder:
            vit = _build(kind, args.frames, args.size, folder)
            x = torch.randn(1, args.frames, 3, args.size, args.size)
            paths: dict[str, Callable[[], Any]] = {
                "plain": lambda: vit(x),  # noqa: B023 (run inside this iteration)
                "video_maps cls": lambda: vitscope.video_maps(vit, x, "cls"),  # noqa: B023
            }
            if kind == "vivit":
                paths["capture cls rows, all layers"] = lambda: vitscope.capture(vit, x, queries="cls")  # noqa: B023
            first = _time(paths["video_maps cls"])  # warm-up: the layout probe runs here, once
            warm = _time(paths["video_maps cls"])
            for fn in paths.values():
                _time(fn)
            times: dict[str, list[float]] = {name: [] for name in paths}
            for r in range(args.repeats):
                for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                    times[name].append(_time(paths[name]))
            plain = statistics.median(times["plain"])
            name = "VideoMAE-S" if kind == "videomae" else "ViViT-S"
            for path, ts in times.items():
                ratio = statistics.median(t / p for t, p in zip(ts, times["plain"], strict=True))
                print(f"| {name} | {path} | {statistics.median(ts):.3f} | {ratio:.3f} |")
            print(f"| {name} | first video_maps (layout probe included) | {first:.3f} | {first / plain:.3f} |")
            print(f"| {name} | (probe alone, first - warm) | {first - warm:.3f} | {(first - warm) / plain:.3f} |")


if __name__ == "__main__":
    main()
