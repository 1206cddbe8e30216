"""`evaluate`: every method's map scored by the published protocols, on one dataset, resumable.

For each chunk of images (`evaluate_chunk`, the unit both engines run) and each method, plus a ``random`` map:

- the perturbation test, positive and negative, predicted and target class (`vitscope.evaluate.metrics`);
- the segmentation test and the pointing game, when the image has a mask;
- deletion and insertion (RISE; `vitscope.methods.metrics.perturbation_auc`'s rule, black fill, ``deletion_steps``;
  the end points shared by all methods are computed once per chunk);
- on the first ``sanity_images`` images, the cascading randomisation sanity check (`sanity_check`).

Each image's measures are one JSON line of ``<out>/records.jsonl`` (appended and fsynced per chunk); a re-run
skips the images already recorded, so an interrupted run resumes. The table (`EvaluationTable`) is aggregated
from the records: ``table.csv``, ``table.json``, ``summary.md`` and ``curves.png``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitscope.errors import VitscopeError
from vitscope.evaluate.datasets import Sample, folder_samples, imagenet_segmentation
from vitscope.evaluate.metrics import (
    CURVE_X,
    PERTURBATION_STEPS,
    SegmentationCounts,
    black_fill,
    perturbation_auc,
    perturbed_inputs,
    pixel_relevance,
    random_maps,
    removal_order,
    segmentation_counts,
    segmentation_scores,
    spearman,
)

RECORDS = "records.jsonl"
CONFIG = "evaluate.json"
TABLE_CSV = "table.csv"
TABLE_JSON = "table.json"
SUMMARY_MD = "summary.md"
FIGURE = "curves.png"
OUTPUTS = (TABLE_CSV, TABLE_JSON, SUMMARY_MD, FIGURE)
RANDOM = "random"

#: table columns: (key, header, what it is); perturbation and segmentation numbers are percentages
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "the map"),
    ("images", "images", "images scored"),
    ("pos_pred", "pos AUC (pred)", "positive perturbation, predicted class, top-1 accuracy AUC (lower is better)"),
    ("neg_pred", "neg AUC (pred)", "negative perturbation, predicted class (higher is better)"),
    ("pos_target", "pos AUC (target)", "positive perturbation, target class (lower is better)"),
    ("neg_target", "neg AUC (target)", "negative perturbation, target class (higher is better)"),
    ("pos_prob", "pos prob AUC", "positive perturbation, predicted class's probability (lower is better)"),
    ("neg_prob", "neg prob AUC", "negative perturbation, predicted class's probability (higher is better)"),
    ("pixel_accuracy", "pixel acc", "segmentation: pixel accuracy of the map above its mean"),
    ("miou", "mIoU", "segmentation: mean IoU of background and foreground"),
    ("map", "mAP", "segmentation: mean average precision"),
    ("pointing", "pointing", "pointing game hits, percent of images with a mask"),
    ("deletion", "deletion", "RISE deletion AUC x100 (lower is better)"),
    ("insertion", "insertion", "RISE insertion AUC x100 (higher is better)"),
    ("sanity", "sanity rho", "Spearman rank correlation with the original map, all layers randomised "
                              "(lower: the map depends on the model)"),
)


# ------------------------------------------------------------------------------------------------ the table
@dataclass
class EvaluationTable:
    """The result of `evaluate`: one row per method (``random`` last) and the mean curves behind it.

    Attributes:
        rows: one dict per method, keys of `COLUMNS` (``None`` where a test did not run); ``error`` when the
            method could not run on this model.
        curves: method -> curve name (``positive_predicted``, ``negative_target``, ``deletion``, ``sanity``, ...)
            -> mean values; ``x``: their abscissae.
        meta: model, images, failed images, options.
    """

    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str) -> dict[str, Any]:
        """The row of ``method``."""
        for r in self.rows:
            if r["method"] == method:
                return r
        raise KeyError(method)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([key for key, _, _ in COLUMNS] + ["error"])
        for r in self.rows:
            w.writerow([_cell(r.get(key)) for key, _, _ in COLUMNS] + [r.get("error") or ""])
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps({"columns": {k: d for k, _, d in COLUMNS}, "rows": self.rows, "curves": self.curves,
                           "meta": self.meta}, indent=1, default=_json_default)

    def to_markdown(self) -> str:
        head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
        rule = "|" + "|".join("---" if k == "method" else "---:" for k, _, _ in COLUMNS) + "|"
        lines = [head, rule]
        for r in self.rows:
            cells = [_cell(r.get(k), 2) if r.get(k) is not None else "-" for k, _, _ in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {r['method']}: {r['error']}" for r in self.rows if r.get("error")]
        return "\n".join(lines + (["", *notes] if notes else [])) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


def _cell(v: Any, digits: int = 6) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v).__name__)


# ------------------------------------------------------------------------------------------------ sanity
@contextmanager
def randomised_layers(vit: Any, count: int, seed: int = 0) -> Iterator[None]:
    """The top ``count`` blocks of ``vit`` (last layer first) with every parameter re-drawn from a normal of the
    tensor's own mean and standard deviation (Adebayo et al.'s cascading randomisation; each block's draw is a
    function of ``(seed, layer)``, so stage ``k + 1`` keeps stage ``k``'s weights). The weights are restored
    on exit, however the block ends."""
    sites = list(vit.sites)
    chosen = sites[len(sites) - count:] if count > 0 else []
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        with torch.no_grad():
            for site in reversed(chosen):
                gen = torch.Generator().manual_seed(int(seed) * 1009 + int(site.layer))
                for p in site.block.parameters():
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    saved.append((p, p.detach().clone()))
                    flat = p.detach().double()
                    mean = float(flat.mean())
                    std = float(flat.std()) if p.numel() > 1 else 0.0
                    std = std if std > 0 else max(abs(mean), 1e-2) * 0.5
                    draw = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std + mean
                    p.copy_(draw.to(p))
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def _method_maps(vit: Any, pixels: torch.Tensor, name: str, classes: list[int]) -> torch.Tensor:
    """``(B, rows, cols)`` float64 map of registered method ``name`` for ``classes`` (gradient methods)."""
    from vitscope.methods.api import compute, get_method
    from vitscope.methods.registry import MapContext

    params: dict[str, Any] = {}
    if "target" in get_method(name).params:
        params["target"] = list(classes)
    return compute(MapContext(vit, pixels), name, **params).map.detach().double().cpu()


def sanity_check(vit: Any, pixels: torch.Tensor, methods: Sequence[str], classes: list[int], keys: Sequence[int],
                 *, seed: int = 0, originals: dict[str, torch.Tensor] | None = None) -> dict[str, list[list[float]]]:
    """Cascading randomisation (Adebayo et al. 2018): for ``k = 1 .. layers``, the top ``k`` blocks randomised
    (`randomised_layers`), each method's map recomputed (gradient methods for the original ``classes``) and
    compared with the original by `spearman`. Returns method -> per image the ``layers`` correlations; the
    ``random`` baseline correlates two independent random maps at each stage."""
    grid = vit.grid_for((int(pixels.shape[-2]), int(pixels.shape[-1])))
    L = int(vit.info.num_layers)
    B = int(pixels.shape[0])
    base = dict(originals or {})
    for name in methods:
        if name not in base:
            base[name] = _method_maps(vit, pixels, name, classes)
    out: dict[str, list[list[float]]] = {name: [[] for _ in range(B)] for name in methods}
    for k in range(1, L + 1):
        with randomised_layers(vit, k, seed):
            for name in methods:
                maps = _method_maps(vit, pixels, name, classes)
                for b in range(B):
                    out[name][b].append(spearman(base[name][b].numpy(), maps[b].numpy()))
    first = random_maps(seed, keys, grid)
    out[RANDOM] = [[spearman(first[b], random_maps(seed + 1 + k, [keys[b]], grid)[0]) for k in range(1, L + 1)]
                   for b in range(B)]
    return out


# ------------------------------------------------------------------------------------------------ one chunk
def _logits(vit: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Class logits ``(n, classes)`` float64 of the inputs ``x`` ``(n, C, H, W)``, in passes of ``batch_size``."""
    outs = []
    with torch.no_grad():
        for start in range(0, int(x.shape[0]), batch_size):
            logits = vit.logits(vit(x[start:start + batch_size]))
            if logits is None:
                raise VitscopeError("model", "the model has no classifier", "evaluate a classification model")
            outs.append(logits.detach().double().cpu())
    return torch.cat(outs)


