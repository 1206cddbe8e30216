"""Issue 6: time and peak memory of vitscope's paths against the same model's plain SDPA forward.

Paths (random-weight transformers models, batch 1):

- ``plain``              the model's own forward (SDPA attention), no capture
- ``cls_maps``           ``vitscope.capture(vit, x, queries="cls")``: [CLS] rows of every layer and head
- ``rollout``            ``streaming_rollout(vit, x)``: rollout of [CLS] over all layers, never L x H x N x N
- ``fused``              ``fused_attention(vit, x)``: head-mean N x N of every layer, in row chunks
- ``output_attentions``  the same weights with ``attn_implementation="eager"`` and ``output_attentions=True``

- ``cls_maps_unverified`` ``cls_maps`` with the per-call self-verification off (issue 17; a private switch):
  the verification-cost lines after the table, ``cls_maps / cls_maps_unverified - 1``

Targets: ``cls_maps`` <= 1.10x plain time at every size and extra peak memory < 5% of ``output_attentions``'
at 1024 px; ``rollout`` <= 2.0x plain time at 512/518 px and peak memory 10x below the full L x H x N x N
attention at 1024 px. Times: median of ``--repeats`` interleaved runs in one process per (model, size); memory:
one fresh process per (model, size, path). Ratios within one run are what count (shared, noisy machine).
Verification (issue 17): at most 3% extra time on a [CLS]-maps capture at 224, 512 and 1024 px.

    python benchmarks/speed.py [--quick] [--models vit-s16,vit-b16] [--sizes 224,512] [--repeats 5]

``--probe``: issue 17's layout probe instead: ``vitscope.load`` + first capture ([CLS] rows, every layer) of a
fresh timm ``vit_base_patch16_224`` (random weights) at 224 px, with and without the probe (layout measurement
and the token-axis check at a second geometry); target <= 1.5x.

    python benchmarks/speed.py --probe [--repeats 3] [--threads 1]

    python benchmarks/speed.py --verification-only [--models vit-b16] [--repeats 9]
"""

from __future__ import annotations

import argparse
import datetime
import json

