"""Batch mode's per-image measures and dataset summary (`vitscope.batch.stats`), shared by both engines.

The one-pass `image_statistics` equals independent references (a hand loop over patch centres on the captured
attention, token norms of `vitscope.capture`, the model's own logits), under fused and explicit-softmax attention;
`SummaryAccumulator` equals numpy's mean/std and plain sums, however the images are split and merged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitscope
from tests.conftest import assert_same_summary, make_tiny_vit
from vitscope.batch.stats import SummaryAccumulator, image_record, image_statistics
from vitscope.capture import capture
from vitscope.methods.artifacts import outlier_threshold


def _peaked_vit(registers: int = 1):
    """The tiny ViT with q/k weights redrawn with std 0.5 (init: 0.02), so attention is far from uniform (the
    mean row maximum is checked below)."""
    vit = make_tiny_vit(num_registers=registers, image_size=(32, 48), seed=4)
    dim = vit.blocks[0].attn.qkv.weight.shape[1]
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for blk in vit.blocks:  # q and k rows of the fused projection
            blk.attn.qkv.weight[: 2 * dim] = 0.5 * torch.randn(2 * dim, dim, generator=gen)
    return vit


def _distance_by_hand(weights: np.ndarray, grid: tuple[int, int], patch: tuple[int, int], prefix: int) -> np.ndarray:
    """(L, B, H) mean over query patches of sum_j a_ij ||c_i - c_j|| (patch centres, patch keys renormalised)."""
    rows, cols = grid
    centres = np.array([((r + 0.5) * patch[0], (c + 0.5) * patch[1]) for r in range(rows) for c in range(cols)])
    dist = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))  # (P, P)
    a = weights[:, :, :, prefix:, prefix:]  # (L, B, H, P, P): patch queries x patch keys
    a = a / a.sum(-1, keepdims=True)
    return (a * dist).sum(-1).mean(-1)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit-softmax"])
def test_image_statistics_equal_independent_references(fused: bool) -> None:
    vit = _peaked_vit()
    vit.set_fused_attn(fused)
    pixels = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    stats = image_statistics(vit, pixels)
    attn = capture(vit, pixels, token_norms=True)  # every layer, head and row
    w = attn.weights.double().numpy()  # (L, B, H, N, N)
    assert w.max(-1).mean() > 0.5  # peaked (measured 0.80): a wrong row or key order changes the distances
    P0 = 2  # [CLS] + 1 register
    expected = _distance_by_hand(w, attn.grid, attn.patch_size, P0).transpose(1, 0, 2)  # (B, L, H)
    np.testing.assert_allclose(stats["distance"], expected, rtol=1e-5)
    norms = attn.token_norms[:, :, P0:].double().numpy()  # (L, B, P)
    np.testing.assert_allclose(stats["norm_mean"], norms.mean(-1).T, rtol=1e-6)
    high = np.array([[(norms[layer, b] > outlier_threshold(norms[layer, b])).sum() for layer in range(2)]
                     for b in range(3)])
    np.testing.assert_array_equal(stats["norm_high"], high)
    assert list(stats["patch_tokens"]) == [4 * 6] * 3
    with torch.no_grad():
        probs = torch.softmax(vit(pixels), dim=-1)
    np.testing.assert_array_equal(stats["prediction"], probs.argmax(-1).numpy())
    np.testing.assert_allclose(stats["score"], probs.amax(-1).numpy(), rtol=1e-6)
    cut = image_statistics(vit, pixels, norm_threshold=float(np.median(norms)))  # a fixed cut
    np.testing.assert_array_equal(cut["norm_high"], (norms > np.median(norms)).sum(-1).T)
    assert vit.blocks[0].attn.fused_attn is fused  # the model is left as it was


def test_image_record_holds_plain_values() -> None:
    vit = _peaked_vit(registers=0)
    stats = image_statistics(vit, torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)))
    rec = image_record(stats, 1, labels=["a", "b", "c", "d", "e"])
    assert rec["distance"] == stats["distance"][1].ravel().tolist()  # layer-major (layers * heads)
    assert rec["prediction"] == int(stats["prediction"][1]) and rec["label"] == "abcde"[rec["prediction"]]
    assert isinstance(rec["score"], float) and isinstance(rec["norm_high"][0], int)
    no_head = {**stats, "prediction": np.array([-1, -1])}  # a backbone without a classifier
    assert (image_record(no_head, 0)["prediction"], image_record(no_head, 0)["score"]) == (None, None)


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rec = {"distance": rng.uniform(0, 40, size=6).tolist(), "norm_mean": rng.uniform(1, 9, size=2).tolist(),
               "norm_high": rng.integers(0, 5, size=2).tolist(), "patch_tokens": 24, "prediction": int(i % 3)}
        if i % 2 == 0:
            rec |= {"pointing": bool(i % 4 == 0), "iou": float(rng.uniform())}
        out.append(rec)
    return out


def test_accumulator_equals_numpy_and_merges_in_any_split() -> None:
    recs = _records(9, seed=3)
    whole = SummaryAccumulator()
    for r in recs:
        whole.add("ok", r)
    whole.add("error", None)
    s = whole.summary(num_heads=3, config={"method": "cls"})
    d = np.array([r["distance"] for r in recs]).reshape(9, 2, 3)
    assert (s["images"], s["failed"], s["method"]) == (9, 1, "cls")
    np.testing.assert_allclose(s["distance"]["mean"], d.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["distance"]["std"], d.std(0), rtol=1e-10)  # population std (ddof=0)
    high = np.array([r["norm_high"] for r in recs])
    np.testing.assert_allclose(s["high_norm"]["rate"], high.sum(0) / (24 * 9), rtol=1e-12)
    np.testing.assert_allclose(s["high_norm"]["mean_norm"], np.mean([r["norm_mean"] for r in recs], 0), rtol=1e-12)
    masked = [r for r in recs if "pointing" in r]
    assert s["localisation"] == pytest.approx({"images": 5, "pointing_game": np.mean([r["pointing"] for r in masked]),
                                               "mask_iou": np.mean([r["iou"] for r in masked])})
    assert s["predictions"] == {"0": 3, "1": 3, "2": 3}
    # split into three parts (as the Ray engine's partial sums), through JSON, merged in another order
    parts = [SummaryAccumulator(), SummaryAccumulator(), SummaryAccumulator()]
    for i, r in enumerate(recs):
        parts[i % 3].add("ok", r)
    parts[1].add("error", None)
    merged = SummaryAccumulator()
    for p in (parts[2], parts[0], parts[1]):
        merged.merge(SummaryAccumulator.from_json(p.to_json()))
    m = merged.summary(num_heads=3, config={"method": "cls"})
    assert m.keys() == s.keys() and m["predictions"] == s["predictions"] and m["failed"] == 1
    np.testing.assert_allclose(m["distance"]["mean"], s["distance"]["mean"], rtol=1e-12)
    np.testing.assert_allclose(m["distance"]["std"], s["distance"]["std"], rtol=1e-10)
    assert_same_summary(m, s)
    # an empty accumulator merges as nothing; a run with no images has counts only
    assert SummaryAccumulator().summary(num_heads=3) == {"images": 0, "failed": 0, "predictions": {}}
    assert merged.merge(SummaryAccumulator()).summary(num_heads=3, config={"method": "cls"}) == m


def test_unreadable_mask_is_named_by_its_path() -> None:
    """A garbage mask file's error names the file, not the buffer it was read into ("<_io.BytesIO ...>")."""
    from vitscope.batch.stats import mask_image
    from vitscope.errors import ImageError

    with pytest.raises(ImageError) as exc:
        mask_image(b"not a png", (8, 8), name="masks/a/cat.png")
    assert str(exc.value).startswith("masks: masks/a/cat.png is not an image PIL can read")
    assert "BytesIO" not in str(exc.value)


