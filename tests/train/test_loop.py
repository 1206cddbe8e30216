"""The training loop: schedule, augmentation, exact resume, early stopping, outputs, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from vitscope.errors import VitscopeError
from vitscope.models.vit import load_vit
from vitscope.train import loop
from vitscope.train.augment import random_resized_crop_flip
from vitscope.train.loop import TrainConfig, epoch_order, lr_factor, preset, train


def tiny_config(**kw: object) -> TrainConfig:
    """Shapes at 16 px, patch 4, one block of width 16: a few steps take well under a second."""
    base = dict(dataset="shapes", image_size=(16, 16), patch_size=4, depth=1, dim=16, heads=2, mlp_ratio=2.0,
                batch_size=8, lr=3e-3, warmup_steps=2, epochs=3, train_size=32, val_size=16, val_every=3,
                checkpoint_every=2, patience=100, augment=True, dropout=0.1, seed=1)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- pieces
def test_lr_schedule_warmup_then_cosine() -> None:
    warm, total, floor = 4, 14, 0.1
    assert [lr_factor(s, warm, total, floor) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, warm, total, floor) == pytest.approx(1.0)
    # halfway through the decay the cosine is at 0: factor = floor + (1 - floor) / 2
    assert lr_factor(9, warm, total, floor) == pytest.approx(0.55)
    assert lr_factor(14, warm, total, floor) == pytest.approx(0.1)
    assert lr_factor(99, warm, total, floor) == pytest.approx(0.1)


def test_epoch_order_is_a_seeded_permutation() -> None:
    a = epoch_order(50, seed=3, epoch=2)
    assert sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, epoch_order(50, seed=3, epoch=2))
    assert not torch.equal(a, epoch_order(50, seed=3, epoch=3))
    assert not torch.equal(a, epoch_order(50, seed=4, epoch=2))


def test_augment_identity_flip_and_crop() -> None:
    H, W = 6, 10
    ramp = ((torch.arange(W) + 0.5) / W).expand(2, 1, H, W).contiguous()  # value = x-coordinate of the pixel
    g = torch.Generator().manual_seed(0)
    same = random_resized_crop_flip(ramp, g, scale=(1, 1), ratio=(W / H, W / H), flip=False)
    torch.testing.assert_close(same, ramp, atol=1e-6, rtol=0)
    outs = random_resized_crop_flip(ramp.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1), scale=(1, 1),
                                    ratio=(W / H, W / H), flip=True)
    flipped = [torch.allclose(o, ramp[0].flip(-1), atol=1e-6) for o in outs]
    assert all(f or torch.allclose(o, ramp[0], atol=1e-6) for f, o in zip(flipped, outs, strict=True)) and 0 < sum(flipped) < len(outs)
    # a box of a quarter of the area with the image's aspect is half as wide: the ramp's slope halves
    crop = random_resized_crop_flip(ramp, torch.Generator().manual_seed(2), scale=(0.25, 0.25),
                                    ratio=(W / H, W / H), flip=False)
    slope = crop[..., 1:] - crop[..., :-1]
    torch.testing.assert_close(slope, torch.full_like(slope, 0.5 / W), atol=1e-5, rtol=0)
    assert crop.min() >= 0 and crop.max() <= 1
    # reproducible from the generator's seed
    a = random_resized_crop_flip(ramp, torch.Generator().manual_seed(5))
    assert torch.equal(a, random_resized_crop_flip(ramp, torch.Generator().manual_seed(5)))


def test_presets_carry_seed_004_defaults() -> None:
    cfg = preset("seed004")
    assert (cfg.dataset, cfg.image_size, cfg.patch_size, cfg.depth, cfg.dim, cfg.heads) == (
        "cifar10", (64, 64), 4, 4, 128, 4)
    assert (cfg.batch_size, cfg.lr, cfg.patience, cfg.epochs, cfg.val_every) == (16, 5e-4, 10, 100, 10_000)
    assert preset("shapes", depth=2).depth == 2
    with pytest.raises(VitscopeError, match="unknown preset"):
        preset("imagenet")
    with pytest.raises(VitscopeError, match="unknown training options"):
        preset("shapes", depht=3)
    with pytest.raises(VitscopeError, match="multiple of patch"):
        TrainConfig(image_size=(30, 30), patch_size=4)


# ---------------------------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_vit(folder).state_dict()


def test_killed_and_resumed_run_gives_the_same_weights(tmp_path: Path) -> None:
    cfg = tiny_config()  # 3 epochs x 4 steps, validation every 3, checkpoints every 2
    ref = train(cfg, tmp_path / "ref", progress=False, log=lambda s: None)
    assert ref.step == 12 and ref.stopped == "finished"

    def kill_at_7(step: int) -> None:
        if step == 7:
            raise _Killed  # like a SIGKILL after step 7: the last checkpoint on disk is step 6's
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "run", progress=False, log=lambda s: None, on_step=kill_at_7)
    state = torch.load(tmp_path / "run/checkpoints/last/trainer_state.pt", weights_only=True)
    assert state["state"]["step"] == 6
    resumed = train(cfg, tmp_path / "run", resume=True, progress=False, log=lambda s: None)
    assert resumed.step == 12

    for name in ("checkpoints/last", "checkpoints/best", "."):
        a, b = _weights(tmp_path / "ref" / name), _weights(tmp_path / "run" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the metrics of the resumed run are those of the uninterrupted one
    assert (tmp_path / "ref/metrics.csv").read_text().splitlines()[1:] != []
    ref_rows = _rows(tmp_path / "ref/metrics.csv")
    run_rows = _rows(tmp_path / "run/metrics.csv")
    assert [(r["step"], r["val_acc"], r["train_loss"]) for r in ref_rows] == [
        (r["step"], r["val_acc"], r["train_loss"]) for r in run_rows]


def test_weights_change_and_differ_across_seeds(tmp_path: Path) -> None:
    """Guards the resume test against a loop that trains nothing (equal weights for the wrong reason)."""
    a = train(tiny_config(epochs=1), tmp_path / "a", progress=False, log=lambda s: None).model.state_dict()
    b = train(tiny_config(epochs=1, seed=2), tmp_path / "b", progress=False, log=lambda s: None).model.state_dict()
    assert not torch.equal(a["head.weight"], b["head.weight"])
    torch.manual_seed(loop._seed_for(1, 0))
    init = loop.ViT(load_vit(tmp_path / "a").cfg).state_dict()
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])


def test_resume_refuses_changed_config_and_fresh_run_refuses_used_folder(tmp_path: Path) -> None:
    cfg = tiny_config(epochs=1)
    train(cfg, tmp_path / "r", progress=False, log=lambda s: None)
    with pytest.raises(VitscopeError, match="already holds a training run"):
        train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(VitscopeError, match=r"differs from the saved run in \['lr'\]"):
        train(tiny_config(epochs=1, lr=1.0), tmp_path / "r", resume=True, progress=False)
    with pytest.raises(VitscopeError, match="no training run to resume"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)


# -------------------------------------------------------------------------------------- early stopping
def test_early_stopping_restores_the_best_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted validation accuracies; the published model must be the weights seen at the best validation."""
    scripted = iter([0.3, 0.6, 0.5, 0.55, 0.2, 0.9])
    seen: list[dict[str, torch.Tensor]] = []

    def fake_evaluate(model, dataset, mean, std, batch_size=256, device="cpu"):  # type: ignore[no-untyped-def]
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return 1.0, next(scripted)

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    result = train(tiny_config(patience=3, val_every=1), tmp_path / "es", progress=False, log=lambda s: None)
    assert result.stopped == "early-stopped" and result.step == 5 and result.best_step == 2
    published = _weights(tmp_path / "es")
    assert all(torch.equal(published[k], seen[1][k]) for k in published)
    assert not torch.equal(published["head.weight"], seen[-1]["head.weight"])
    rows = _rows(tmp_path / "es/metrics.csv")
    assert [float(r["val_acc"]) for r in rows] == [0.3, 0.6, 0.5, 0.55, 0.2]
    trained = json.loads((tmp_path / "es/config.json").read_text())["trained"]
    assert trained["step"] == 2 and trained["val_accuracy"] == 0.6 and trained["stopped"] == "early-stopped"