class _Jobs:
    """The chunk's perturbed forward passes, run on ``threads`` worker threads (in the caller when 1).

    Each job builds its perturbed inputs and runs them through the model under ``no_grad``; no capture or
    gradient hook sees them (vitscope's hooks act only in the thread that installed them, and torch's
    function-mode and grad-mode state is per thread), so the next method's map is computed in the calling thread
    while the previous methods' forwards run. `evaluate_chunk` sets torch to one intra-op thread meanwhile: this
    model's operations are small (shapes: 65 tokens of 64 channels), and torch's intra-op threads share them
    badly (two intra-op threads took about twice the CPU time of one for the same forwards and maps), while
    whole passes side by side cost no more CPU than one after another."""

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vitscope-evaluate") \
            if threads > 1 else None

    def submit(self, fn: Any, *args: Any) -> Any:
        """Start ``fn(*args)``; returns a function that waits for its value (or raises its error)."""
        if self.pool is None:
            value = fn(*args)
            return lambda: value
        return self.pool.submit(fn, *args).result

    def close(self) -> None:
        """Wait for the running jobs; drop the queued ones (after an error or Ctrl-C nothing else waits)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _forward_threads(vit: Any) -> Iterator[_Jobs]:
    """`_Jobs` on as many threads as torch's intra-op setting (on the CPU), torch at one intra-op thread
    inside the block; both restored on exit, however the block ends."""
    threads = torch.get_num_threads() if vit.device.type == "cpu" else 1
    jobs = _Jobs(threads)
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield jobs
    finally:
        jobs.close()
        if threads > 1:
            torch.set_num_threads(threads)


def _step_logits(vit: Any, pixels: torch.Tensor, order: torch.Tensor, fill: torch.Tensor, clean: torch.Tensor,
                 batch_size: int) -> torch.Tensor:
    """Logits ``(B, 10, classes)``: the unperturbed image, then each `PERTURBATION_STEPS` removal."""
    B = int(pixels.shape[0])
    x = torch.cat([perturbed_inputs(pixels, order, f, fill) for f in PERTURBATION_STEPS])  # (9B, C, H, W) step-major
    steps = _logits(vit, x, batch_size).reshape(len(PERTURBATION_STEPS), B, -1).transpose(0, 1)
    return torch.cat([clean[:, None], steps], dim=1)


def _hits_probs(logits: torch.Tensor, classes: Sequence[int]) -> tuple[list[list[int]], list[list[float]]]:
    """Top-1 hits and softmax probabilities of ``classes[b]`` at each step of ``logits`` ``(B, 10, classes)``."""
    cls = torch.as_tensor(list(classes), dtype=torch.long)[:, None]  # (B, 1)
    hits = (logits.argmax(dim=-1) == cls).long().tolist()
    probs = logits.softmax(dim=-1).gather(2, cls[:, :, None].expand(-1, logits.shape[1], 1))[..., 0].tolist()
    return hits, probs


def _rise_inputs(vit: Any, pixels: torch.Tensor, order: torch.Tensor, k: int, mode: str, fill: torch.Tensor,
                 ) -> torch.Tensor:
    """RISE step input (as `vitscope.methods.metrics.perturbation_auc`): the first ``k`` patches of ``order``
    ``(B, P)`` (all ``P`` when ``order`` is empty and ``k`` is P) removed (deletion: black) or the only ones kept
    over a black canvas (insertion; pixels outside the patch grid stay as in the image)."""
    B, C, H, W = pixels.shape
    rows, cols = vit.grid_for((int(H), int(W)))
    ph, pw = vit.info.patch_size
    sel = torch.zeros(B, rows * cols, dtype=torch.bool, device=pixels.device)
    if order.shape[1]:
        sel.scatter_(1, order[:, :k].to(pixels.device), True)
    elif k:
        sel[:] = True
    full = torch.zeros(B, 1, int(H), int(W), dtype=torch.bool, device=pixels.device)
    full[:, :, : rows * ph, : cols * pw] = sel.reshape(B, 1, rows, 1, cols, 1).expand(
        B, 1, rows, ph, cols, pw).reshape(B, 1, rows * ph, cols * pw)  # each patch's pixels
    canvas = fill.to(pixels).reshape(1, C, 1, 1)
    if mode == "deletion":
        return torch.where(full, canvas, pixels)
    covered = torch.zeros_like(full)
    covered[:, :, : rows * ph, : cols * pw] = True
    return torch.where(full | ~covered, pixels, canvas)


def _rise_curves(vit: Any, pixels: torch.Tensor, maps: torch.Tensor, classes: Sequence[int], fill: torch.Tensor,
                 mode: str, steps: int, clean: torch.Tensor, end: torch.Tensor, forward_batch: int) -> torch.Tensor:
    """Deletion or insertion curve ``(B, steps + 1)``: probability of ``classes`` with the top ``round(s / steps
    * P)`` patches of the map (ties: lower index first) removed / inserted; the clean image and ``end`` (every
    patch removed / none inserted, shared by all methods) are not recomputed."""
    B = int(pixels.shape[0])
    P = int(maps.shape[-2] * maps.shape[-1])
    order = torch.sort(maps.reshape(B, P).float(), dim=-1, descending=True, stable=True).indices
    ks = [round(s / steps * P) for s in range(1, steps)]
    inner = [_rise_inputs(vit, pixels, order, k, mode, fill) for k in ks]
    mid = _logits(vit, torch.cat(inner), forward_batch).reshape(len(ks), B, -1).transpose(0, 1) if ks else \
        clean.new_zeros(B, 0, clean.shape[-1])
    first, last = (clean, end) if mode == "deletion" else (end, clean)
    logits = torch.cat([first[:, None], mid, last[:, None]], dim=1)  # (B, steps + 1, classes)
    cls = torch.as_tensor(list(classes), dtype=torch.long)[:, None, None].expand(-1, steps + 1, 1)
    return logits.softmax(dim=-1).gather(2, cls)[..., 0]


@dataclass
class EvalOptions:
    """What `evaluate_chunk` measures (fixed for a run: recorded in ``evaluate.json``)."""

    methods: tuple[str, ...]
    deletion_steps: int = 10
    sanity_images: int = 16
    seed: int = 0
    forward_batch: int = 512  # perturbed images per forward pass (not recorded: it changes no number)

    def to_dict(self) -> dict[str, Any]:
        return {"methods": list(self.methods), "deletion_steps": self.deletion_steps,
                "sanity_images": self.sanity_images, "seed": self.seed}


def evaluate_chunk(vit: Any, pixels: torch.Tensor, masks: Sequence[np.ndarray | None],
                   labels: Sequence[int | None], keys: Sequence[int], options: EvalOptions) -> list[dict[str, Any]]:
    """One chunk of images: ``pixels`` ``(B, C, H, W)`` in the model's input, ``masks`` bool ``(H, W)`` in the
    same frame (or None), dataset ``labels`` (or None), ``keys`` the images' positions in the dataset (the random
    baseline and the sanity subset depend on them). Returns one record per image (see the module docstring).

    Forward passes run on torch's intra-op thread count of worker threads (`_Jobs`), torch at one intra-op thread
    meanwhile (restored on return)."""
    with _forward_threads(vit) as jobs:
        return _evaluate_chunk(vit, pixels, masks, labels, keys, options, jobs)


def _evaluate_chunk(vit: Any, pixels: torch.Tensor, masks: Sequence[np.ndarray | None],
                    labels: Sequence[int | None], keys: Sequence[int], options: EvalOptions, jobs: _Jobs,
                    ) -> list[dict[str, Any]]:
    from vitscope.methods.api import get_method
    from vitscope.methods.metrics import pointing_game

    B, _, H, W = pixels.shape
    grid = vit.grid_for((int(H), int(W)))
    prep = vit.info.preprocess
    fill = black_fill(prep.mean, prep.std)
    pixels = pixels.to(vit.device, vit.dtype)
    clean = _logits(vit, pixels, options.forward_batch)  # (B, classes)
    pred = clean.argmax(dim=-1).tolist()
    target = [pred[b] if labels[b] is None else int(labels[b]) for b in range(B)]  # type: ignore[arg-type]
    records: list[dict[str, Any]] = [
        {"key": int(keys[b]), "label": labels[b], "prediction": pred[b], "methods": {}} for b in range(B)]
    originals: dict[str, torch.Tensor] = {}
    # RISE's method-independent end points: every patch removed (deletion), none inserted (insertion)
    ends = {mode: _logits(vit, _rise_inputs(vit, pixels, torch.zeros(B, 0, dtype=torch.long), grid[0] * grid[1]
                                            if mode == "deletion" else 0, mode, fill), options.forward_batch)
            for mode in ("deletion", "insertion")}

    # each method's map here, its forward passes on the job threads meanwhile; read back after the loop
    pending: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = []
    for name in (*options.methods, RANDOM):
        try:
            if name == RANDOM:
                maps = torch.from_numpy(random_maps(options.seed, keys, grid)).double()
                maps_t = maps
            else:
                maps = _method_maps(vit, pixels, name, pred)
                originals[name] = maps
                differs = [b for b in range(B) if target[b] != pred[b]]
                maps_t = maps.clone()
                if differs and get_method(name).needs == "gradients":
                    maps_t[differs] = _method_maps(vit, pixels[differs], name, [target[b] for b in differs])
        except VitscopeError as exc:
            for r in records:
                r["methods"][name] = {"error": str(exc)}
            continue
        rel = pixel_relevance(maps, (int(H), int(W)))  # (B, H, W) float64
        rel_t = rel if maps_t is maps else pixel_relevance(maps_t, (int(H), int(W)))
        own = [b for b in range(B) if not torch.equal(maps_t[b], maps[b])]
        waits: dict[str, Any] = {"own": own}
        for sign, negative in (("pos", False), ("neg", True)):
            waits[sign] = jobs.submit(_step_logits, vit, pixels, removal_order(rel, negative), fill, clean,
                                      options.forward_batch)
            if own:
                waits[sign + "_own"] = jobs.submit(_step_logits, vit, pixels[own], removal_order(rel_t[own], negative),
                                                   fill, clean[own], options.forward_batch)
        for mode in ("deletion", "insertion"):
            waits[mode] = jobs.submit(_rise_curves, vit, pixels, maps, pred, fill, mode, options.deletion_steps,
                                      clean, ends[mode], options.forward_batch)
        entry: list[dict[str, Any]] = [{} for _ in range(B)]
        for b in [b for b in range(B) if masks[b] is not None]:
            gt = np.asarray(masks[b], dtype=bool)
            c = segmentation_counts(rel[b].numpy(), gt)
            entry[b]["seg"] = {"correct": c.correct, "labeled": c.labeled, "inter": c.inter, "union": c.union,
                               "ap": c.ap[0]}
            hit = pointing_game(maps[b:b + 1].float(), torch.from_numpy(gt)[None])
            entry[b]["point"] = bool(hit[0])
        pending.append((name, entry, waits))

    for name, entry, waits in pending:
        own = waits["own"]
        for sign in ("pos", "neg"):
            logits = waits[sign]()
            logits_t = logits.clone()
            if own:
                logits_t[own] = waits[sign + "_own"]()
            hits, probs = _hits_probs(logits, pred)
            target_hits = _hits_probs(logits_t, target)[0]
            for b in range(B):
                entry[b][sign] = {"hit": hits[b], "prob": probs[b]}
                if labels[b] is not None:
                    entry[b][sign]["target_hit"] = target_hits[b]
        for mode in ("deletion", "insertion"):
            curve = waits[mode]()
            for b in range(B):
                entry[b][mode] = curve[b].tolist()
        for b in range(B):
            records[b]["methods"][name] = {key: entry[b][key] for key in
                                           ("pos", "neg", "seg", "point", "deletion", "insertion") if key in entry[b]}

    sane = [b for b in range(B) if int(keys[b]) < options.sanity_images]
    if sane:  # every forward pass above has been read back: the weights may change now
        ok = [n for n in options.methods if n in originals]
        rho = sanity_check(vit, pixels[sane], ok, [pred[b] for b in sane], [int(keys[b]) for b in sane],
                           seed=options.seed, originals={n: originals[n][sane] for n in ok})
        for i, b in enumerate(sane):
            for name, per_image in rho.items():
                records[b]["methods"][name]["sanity"] = per_image[i]
    return records


# ------------------------------------------------------------------------------------------------ aggregation
def _mean(rows: list[list[float]]) -> list[float] | None:
    return np.asarray(rows, dtype=np.float64).mean(axis=0).tolist() if rows else None


def aggregate(records: Sequence[dict[str, Any]], methods: Sequence[str], meta: dict[str, Any] | None = None,
              ) -> EvaluationTable:
    """The table of ``records`` (the ``ok`` records of a run): curves averaged over images, AUCs of the mean
    curves (equal to the mean of per-image AUCs: the trapezoid rule is linear), segmentation sums as Chefer's."""
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    for name in (*methods, RANDOM):
        per = [r["methods"].get(name, {}) for r in records]
        errors = [p["error"] for p in per if "error" in p]
        good = [p for p in per if "error" not in p and p]
        row: dict[str, Any] = {key: None for key, _, _ in COLUMNS}
        row.update(method=name, images=len(good))
        if errors:
            row["error"] = errors[0]
        c: dict[str, list[float]] = {}
        for sign, long in (("pos", "positive"), ("neg", "negative")):
            hit = _mean([p[sign]["hit"] for p in good])
            prob = _mean([p[sign]["prob"] for p in good])
            tgt = _mean([p[sign]["target_hit"] for p in good if "target_hit" in p[sign]])
            if hit is not None:
                c[f"{long}_predicted"], row[f"{sign}_pred"] = hit, perturbation_auc(hit)
            if prob is not None:
                c[f"{long}_probability"], row[f"{sign}_prob"] = prob, perturbation_auc(prob)
            if tgt is not None:
                c[f"{long}_target"], row[f"{sign}_target"] = tgt, perturbation_auc(tgt)
        segs = [p["seg"] for p in good if "seg" in p]
        if segs:
            total = SegmentationCounts()
            for s in segs:
                total.add(SegmentationCounts(s["correct"], s["labeled"], list(s["inter"]), list(s["union"]),
                                             [s["ap"]]))
            row.update(segmentation_scores(total))
            row["pointing"] = 100 * float(np.mean([p["point"] for p in good if "point" in p]))
        for mode in ("deletion", "insertion"):
            curve = _mean([p[mode] for p in good if mode in p])
            if curve is not None:
                c[mode] = curve
                x = np.linspace(0, 1, len(curve))
                y = np.asarray(curve)
                row[mode] = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 * 100)
        sanity = _mean([p["sanity"] for p in good if "sanity" in p])
        if sanity is not None:
            c["sanity"] = sanity
            row["sanity"] = sanity[-1]
        rows.append(row)
        curves[name] = c
    curves["x"] = {"perturbation": list(CURVE_X)}
    return EvaluationTable(rows=rows, curves=curves, meta=dict(meta or {}))


