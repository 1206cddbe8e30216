"""Each evaluation metric against a reference written here from the papers' evaluation code as described
(Chefer et al.'s ``pertubation_eval_from_hdf5.py`` and ``imagenet_seg_eval.py``/``utils/metrices.py``, the
AUC rule of their reproductions, Spearman's definition), on hand-made maps, masks and model outputs, to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitscope.evaluate.core import EvalOptions, aggregate, evaluate_chunk
from vitscope.evaluate.metrics import (
    average_precision,
    perturbation_auc,
    random_maps,
    segmentation_counts,
    segmentation_scores,
    spearman,
)


# ------------------------------------------------------------------------------------------------ references
def ref_bilinear(grid: np.ndarray, H: int, W: int) -> np.ndarray:
    """Bilinear upsampling with half-pixel centres (torch's align_corners=False), written out: output pixel
    centre y maps to source (y + 0.5) * rows / H - 0.5, clamped at the border."""
    rows, cols = grid.shape
    out = np.zeros((H, W))
    for y in range(H):
        sy = max((y + 0.5) * rows / H - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), rows - 1)
        y1 = min(y0 + 1, rows - 1)
        wy = sy - y0
        for x in range(W):
            sx = max((x + 0.5) * cols / W - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), cols - 1)
            x1 = min(x0 + 1, cols - 1)
            wx = sx - x0
            out[y, x] = ((1 - wy) * ((1 - wx) * grid[y0, x0] + wx * grid[y0, x1])
                         + wy * ((1 - wx) * grid[y1, x0] + wx * grid[y1, x1]))
    return out


def ref_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision as scikit-learn defines it: sum over distinct thresholds t (descending) of
    (recall(t) - recall(previous t)) * precision(t)."""
    ap, prev_recall = 0.0, 0.0
    pos = targets.sum()
    for t in sorted(set(scores.tolist()), reverse=True):
        sel = scores >= t
        tp = float((targets & sel).sum())
        recall, precision = tp / pos, tp / sel.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def ref_segmentation(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """Chefer's imagenet_seg_eval.py over a dataset: min-max, threshold Res > mean (Res <= mean is background),
    class = argmax of (Res_0, Res_1); pixel accuracy and per-class IoU summed over images via histograms of
    label + 1 on [1, 2]; AP per image on the one-hot (1 - Res, Res) channels, then averaged."""
    correct = labeled = 0
    inter = np.zeros(2)
    union = np.zeros(2)
    aps = []
    for res, gt in zip(maps, masks, strict=True):
        res = (res - res.min()) / (res.max() - res.min())
        out = np.stack([(res <= res.mean()).astype(float), (res > res.mean()).astype(float)])
        pred = out.argmax(axis=0) + 1
        lab = gt.astype(int) + 1
        labeled += (lab > 0).sum()
        correct += ((pred == lab) * (lab > 0)).sum()
        p = pred * (lab > 0)
        i = p * (p == lab)
        a_i = np.histogram(i, bins=2, range=(1, 2))[0]
        a_p = np.histogram(p, bins=2, range=(1, 2))[0]
        a_l = np.histogram(lab, bins=2, range=(1, 2))[0]
        inter += a_i
        union += a_p + a_l - a_i
        scores = np.concatenate([(1 - res).ravel(), res.ravel()])
        onehot = np.concatenate([(gt == 0).ravel(), (gt == 1).ravel()])
        aps.append(ref_ap(scores, onehot))
    eps = np.spacing(1)
    return {"pixel_accuracy": 100 * correct / (eps + labeled), "miou": 100 * float((inter / (eps + union)).mean()),
            "map": 100 * float(np.mean(aps))}


def ref_auc(curve: list[float]) -> float:
    """The reproductions' rule: sklearn.metrics.auc(x=np.arange(0, 1, 0.1), y) * 100 (trapezoids)."""
    x = np.arange(0, 1, 0.1)
    return float(sum((x[i + 1] - x[i]) * (curve[i] + curve[i + 1]) / 2 for i in range(len(x) - 1)) * 100)


# ------------------------------------------------------------------------------------------------ tests
def test_auc_rule_is_trapezoid_over_ten_percent_steps() -> None:
    curve = [1.0, 0.9, 0.7, 0.65, 0.4, 0.3, 0.3, 0.1, 0.05, 0.0]
    assert perturbation_auc(curve) == pytest.approx(ref_auc(curve), abs=1e-6)
    assert perturbation_auc([1.0] * 10) == pytest.approx(90.0, abs=1e-9)  # x spans 0 .. 0.9
    with pytest.raises(Exception, match="points"):
        perturbation_auc(curve[:9])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_equals_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(200), 1)  # many ties: thresholds group them as scikit-learn does
    targets = rng.random(200) < 0.3
    assert average_precision(scores, targets) == pytest.approx(ref_ap(scores, targets), abs=1e-12)


def test_segmentation_by_hand() -> None:
    """A 2x2 map [[0, 1], [2, 3]] -> normalised [[0, 1/3], [2/3, 1]], mean 1/2: foreground is the bottom row.
    Mask: top-right and bottom-right. Correct: (0,0) bg, (1,1) fg -> 2 of 4; IoU bg: inter 1 / union 3,
    fg: inter 1 / union 3 -> mIoU 1/3."""
    c = segmentation_counts(np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[False, True], [False, True]]))
    s = segmentation_scores(c)
    assert s["pixel_accuracy"] == pytest.approx(50.0, abs=1e-6)
    assert s["miou"] == pytest.approx(100 / 3, abs=1e-6)
    # a constant map: NaN after Chefer's min-max, so all background, and both AP channels score 0 (AP = 4 positives / 8)
    flat = segmentation_scores(segmentation_counts(np.ones((2, 2)), np.array([[False, True], [False, True]])))
    assert flat["pixel_accuracy"] == pytest.approx(50.0, abs=1e-6)
    assert flat["map"] == pytest.approx(50.0, abs=1e-6)