def _measures(vit, pixels, background: bool):
    from vitscope.batch.stats import ImageMeasures
    from vitscope.methods.registry import MapContext

    m = ImageMeasures(vitscope.wrap(vit), pixels, background=background)
    MapContext(vitscope.wrap(vit), pixels, observers=[m]).observe()
    return m


def test_distances_reduced_beside_the_forward_equal_those_reduced_in_it(monkeypatch):
    """With a spare core the distances' reductions run on a thread of their own (`spare_core`) from copies of
    each layer's patch q and k: the measures are bit-for-bit those of the reduction inside the forward pass,
    and a reduction that fails re-raises in `result()` (not lost on the thread)."""
    import threading

    from vitscope.methods import distance

    vit = _peaked_vit()
    pixels = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)
    inline = _measures(vit, pixels, background=False).result()
    threads = []
    real = distance.add_distance_from_qk

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(distance, "add_distance_from_qk", spy)
    beside = _measures(vit, pixels, background=True).result()
    assert threads and all(name.startswith("vitscope-measures") for name in threads)
    for key, value in inline.items():
        np.testing.assert_array_equal(beside[key], value, err_msg=key)

    def broken(*args, **kwargs):
        raise RuntimeError("reduction failed")

    monkeypatch.setattr(distance, "add_distance_from_qk", broken)
    measures = _measures(vit, pixels, background=True)
    with pytest.raises(RuntimeError, match="reduction failed"):
        measures.result()


@pytest.mark.parametrize(("threads", "load", "spare"), [
    (1, 0.2, True),  # an idle core beside one compute thread
    (1, 1.6, False),  # other work keeps the second core busy: the reductions stay inside the forward
    (2, 0.0, False),  # torch's threads take every core
])
def test_spare_core_needs_an_idle_core(threads: int, load: float, spare: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The measures reduce beside the forward only when a core is idle: fewer torch threads than cores *and* a
    load average that leaves one (on a busy machine a thread of their own competes with the forward)."""
    import os

    from vitscope.batch import stats

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert stats.spare_core(torch.device("cpu")) is spare
    assert stats.spare_core(torch.device("meta")) is False  # not a CPU: never