# --------------------------------------------------------------------------------------------- outputs
def test_outputs_metrics_snapshots_and_load(tmp_path: Path) -> None:
    import vitscope
    from vitscope.attentions import Attentions
    from vitscope.train.shapes import SHAPE_CLASSES

    result = train(tiny_config(epochs=1, snapshots=3, val_every=2), tmp_path / "o", progress=False,
                   log=lambda s: None)
    rows = _rows(tmp_path / "o/metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert set(rows[0]) == {"step", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "time_s"}
    # logged validation accuracy of the best row is what an independent evaluation finds
    ds = loop.get_dataset("shapes", split="val", image_size=16, size=16, seed=1)
    model = load_vit(tmp_path / "o")
    x = torch.stack([ds[i][0] for i in range(16)])
    y = torch.tensor([ds[i][1] for i in range(16)])
    with torch.no_grad():
        acc = (model((x - 0.5) / 0.5).argmax(-1) == y).float().mean().item()
    assert acc == pytest.approx(result.best_val_accuracy)
    snap = Attentions.load(tmp_path / "o/attention/step_0000004.npz")
    assert snap.weights.shape == (1, 3, 2, 1, 17) and snap.queries == (0,)
    torch.testing.assert_close(snap.weights.sum(-1), torch.ones(1, 3, 2, 1))
    vit = vitscope.load(tmp_path / "o")
    assert vit.info.labels == SHAPE_CLASSES and vit.info.preprocess.image_size == (16, 16)
    assert math.isfinite(float(rows[-1]["train_loss"]))


def test_cli_train_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitscope.cli import main

    sets = ["--set", "image_size=[16,16]", "--set", "depth=1", "--set", "dim=16", "--set", "heads=2",
            "--set", "train_size=32", "--set", "val_size=8", "--set", "batch_size=8", "--set", "val_every=2"]
    main(["train", "-p", "shapes", "-o", str(tmp_path / "c"), "--max-steps", "2", "--no-progress", *sets])
    out = capsys.readouterr().out
    assert out.count("finished") == 1 and "finished at step 2" in out  # one summary
    main(["train", "-o", str(tmp_path / "c"), "--resume", "--no-progress"])  # already finished: a no-op
    assert "already finished at step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["train", "-o", str(tmp_path / "c"), "--set", "nonsense"])
    assert exc.value.code == 2 and "--set" in capsys.readouterr().err


def test_mnist_benchmark_smoke(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/train_mnist.py end to end on 512 real digits for 8 steps (the full run is manual)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_mnist.py"
    spec = importlib.util.spec_from_file_location("train_mnist", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    acc = bench.main(["--smoke", "--data", str(shared_data / "mnist")])
    out = capsys.readouterr().out
    assert f"test accuracy (images 8000-9999): {acc:.4f}" in out and "training time" in out
    assert 0.0 <= acc <= 1.0