def test_segmentation_matches_chefer_reference() -> None:
    rng = np.random.default_rng(3)
    maps = [rng.random((12, 12)) ** 2 for _ in range(5)]
    masks = [rng.random((12, 12)) < 0.4 for _ in range(5)]
    maps[1] = np.round(maps[1], 1)  # ties in the AP
    total = segmentation_counts(maps[0], masks[0])
    for m, g in zip(maps[1:], masks[1:], strict=True):
        total.add(segmentation_counts(m, g))
    ours, ref = segmentation_scores(total), ref_segmentation(maps, masks)
    for key in ("pixel_accuracy", "miou", "map"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key


def test_spearman_definition_and_ties() -> None:
    a = np.array([1.0, 2.0, 2.0, 5.0, 3.0])
    b = np.array([2.0, 1.0, 4.0, 4.0, 9.0])
    # average ranks by hand: a -> 1, 2.5, 2.5, 5, 4; b -> 2, 1, 3.5, 3.5, 5
    ra, rb = np.array([1, 2.5, 2.5, 5, 4]), np.array([2, 1, 3.5, 3.5, 5])
    expected = np.corrcoef(ra, rb)[0, 1]
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.ones(5)) == 0.0
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.random(40), np.round(rng.random(40), 1)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_perturbation_curves_match_chefer_reference(shapes_vit, shapes_batch) -> None:
    """evaluate_chunk's random-baseline curves against Chefer's procedure written here: the map bilinear to
    pixels, the int(s * H * W) top pixels (of -map for negative) set to 0 in [0, 1] space, then normalised;
    top-1 hit of the predicted class and its probability at 0% and each 10% step."""
    vit = shapes_vit
    pixels, masks, labels = shapes_batch
    B, C, H, W = pixels.shape
    keys = list(range(B))
    opts = EvalOptions(methods=(), deletion_steps=4, sanity_images=0)
    recs = evaluate_chunk(vit, pixels, masks, labels, keys, opts)
    mean = torch.tensor(vit.info.preprocess.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(vit.info.preprocess.std).reshape(1, 3, 1, 1)
    raw = pixels * std + mean  # the [0, 1] images
    grid = vit.grid_for((H, W))
    maps = random_maps(0, keys, grid)
    with torch.no_grad():
        pred = vit.module(pixels).argmax(-1)
    for b in range(B):
        vis = ref_bilinear(maps[b].astype(np.float64), H, W).ravel()
        for sign, flip in (("pos", 1.0), ("neg", -1.0)):
            hits, probs = [], []
            for step in [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
                k = int(H * W * step)
                top = np.argsort(-(flip * vis), kind="stable")[:k]
                img = raw[b].clone().reshape(C, -1)
                img[:, torch.from_numpy(top)] = 0.0
                x = (img.reshape(1, C, H, W) - mean) / std
                with torch.no_grad():
                    p = vit.module(x).double().softmax(-1)[0]
                hits.append(int(p.argmax() == pred[b]))
                probs.append(float(p[pred[b]]))
            got = recs[b]["methods"]["random"][sign]
            assert got["hit"] == hits, (b, sign)
            np.testing.assert_allclose(got["prob"], probs, atol=1e-6)
    # the target-class variant: the label's hit; the table's AUC is the reproductions' rule on the mean curve
    table = aggregate([{"rel": str(b), **r} for b, r in enumerate(recs)], ())
    row = table.row("random")
    mean_curve = np.mean([r["methods"]["random"]["pos"]["hit"] for r in recs], axis=0).tolist()
    assert row["pos_pred"] == pytest.approx(ref_auc(mean_curve), abs=1e-6)
    tgt = np.mean([r["methods"]["random"]["neg"]["target_hit"] for r in recs], axis=0)
    assert tgt[0] == pytest.approx(np.mean([int(labels[b]) == int(pred[b]) for b in range(B)]))
    assert row["neg_target"] == pytest.approx(ref_auc(tgt.tolist()), abs=1e-6)


def test_segmentation_and_pointing_in_chunk(shapes_vit, shapes_batch) -> None:
    """The chunk's segmentation sums are the reference's on the bilinear map at pixels; the pointing game hits
    when the grid maximum's patch centre lies in the mask."""
    vit = shapes_vit
    pixels, masks, labels = shapes_batch
    B, _, H, W = pixels.shape
    recs = evaluate_chunk(vit, pixels, masks, labels, list(range(B)), EvalOptions(methods=(), sanity_images=0))
    maps = random_maps(0, list(range(B)), vit.grid_for((H, W)))
    table = aggregate([{"rel": str(b), **r} for b, r in enumerate(recs)], ())
    ref = ref_segmentation([ref_bilinear(m.astype(np.float64), H, W) for m in maps], masks)
    row = table.row("random")
    for key in ("pixel_accuracy", "miou", "map"):
        assert row[key] == pytest.approx(ref[key], abs=1e-6), key
    rows, cols = maps.shape[1:]
    hits = []
    for b in range(B):
        r, c = divmod(int(np.argmax(maps[b])), cols)
        hits.append(bool(masks[b][int((r + 0.5) * H / rows), int((c + 0.5) * W / cols)]))
    assert row["pointing"] == pytest.approx(100 * np.mean(hits))
    # deletion/insertion: the table's number is the trapezoid over [0, 1] of the mean curve, x100
    curve = np.mean([r["methods"]["random"]["deletion"] for r in recs], axis=0)
    x = np.linspace(0, 1, len(curve))
    assert row["deletion"] == pytest.approx(100 * float(np.trapezoid(curve, x)), abs=1e-6)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_rise_curves_equal_the_library_perturbation_auc(shapes_vit, shapes_batch, mode: str) -> None:
    """The chunk's deletion/insertion curves (end points shared across methods) are
    `vitscope.methods.metrics.perturbation_auc`'s with the same black canvas, class and steps."""
    from vitscope.evaluate.metrics import black_fill
    from vitscope.methods.metrics import perturbation_auc as rise

    vit = shapes_vit
    pixels, masks, labels = shapes_batch
    B, _, H, W = pixels.shape
    recs = evaluate_chunk(vit, pixels, masks, labels, list(range(B)), EvalOptions(methods=(), deletion_steps=5,
                                                                                 sanity_images=0))
    maps = torch.from_numpy(random_maps(0, list(range(B)), vit.grid_for((H, W))))
    prep = vit.info.preprocess
    pred = [r["prediction"] for r in recs]
    ref = rise(vit, pixels, maps, target=pred, mode=mode, steps=5,
               baseline=black_fill(prep.mean, prep.std).float().reshape(3, 1, 1))
    got = np.array([r["methods"]["random"][mode] for r in recs])
    np.testing.assert_allclose(got, ref.scores.numpy(), atol=1e-6)
