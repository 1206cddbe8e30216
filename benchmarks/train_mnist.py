"""Issue 4: train vitscope's tiny ViT on real MNIST digits within 10 minutes on a small CPU.

Data: the MNIST test set in ``../shared/data/mnist`` (``t10k-*`` IDX files). Images 0-7,499 train,
7,500-7,999 validate (model selection / early stopping), and 8,000-9,999 (never seen in training) are the
held-out test. Target: >= 95 % test accuracy, wall-clock training time <= 10 minutes.

Model: the ``mnist`` preset (28 px, patch 4 -> 7x7 grid, depth 4, width 64, 4 heads, MLP x2), AdamW with
warm-up + cosine decay, random resized crops (area 0.6-1, no flips).

    python benchmarks/train_mnist.py [--epochs 50] [--threads 1] [--minutes 10] [--smoke]

Prints one line per validation, then ``test accuracy`` and ``training time``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from vitscope.train.datasets import get_dataset  # noqa: E402
from vitscope.train.loop import evaluate, preset, train  # noqa: E402

MNIST = HERE.parent.parent / "shared" / "data" / "mnist"


def _subset(ds: object, indices: range) -> Subset:  # type: ignore[type-arg]
    sub = Subset(ds, indices)  # type: ignore[arg-type]
    for attr in ("classes", "channels", "mean", "std"):
        setattr(sub, attr, getattr(ds, attr))
    return sub


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=MNIST)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for training")
    ap.add_argument("--output", type=Path, default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="a few steps on 512 images (for the test suite)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    full = get_dataset("mnist", args.data, "test")  # the 10,000 t10k digits
    if args.smoke:
        train_ds, val_ds, test_ds = _subset(full, range(512)), _subset(full, range(512, 640)), _subset(
            full, range(8000, 8256))
        cfg = preset("mnist", epochs=1, val_every=4, depth=1, dim=32, max_steps=8, warmup_steps=2)
    else:
        train_ds, val_ds, test_ds = _subset(full, range(7500)), _subset(full, range(7500, 8000)), _subset(
            full, range(8000, 10_000))
        cfg = preset("mnist", epochs=args.epochs, val_every=117, patience=6, max_minutes=args.minutes * 0.97)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or Path(tmp) / "mnist"
        t0 = time.monotonic()
        result = train(cfg, out, datasets=(train_ds, val_ds), progress=False, log=print)
        seconds = time.monotonic() - t0
        _, acc = evaluate(result.model, test_ds, full.mean, full.std)
    print(f"test accuracy (images 8000-9999): {acc:.4f}  [target >= 0.95]")
    print(f"training time: {seconds / 60:.2f} min ({result.step} steps, {result.stopped}, "
          f"best val acc {result.best_val_accuracy:.4f} at step {result.best_step})  [target <= 10 min]")
    return acc


if __name__ == "__main__":
    main()
