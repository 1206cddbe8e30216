"""Viewer page size and responsiveness for a ViT-S/16 at 224 px with every layer and head (issue 5).

Builds the page from a random-weight ViT-S/16 (12 layers x 6 heads, dim 384, patch 16: 197 tokens), prints its
size, then (when Debian's /usr/bin/chromium is present) loads it headless from a file:// URL with the network
blocked and hovers 24 patches, printing the load time and the page's own redraw timings (median and max).

    python benchmarks/viewer_page.py [--hovers 24]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def build(folder: Path) -> Path:
    import vitscope
    from vitscope.models.vit import ViT, ViTConfig
    from vitscope.viewer import Viewer

    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=(224, 224), patch_size=16, dim=384, depth=12, heads=6, num_classes=10)).eval()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(240, 320, 3), dtype=np.uint8))
    attn = vitscope.capture(model, img, queries=None)
    return Viewer.from_attentions(attn, img, title="ViT-S/16").save(folder / "vits16.html")


def browse(path: Path, hovers: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True, args=ARGS,
                                                    viewport={"width": 1100, "height": 900})
        blocked: list[str] = []
        page = ctx.new_page()
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("file:", "data:"))
                   else (blocked.append(r.request.url), r.abort()))
        t0 = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_function("window.vitscopeViewers && window.vitscopeViewers.length === 1", timeout=60_000)
        load_s = time.perf_counter() - t0
        box = page.locator(".vs-canvas").bounding_box()
        for i in range(hovers):
            r, c = (3 * i) % 14, (5 * i + 1) % 14
            page.mouse.move(box["x"] + (c + 0.5) * box["width"] / 14, box["y"] + (r + 0.5) * box["height"] / 14)
        timings = page.evaluate("() => window.vitscopeViewers[0].timings.slice(1)")
        ctx.close()
    print(f"load + decode: {load_s:.2f} s; redraw per hover over {len(timings)} hovers: "
          f"median {statistics.median(timings):.2f} ms, max {max(timings):.2f} ms; blocked requests: {len(blocked)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hovers", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp))
        print(f"ViT-S/16 at 224 px, 12 layers x 6 heads x 197 x 197: page {path.stat().st_size / 1e6:.2f} MB "
              f"(limit 10 MB)")
        if CHROMIUM.exists():
            browse(path, args.hovers)
        else:
            print(f"{CHROMIUM} not found: skipping the browser timings (apt-get install chromium)")


if __name__ == "__main__":
    main()