def figure_png(table: EvaluationTable) -> bytes:
    """The curves as one PNG: positive and negative perturbation (predicted class), deletion, insertion and
    the sanity check, one line per method."""
    from matplotlib.figure import Figure

    names = [r["method"] for r in table.rows]
    panels = [("positive_predicted", "positive perturbation (top-1 acc)"),
              ("negative_predicted", "negative perturbation (top-1 acc)"),
              ("deletion", "deletion (class prob.)"), ("insertion", "insertion (class prob.)"),
              ("sanity", "sanity: Spearman vs layers randomised")]
    fig = Figure(figsize=(4.0 * len(panels), 3.6), dpi=100)
    axes = fig.subplots(1, len(panels))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name in names:
            y = table.curves.get(name, {}).get(key)
            if not y:
                continue
            if key.endswith("predicted"):
                x = list(CURVE_X)
            elif key == "sanity":
                x = list(range(1, len(y) + 1))
            else:
                x = np.linspace(0, 1, len(y)).tolist()
            ax.plot(x, y, label=name, linestyle="--" if name == RANDOM else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layers randomised (top first)" if key == "sanity" else "fraction removed/inserted",
                      fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ records file
class Records:
    """``records.jsonl``: one JSON line per image (``rel``, ``status``, measures or ``error``), appended and
    fsynced; a last line cut short by a kill is dropped on load."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):  # cut short by a kill
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        for lineno, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("rel"), str):
                raise VitscopeError("output", f"{self.path} line {lineno + 1} is not an evaluate record",
                                    "delete that line, or pass overwrite=True to start over")
            self.entries[entry["rel"]] = entry

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        if not entries:
            return
        text = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        for e in entries:
            self.entries[e["rel"]] = e


# ------------------------------------------------------------------------------------------------ driver
def _samples(images: Any, masks: Any, labels: Sequence[str] | None, exclude: Path | None,
             limit: int | None) -> list[Sample]:
    if isinstance(images, (str, os.PathLike)) and str(images).lower().endswith(".mat") and Path(images).is_file():
        if masks is not None:
            raise VitscopeError("masks", "gtsegs_ijcv.mat holds its own masks", "drop masks")
        return imagenet_segmentation(images, limit)
    found = folder_samples(images, masks, labels, exclude=exclude)
    return found[:limit] if limit is not None else found


def _prepare(vit: Any, sample: Sample, policy: Any, size: Any) -> tuple[torch.Tensor, np.ndarray | None]:
    """Pixels ``(C, H, W)`` and the mask resized (nearest) to ``(H, W)``."""
    from PIL import Image

    from vitscope.images import image_to_pixels, load_image

    image, mask = sample.load()
    img = load_image(image, "images")
    pixels = image_to_pixels(img, vit.info.preprocess, vit.info.patch_size, policy, size)
    if mask is None:
        return pixels, None
    if mask.shape != (img.height, img.width):
        raise VitscopeError("masks", f"{sample.rel}: mask {mask.shape[1]}x{mask.shape[0]} but image "
                            f"{img.width}x{img.height}", "give each image a mask of its own size")
    H, W = int(pixels.shape[-2]), int(pixels.shape[-1])
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((W, H), Image.Resampling.NEAREST)
    return pixels, np.asarray(small) > 0


def _chunks(todo: list[tuple[int, Sample]], size: int) -> Iterator[list[tuple[int, Sample]]]:
    for start in range(0, len(todo), size):
        yield todo[start:start + size]


def evaluate(
    images: Any,
    output: str | os.PathLike[str] | None = None,
    *,
    model: Any = "vitscope:shapes",
    methods: str | Sequence[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    deletion_steps: int = 10,
    sanity_images: int = 16,
    limit: int | None = None,
    seed: int = 0,
    policy: Any = None,
    size: int | tuple[int, int] | None = None,
    device: str | torch.device | None = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    engine: str = "local",
    **engine_options: Any,
) -> EvaluationTable:
    """Score every method's map on a dataset by the published protocols and return one table.

    Args:
        images: an image folder (labels from parent folders named after the model's classes), a glob, a list
            file, or ImageNet-Segmentation's ``gtsegs_ijcv.mat``.
        output: folder for ``records.jsonl`` (resume), ``table.csv``/``.json``, ``summary.md``, ``curves.png``;
            ``None`` writes nothing (no resume).
        model: a `VitModel` or spec (a classifier: the tests follow its predictions).
        methods: registered names (a list or ``"cls,rollout"``; default every registered attribution map the model can run, feature views left out); ``random`` is
            always added as the baseline.
        masks: a mask folder mirroring ``images`` or a COCO annotation ``.json``: segmentation test and pointing
            game.
        batch_size: images per chunk (one record write each); perturbed inputs go through the model in batches of
            ``max(512, batch_size)``.
        deletion_steps: RISE deletion/insertion steps (the curve has ``steps + 1`` points).
        sanity_images: the first this many images also get the sanity check (0: none).
        limit: evaluate the first this many images only.
        seed: random baseline and randomisation draws.
        policy, size: preprocessing (``crop`` is refused with masks: the mask frame must be the whole image).
        device: where the model runs.
        overwrite: start over (previous records removed) / write beside files vitscope did not write.
        progress: a progress bar on stderr.
        engine: ``"local"`` or ``"ray"`` (chunks run by Ray actors, each loading the model once; options
            ``address``, ``concurrency``, ``num_cpus``).
    """
    from vitscope._io import claim_output, remove_temp_files
    from vitscope.adapters import as_vit
    from vitscope.methods.api import get_method, method_names, supported_methods

    if engine not in ("local", "ray"):
        raise VitscopeError("engine", f"unknown engine {engine!r}", "use 'local' or 'ray'")
    unknown = sorted(set(engine_options) - {"address", "concurrency", "num_cpus"})
    if unknown:
        raise VitscopeError(unknown[0], "evaluate has no such option", "see help(vitscope.evaluate)")
    if engine == "local" and any(v is not None for v in engine_options.values()):
        given = next(k for k, v in engine_options.items() if v is not None)
        raise VitscopeError(given, "the local engine does not use it", "drop it, or use engine='ray'")
    for name, value, low in (("batch_size", batch_size, 1), ("deletion_steps", deletion_steps, 1),
                             ("sanity_images", sanity_images, 0), ("limit", limit if limit is not None else 1, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise VitscopeError(name, f"expected an integer >= {low}, got {value!r}", f"pass e.g. {name}={max(low, 8)}")
    chosen = () if methods is None else tuple(
        m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip())
    if methods is not None and not chosen:
        raise VitscopeError("methods", "no method given", f"use some of {', '.join(method_names())}")
    for m in chosen:
        if m == RANDOM:
            raise VitscopeError("methods", "'random' is the baseline every table has", "drop it from methods")
        get_method(m, argument="methods")
    out = Path(output) if output is not None else None
    folder = None
    if out is not None:
        folder = claim_output(out, "evaluate", overwrite=overwrite, known=(RECORDS, CONFIG, *OUTPUTS))
    vit = as_vit(model)  # after the output is claimed: a wrong -o is refused before the model loads
    if methods is None:  # every attribution map this model can run (feature views map features, not evidence)
        chosen = tuple(m for m in supported_methods(vit) if get_method(m).needs != "features")
    options = EvalOptions(methods=chosen, deletion_steps=deletion_steps, sanity_images=sanity_images, seed=seed,
                          forward_batch=max(512, batch_size))

    if masks is not None and (policy or vit.info.preprocess.policy) == "crop":
        raise VitscopeError("masks", "masks need the whole image in the model input", "use policy='resize' or 'native'")
    if device is not None:
        from vitscope.capture.prepare import resolve_device

        dev = resolve_device(device, vit.device)
        if dev != vit.device:
            vit.module.to(dev)
    samples = _samples(images, masks, vit.info.labels, out.resolve() if out is not None else None, limit)
    if not samples:
        raise VitscopeError("images", f"no images found in {images}", "pass a folder, glob, list or .mat")
    config = {"model": str(getattr(vit.info, "name", "")), "options": options.to_dict(),
              "policy": policy, "size": list(size) if isinstance(size, tuple) else size,
              "images": str(images), "masks": None if masks is None else str(masks)}

    records = Records(out / RECORDS) if out is not None else None
    if out is not None and records is not None and folder is not None:
        out.mkdir(parents=True, exist_ok=True)
        remove_temp_files(out)
        cfg_path = out / CONFIG
        if overwrite:
            for name in (RECORDS, CONFIG, *OUTPUTS):
                with contextlib.suppress(FileNotFoundError):
                    if folder.is_ours(name):
                        (out / name).unlink()
        elif cfg_path.exists():
            try:
                old = json.loads(cfg_path.read_text(encoding="utf-8"))
            except ValueError:
                old = None
            if old != config:
                raise VitscopeError("output", f"{out} holds an evaluation with other settings",
                                    "pass the same options to resume, another folder, or overwrite=True")
        from vitscope._io import atomic_write_text

        folder.check_writes([RECORDS, CONFIG, *OUTPUTS])
        atomic_write_text(cfg_path, json.dumps(config, indent=1, sort_keys=True))
        records.load()
        folder.record([CONFIG])

    done = records.entries if records is not None else {}
    todo = [(i, s) for i, s in enumerate(samples) if done.get(s.rel, {}).get("status") != "ok"]
    fresh: dict[str, dict[str, Any]] = {}

    def save(entries: list[dict[str, Any]]) -> None:
        if records is not None:
            records.append(entries)
        for e in entries:
            fresh[e["rel"]] = e

    from tqdm.auto import tqdm

    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), unit="img", desc="vitscope evaluate",
               disable=not progress, leave=False)
    try:
        if engine == "ray":
            from vitscope.evaluate.ray_engine import run_ray

            run_ray(_run_chunk, vit, todo, options, policy, size, save, bar, batch_size=batch_size,
                    **{k: v for k, v in engine_options.items() if v is not None})
        else:
            for chunk in _chunks(todo, batch_size):
                save(_run_chunk(vit, chunk, options, policy, size))
                bar.update(len(chunk))
    finally:
        bar.close()

    every = {**done, **fresh} if records is None else records.entries
    ok = [every[s.rel] for s in samples if every.get(s.rel, {}).get("status") == "ok"]
    failed = [(s.rel, every[s.rel].get("error")) for s in samples if every.get(s.rel, {}).get("status") == "error"]
    meta = {"model": config["model"], "images": len(samples), "scored": len(ok), "failed": len(failed),
            "errors": failed[:20], "options": options.to_dict(), "engine": engine}
    table = aggregate(ok, chosen, meta)
    if out is not None and folder is not None:
        from vitscope._io import atomic_write_bytes, atomic_write_text

        atomic_write_text(out / TABLE_CSV, table.to_csv())
        atomic_write_text(out / TABLE_JSON, table.to_json())
        atomic_write_text(out / SUMMARY_MD, _summary_md(table))
        atomic_write_bytes(out / FIGURE, figure_png(table))
        folder.record([CONFIG, *OUTPUTS])
    return table


def _run_chunk(vit: Any, chunk: list[tuple[int, Sample]], options: EvalOptions, policy: Any, size: Any,
               ) -> list[dict[str, Any]]:
    """Load, group by input size, evaluate: the records of one chunk (a bad image is an ``error`` record)."""
    from vitscope import _interrupt
    from vitscope.batch.local import error_line

    entries: list[dict[str, Any]] = []
    ready: dict[tuple[int, ...], list[tuple[int, Sample, torch.Tensor, np.ndarray | None]]] = {}
    for index, sample in chunk:
        try:
            pixels, mask = _prepare(vit, sample, policy, size)
        except Exception as exc:
            _interrupt.check()
            entries.append({"rel": sample.rel, "status": "error", "error": error_line(exc)})
            continue
        ready.setdefault(tuple(pixels.shape), []).append((index, sample, pixels, mask))
    for group in ready.values():
        pixels = torch.stack([g[2] for g in group])
        recs = evaluate_chunk(vit, pixels, [g[3] for g in group], [g[1].label for g in group],
                              [g[0] for g in group], options)
        for g, rec in zip(group, recs, strict=True):
            entries.append({"rel": g[1].rel, "status": "ok", **rec})
    return entries


def _summary_md(table: EvaluationTable) -> str:
    m = table.meta
    head = (f"# vitscope evaluate\n\nModel `{m.get('model')}`, {m.get('scored')} of {m.get('images')} images scored "
            f"({m.get('failed')} failed); perturbation and segmentation numbers in percent.\n\n")
    legend = "\n".join(f"- **{h}**: {d}" for k, h, d in COLUMNS if k not in ("method", "images"))
    return head + table.to_markdown() + "\n" + legend + f"\n\n![curves]({FIGURE})\n"