import _common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(C.MODELS))
    ap.add_argument("--sizes", default="224,512,1024", help="nominal sizes; patch-14 models use 224, 518, 1022")
    ap.add_argument("--paths", default=",".join(C.PATHS))
    ap.add_argument("--quick", action="store_true", help="224 and 512 px only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="time only")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--probe", action="store_true", help="only the layout probe's cost (issue 17)")
    ap.add_argument("--verification-only", action="store_true", help="only the verification-cost lines")
    args = ap.parse_args()
    if args.probe:
        probe_cost(args.repeats, args.threads)
        return
    models = args.models.split(",")
    sizes = [224, 512] if args.quick else [int(s) for s in args.sizes.split(",")]
    paths = args.paths.split(",")
    print(f"# vitscope speed, {datetime.date.today()}; machine: {C.machine()}; threads {args.threads}; "
          f"median of {args.repeats}")
    if args.verification_only:
        verification_cost(models, sizes, args.repeats, args.threads)
        return
    print("| model | px | path | time s | x plain | peak extra MB | over plain MB | % of output_attentions' | "
          "full LxHxNxN MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for model in models:
        for size in sizes:
            s = C.px(size, model)
            full = C.attention_bytes(model, size)
            run_paths = list(paths)
            skipped = ""
            if "output_attentions" in run_paths and C.mem_available() < 1.4 * full + 2**30:
                run_paths.remove("output_attentions")
                skipped = f"output_attentions skipped (needs ~{C.mb(1.4 * full)})"
            reps = args.repeats if size < 1024 else max(3, args.repeats // 2)
            times = C.in_child("times", model, size, run_paths, reps, args.threads)["median"]
            mem: dict[str, int] = {}
            if not args.no_memory:
                for p in run_paths:
                    mem[p] = C.in_child("memory", model, size, p, args.threads)["extra_bytes"]
            base = mem.get("plain")
            ref = mem["output_attentions"] - base if base is not None and "output_attentions" in mem else None
            for p in run_paths:
                ratio = times[p] / times["plain"] if "plain" in times else float("nan")
                raw = mem.get(p)
                over = raw - base if raw is not None and base is not None else None
                share = f"{over / ref:.2%}" if over is not None and ref and p != "output_attentions" else ""
                cells = ["" if v is None else f"{v / 2**20:,.1f}" for v in (raw, over)]
                print(f"| {model} | {s} | {p} | {times[p]:.3f} | {ratio:.2f} | {cells[0]} | {cells[1]} | {share} | "
                      f"{full / 2**20:,.0f} |", flush=True)
                results.append({"model": model, "px": s, "path": p, "time": times[p], "x_plain": ratio,
                                "peak_extra": raw, "over_plain": over, "full_attention_bytes": full})
            if skipped:
                print(f"| {model} | {s} | {skipped} | | | | | | |", flush=True)
    verification_cost(models, sizes, args.repeats, args.threads)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


_VIT_B = "vit_base_patch16_224"
_DYNAMIC = {"pretrained": False, "dynamic_img_size": True}  # as load_timm builds it: the axis check runs


def probe_cost(repeats: int, threads: int) -> None:
    """Median time of ``vitscope.load`` + first capture of a fresh ViT-B/16 at 224 px, with and without the probe."""
    import statistics
    import time

    import timm
    import torch

    import vitscope
    import vitscope.capture.core as core
    import vitscope.capture.probe as probe

    torch.set_num_threads(threads)
    x = torch.randn(1, 3, 224, 224)
    real = (probe.check_layout, core.check_token_axis)
    times: dict[str, list[float]] = {"without probe": [], "with probe": [], "capture only, without probe": [],
                                     "capture only, with probe": [], "probe alone": []}
    for _ in range(repeats):
        for mode in ("without probe", "with probe"):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            vit = vitscope.load(timm.create_model(_VIT_B, **_DYNAMIC).eval())
            if mode == "without probe":
                probe.check_layout, core.check_token_axis = (lambda *a, **k: None), (lambda *a, **k: None)
            try:
                t1 = time.perf_counter()
                vitscope.capture(vit, x, queries="cls")
                t2 = time.perf_counter()
            finally:
                probe.check_layout, core.check_token_axis = real
            times[mode].append(t2 - t0)
            times[f"capture only, {mode}"].append(t2 - t1)
            if mode == "with probe":  # the probe's own share, on a fresh model of the same kind
                t3 = time.perf_counter()
                fresh = vitscope.load(timm.create_model(_VIT_B, **_DYNAMIC).eval())
                t4 = time.perf_counter()
                probe.check_layout(fresh, x)
                probe.check_token_axis(fresh, fresh.sites, (3, 224, 224))
                times["probe alone"].append(time.perf_counter() - t4)
                del fresh, t3
            del vit
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# layout probe cost, {datetime.date.today()}; machine: {C.machine()}; threads {threads}; "
          f"median of {repeats}; timm vit_base_patch16_224, random weights, 224 px, capture(queries='cls')")
    print("| path (load + first capture unless said) | time s | x without probe |")
    print("|---|---|---|")
    for k, v in med.items():
        base = med["capture only, without probe"] if k.startswith("capture only") else med["without probe"]
        print(f"| {k} | {v:.3f} | {v / base:.2f} |")


def verification_cost(models: list[str], sizes: list[int], repeats: int, threads: int) -> None:
    """CPU time of a [CLS]-maps capture with and without the per-call verification (medians of interleaved
    repeats in one child per (model, size), `_common.child_cpu_times`), and the CPU time spent inside the
    verification itself as a share of the capture (`_common.child_verification_share`): on a shared machine the
    A/B difference of a few % is within the noise, the measured share is not."""
    print("\n| model | px | cls_maps CPU s | unverified CPU s | ratio - 1 | CPU s in verification | share |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        for size in sizes:
            reps = repeats if size < 1024 else max(3, repeats // 2)
            t = C.in_child("cpu_times", model, size, ["cls_maps", "cls_maps_unverified"], reps, threads)["median"]
            extra = t["cls_maps"] / t["cls_maps_unverified"] - 1
            inside = C.in_child("verification_share", model, size, max(2, reps // 2), threads)
            share = inside["verification"] / inside["capture"]
            print(f"| {model} | {C.px(size, model)} | {t['cls_maps']:.3f} | {t['cls_maps_unverified']:.3f} | "
                  f"{extra:+.1%} | {inside['verification']:.4f} | {share:.2%} |", flush=True)


if __name__ == "__main__":
    main()
