"""The DINO feature views (issue 19): time of the `pca` fit against a plain full SVD, and the size the viewer's
feature tabs add to a page.

`vitscope.methods.pca.pca_components` finds the top components as eigenvectors of the ``D x D`` scatter matrix
(a matrix product and a small symmetric eigenproblem); a full SVD of the ``n x D`` centred features gives the
same components (tests/methods/test_features.py checks them against numpy's SVD). Random features stand in for a
DINOv2 ViT-S/14 (dim 384) and ViT-B/14 (dim 768) at 224 and 518 px (16 x 16 and 37 x 37 patches); one thread, so
the ratio is the algorithm's and not the machine's parallelism. Prints medians of ``--repeats`` runs and the
ratio; then the packed feature block per image (`vitscope.viewer.pack.pack_features`, JSON bytes).

    python benchmarks/feature_views.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

CASES = [("ViT-S/14 224 px", 1, 16, 384), ("ViT-B/14 518 px", 1, 37, 768), ("ViT-B/14 518 px, 4 images", 4, 37, 768)]


def _median(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from vitscope.methods.pca import pca_rgb
    from vitscope.viewer.pack import pack_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| features | patches x dim | pca_rgb ms | full SVD ms | SVD / pca_rgb | packed KB per image |")
    print("|---|---|---|---|---|---|")
    for name, batch, side, dim in CASES:
        f = torch.randn(batch, side, side, dim, generator=g)
        x = f.reshape(-1, dim).double()
        ours = _median(lambda f=f: pca_rgb(f), args.repeats)
        svd = _median(lambda x=x: torch.linalg.svd(x - x.mean(0), full_matrices=False), args.repeats)
        rgb, _, _ = pca_rgb(f[:1])
        packed = len(json.dumps(pack_features(f[0], rgb[0], layer=11, norm="norm"))) / 1e3
        print(f"| {name} | {x.shape[0]} x {dim} | {ours * 1e3:.0f} | {svd * 1e3:.0f} | {svd / ours:.2f} | {packed:.0f} |")


if __name__ == "__main__":
    main()
