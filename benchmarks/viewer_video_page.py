"""Video viewer page size and responsiveness: a random-weight VideoMAE-S (12 layers x 6 heads, dim 384, patch 16,
tubelet 2) on a 16-frame clip at 224 px: 8 token frames of 14 x 14, 1568 tokens (issue 22).

Builds the page (`vitscope.viewer.view`, the video branch) at the default budget and at ``--budget-mb``, prints
the time to build, the page size, what the budget kept, then (when Debian's /usr/bin/chromium is present) loads
each page headless from a file:// URL with the network blocked, hovers patches and steps the frame slider,
printing the load time and the page's own redraw timings (median and max) per action.

    python benchmarks/viewer_video_page.py [--hovers 24] [--budget-mb 60]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def model(folder: Path) -> Any:
    import transformers

    import vitscope

    torch.manual_seed(0)
    m = transformers.VideoMAEModel(transformers.VideoMAEConfig(
        image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
        intermediate_size=1536, num_frames=16, tubelet_size=2)).eval()
    m.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vitscope.load(f"hf:{folder}")


def build(vit: Any, folder: Path, budget_mb: float) -> Path:
    from vitscope.viewer import view

    x = torch.randn(1, 16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = view(x, vit, budget_bytes=int(budget_mb * 1e6), title=f"VideoMAE-S 16 frames, {budget_mb:g} MB")
    path = v.save(folder / f"videomae_{budget_mb:g}.html")
    p = v.payload
    print(f"budget {budget_mb:g} MB: built in {time.perf_counter() - t0:.1f} s; page {path.stat().st_size / 1e6:.2f} MB "
          f"({p['tokens']} tokens, layers {p['layers']}, heads {p['heads']}, {len(p['video']['images'])} frames)")
    for note in v.notes:
        print(f"  note: {note}")
    return path


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
        page.wait_for_function("window.vitscopeViewers && window.vitscopeViewers.length === 1", timeout=120_000)
        load_s = time.perf_counter() - t0
        box = page.locator(".vs-canvas").bounding_box()
        for i in range(hovers):
            r, c = (3 * i) % 14, (5 * i + 1) % 14
            page.mouse.move(box["x"] + (c + 0.5) * box["width"] / 14, box["y"] + (r + 0.5) * box["height"] / 14)
        hover = page.evaluate("() => window.vitscopeViewers[0].timings.slice(1)")
        page.mouse.move(0, 0)
        n0 = len(page.evaluate("() => window.vitscopeViewers[0].timings"))
        for f in range(16):
            page.eval_on_selector(".vs-frame", "(el, v) => { el.value = String(v); "
                                  "el.dispatchEvent(new Event('input', {bubbles: true})); }", f)
        steps = page.evaluate("() => window.vitscopeViewers[0].timings")[n0:]
        ctx.close()
    print(f"  chromium: load {load_s:.2f} s; hover redraw median {statistics.median(hover):.2f} ms, max "
          f"{max(hover):.2f} ms ({len(hover)} hovers); frame step median {statistics.median(steps):.2f} ms, max "
          f"{max(steps):.2f} ms ({len(steps)} steps); network requests {len(blocked)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hovers", type=int, default=24)
    ap.add_argument("--budget-mb", type=float, default=60.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        vit = model(folder / "model")
        pages = [build(vit, folder, budget) for budget in (6.0, args.budget_mb)]
        if CHROMIUM.exists():
            for path in pages:
                print(path.name)
                browse(path, args.hovers)
        else:
            print(f"{CHROMIUM} not found: page sizes only")


if __name__ == "__main__":
    main()
