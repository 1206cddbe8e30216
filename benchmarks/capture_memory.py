"""Issue 2: [CLS]-rows-only capture needs < 5% of the memory ``output_attentions=True`` needs.

Model: transformers ``ViTModel`` with ``ViTConfig()`` defaults (ViT-B/16: 12 layers, 12 heads, dim 768), random
weights, one 1024x1024 image (N = 4097 tokens). Each configuration runs in a fresh process; "extra" is its peak
resident memory above the resident memory just before the call (model, input and libraries excluded).

- plain SDPA forward                     (the model as users run it)
- vitscope.capture(queries="cls")        on the same SDPA model: every layer's, every head's [CLS] row
- plain eager forward                    (``attn_implementation="eager"``, no attentions returned)
- eager + output_attentions=True         transformers' way to get attention

The ratio is (capture extra - plain SDPA extra) / (output_attentions extra - plain SDPA extra), i.e. what each
way of getting attention costs on top of just running the model.

    python benchmarks/capture_memory.py [--size 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime

import _common as C

TARGET = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--model", default="vit-b16", choices=list(C.MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="run output_attentions even if memory looks short")
    args = ap.parse_args()

    need = C.attention_bytes(args.model, args.size)
    print(f"# capture memory, {args.model} at {C.px(args.size, args.model)} px, {datetime.date.today()}")
    print(f"# machine: {C.machine()}")
    print(f"# full attention of all layers (L x H x N x N float32): {C.mb(need)}")
    rows = {}
    for name, path in [("plain SDPA forward", "plain"), ("capture(queries='cls')", "cls_maps"),
                       ("plain eager forward", "plain_eager"), ("eager + output_attentions=True",
                                                                "output_attentions")]:
        if path == "output_attentions" and C.mem_available() < 1.4 * need + 2**30 and not args.force:
            print(f"{name:34s} skipped: needs ~{C.mb(1.4 * need)}, {C.mb(C.mem_available())} available")
            continue
        res = C.in_child("memory", args.model, args.size, path, args.threads)
        rows[path] = res["extra_bytes"]
        print(f"{name:34s} extra peak {C.mb(res['extra_bytes']):>12s}   (resident before {C.mb(res['rss_before'])})")
    if "output_attentions" in rows:
        base = rows["plain"]
        cap, ref = rows["cls_maps"] - base, rows["output_attentions"] - base
        ratio = cap / ref
        verdict = "PASS" if ratio < TARGET else "FAIL"
        print(f"capture extra over plain: {C.mb(cap)}; output_attentions extra over plain: {C.mb(ref)}")
        print(f"ratio {ratio:.4%} (target < {TARGET:.0%}): {verdict}")


if __name__ == "__main__":
    main()
