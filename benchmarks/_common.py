"""Shared benchmark plumbing: random-weight models, the paths to compare, and clean per-process measurements.

Peak memory is measured in a fresh child process per configuration (torch's allocator and glibc keep freed
memory, so a second measurement in the same process would be wrong): the child builds the model, warms the
path up at a small size, records its resident set (``VmRSS``), resets the high-water mark (``/proc/self/
clear_refs``), runs the path once, and reports ``VmHWM - VmRSS`` = the extra peak memory of that call.
Times are medians over interleaved repeats inside one child per (model, size).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# name -> (family, transformers config kwargs, patch)
MODELS: dict[str, tuple[str, dict[str, Any], int]] = {
    "vit-s16": ("vit", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                        "intermediate_size": 1536}, 16),
    "dinov2-s14-reg": ("dinov2reg", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                                     "patch_size": 14, "image_size": 518, "num_register_tokens": 4}, 14),
    "vit-b16": ("vit", {}, 16),  # ViTConfig defaults are ViT-B/16: 12 layers, 12 heads, dim 768
    "dinov3-s16": ("dinov3", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                              "intermediate_size": 1536, "patch_size": 16, "num_register_tokens": 4}, 16),
    # timm's EVA-02 small (RoPE, SwiGLU); the "output_attentions" reference is its unfused path's probabilities
    "eva02-s14": ("timm:eva02_small_patch14_224", {"num_hidden_layers": 12, "num_attention_heads": 6}, 14),
}
#: nominal size -> the size used for patch 14 (a multiple of 14)
P14 = {224: 224, 512: 518, 1024: 1022}
PATHS = ("plain", "cls_maps", "rollout", "fused", "output_attentions")


def px(size: int, model: str) -> int:
    return P14.get(size, size) if MODELS[model][2] == 14 else size


def build(model: str, attn: str = "sdpa") -> Any:
    """A random-weight transformers model (seed 0), ``attn``: ``"sdpa"`` or ``"eager"``."""
    import torch

    family, kwargs, _ = MODELS[model]
    torch.manual_seed(0)
    if family.startswith("timm:"):
        import timm

        m = timm.create_model(family[5:], pretrained=False, num_classes=0, dynamic_img_size=True).eval()
        for blk in m.blocks:
            blk.attn.fused_attn = attn != "eager"
        return m
    if family == "dinov3":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        return DINOv3ViTModel(DINOv3ViTConfig(**kwargs, attn_implementation=attn)).eval()
    if family == "vit":
        from transformers import ViTConfig, ViTModel

        return ViTModel(ViTConfig(**kwargs, attn_implementation=attn), add_pooling_layer=False).eval()
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kwargs, attn_implementation=attn)).eval()


def runner(path: str, model: str) -> Callable[[Any], Any]:
    """A function ``run(pixels)`` for one path on ``model`` (built here)."""
    import torch

    import vitscope
    from vitscope.capture.streaming import fused_attention
    from vitscope.methods.streaming import streaming_rollout

    if path in ("output_attentions", "plain_eager") and MODELS[model][0].startswith("timm:"):
        tm = build(model, "eager")
        probs: list[Any] = []
        for blk in tm.blocks:  # the unfused path's probabilities, as output_attentions would return them
            blk.attn.attn_drop.register_forward_hook(lambda _m, _i, o: probs.append(o))
        keep = path == "output_attentions"

        def run_timm_eager(x: Any) -> Any:
            probs.clear()
            with torch.no_grad():
                out = tm(x)
            return tuple(probs) if keep else out

        return run_timm_eager
    if path in ("output_attentions", "plain_eager"):
        module = build(model, "eager")
        kwargs = {"interpolate_pos_encoding": True} if MODELS[model][0] == "vit" else {}
        want = path == "output_attentions"

        def run_eager(x: Any) -> Any:
            with torch.no_grad():
                out = module(x, output_attentions=want, **kwargs)
            return out.attentions if want else out.last_hidden_state

        return run_eager
    vit = vitscope.wrap(build(model, "sdpa"))
    if path == "plain":

        def run_plain(x: Any) -> Any:
            with torch.no_grad():
                return vit(x)

        return run_plain
    if path == "cls_maps":
        return lambda x: vitscope.capture(vit, x, queries="cls")  # all layers, all heads
    if path == "cls_maps_unverified":  # the same capture with the per-call verification off (its cost)
        from vitscope.capture.intercept import _verification_off

        def run_unverified(x: Any) -> Any:
            with _verification_off():
                return vitscope.capture(vit, x, queries="cls")

        return run_unverified
    if path == "rollout":
        return lambda x: streaming_rollout(vit, x)
    if path == "fused":
        return lambda x: fused_attention(vit, x)
    raise ValueError(path)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child_memory(model: str, size: int, path: str, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    run = runner(path, model)
    s = px(size, model)
    patch = MODELS[model][2]
    w = max(2, s // 2 // patch) * patch  # warm-up below the measured size, so its buffers cannot be reused
    run(torch.randn(1, 3, w, w))  # warm-up: kernels, thread pools, lazy imports
    x = torch.randn(1, 3, s, s)
    gc.collect()
    before = _status()["VmRSS"]
    reset = _reset_peak()
    out = run(x)
    peak = _status()["VmHWM"]
    del out
    return {"extra_bytes": peak - before, "rss_before": before, "peak": peak, "hwm_reset": reset}


def child_times(model: str, size: int, paths: list[str], repeats: int, threads: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    s = px(size, model)
    x = torch.randn(1, 3, s, s)
    runs = {p: runner(p, model) for p in paths}
    times: dict[str, list[float]] = {p: [] for p in paths}
    for p in paths:  # warm-up
        runs[p](x)
    for _ in range(repeats):  # interleaved, so drifting load on a shared machine hits every path alike
        for p in paths:
            t0 = clock()
            out = runs[p](x)
            times[p].append(clock() - t0)
            del out
    return {"median": {p: statistics.median(v) for p, v in times.items()}, "all": times}


def child_cpu_times(model: str, size: int, paths: list[str], repeats: int, threads: int) -> dict[str, Any]:
    """`child_times` in CPU seconds of this process (``time.process_time``): with one thread, other jobs on a
    shared machine slow it far less than wall time, so small differences (a few %) can be told apart."""
    return child_times(model, size, paths, repeats, threads, clock=time.process_time)


def child_verification_share(model: str, size: int, repeats: int, threads: int) -> dict[str, Any]:
    """CPU seconds spent inside vitscope's per-call verification during ``repeats`` [CLS]-maps captures, and
    in the captures as a whole: a share that a shared machine's noise cannot blur (both measured in one run)."""
    import torch

    import vitscope
    from vitscope.capture import intercept

    torch.set_num_threads(threads)
    spent = [0.0]
    depth = [0]

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[0] += time.process_time() - t0

        return run

    vit = vitscope.wrap(build(model, "sdpa"))
    x = torch.randn(1, 3, px(size, model), px(size, model))
    vitscope.capture(vit, x, queries="cls")  # warm-up
    orig = intercept.verify_call, intercept.check_product
    intercept.verify_call, intercept.check_product = timed(orig[0]), timed(orig[1])
    try:
        t0 = time.process_time()
        for _ in range(repeats):
            vitscope.capture(vit, x, queries="cls")
        total = time.process_time() - t0
    finally:
        intercept.verify_call, intercept.check_product = orig
    return {"capture": total / repeats, "verification": spent[0] / repeats}


def in_child(kind: str, *args: Any, timeout: float = 3600) -> dict[str, Any]:
    """Run ``child_<kind>(*args)`` in a fresh interpreter and return its JSON result."""
    code = (f"import sys, json; sys.path[:0] = [{str(HERE)!r}, {str(SRC)!r}]; import _common; "
            f"print('RESULT' + json.dumps(_common.child_{kind}(*{args!r})))")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(args[-1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"child {kind}{args} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def attention_bytes(model: str, size: int) -> int:
    """Bytes of every layer's full ``H x N x N`` float32 attention (what ``output_attentions`` returns)."""
    _family, kwargs, patch = MODELS[model]
    layers = kwargs.get("num_hidden_layers", 12)
    heads = kwargs.get("num_attention_heads", 12)
    s = px(size, model)
    n = 1 + kwargs.get("num_register_tokens", 0) + (s // patch) ** 2  # [CLS] + registers + patches
    return 4 * layers * heads * n * n


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> str:
    import platform

    import torch

    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"{mem_available() / 2**30:.0f} GiB available, torch {torch.__version__}, "
            f"{'CUDA' if torch.cuda.is_available() else 'CPU'}")


def mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MB" if abs(x) >= 2**20 else f"{x / 2**20:.2f} MB"
