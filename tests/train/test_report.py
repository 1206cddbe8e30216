"""`vitscope report`: numbers equal to independent computations, every method in the table, written beside (never
over) the user's files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_tiny_vit
from vitscope.errors import VitscopeError
from vitscope.methods import method_names
from vitscope.models.vit import ViT, ViTConfig, save_vit
from vitscope.train.report import REPORT_FILES, model_report, shapes_batch
from vitscope.train.shapes import SHAPE_CLASSES, render_shape


@pytest.fixture
def shapes_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=(16, 16), patch_size=4, dim=16, depth=2, heads=2, num_classes=6,
                          labels=SHAPE_CLASSES))
    return save_vit(model.eval(), tmp_path / "model")


def test_report_numbers_and_files(shapes_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(VitscopeError, match=r"output: .*rep holds files vitscope did not write \(notes.txt\)"):
        model_report(shapes_model, out, images=24, localisation_images=4, samples=3, seed=5)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    rep = model_report(shapes_model, out, images=24, localisation_images=4, samples=3, seed=5, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        ".vitscope.json", "attention_distance.png", "metrics.json", "notes.txt", "report.md", "rollout.png"]
    assert (out / "notes.txt").read_text() == "the user's"  # written beside, never replaced
    assert not list(tmp_path.glob(".rep*")) and not list(out.glob(".*vitscope-tmp*"))
    marker = json.loads((out / ".vitscope.json").read_text())
    assert marker["command"] == "report" and sorted(marker["files"]) == sorted(REPORT_FILES)
    assert marker["files"]["report.md"] == hashlib.sha256((out / "report.md").read_bytes()).hexdigest()
    # accuracy recomputed independently from the generator and the saved model
    from vitscope.models.vit import load_vit

    model = load_vit(shapes_model)
    x = torch.stack([torch.from_numpy(render_shape(5, i, (16, 16), "test").image) for i in range(24)])
    y = np.array([render_shape(5, i, (16, 16), "test").label for i in range(24)])
    with torch.no_grad():
        pred = model((x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5).argmax(-1).numpy()
    assert rep.accuracy == pytest.approx((pred == y).mean())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(rep.accuracy)
    assert np.array(saved["distance"]).shape == (2, 2)
    md = (out / "report.md").read_text()
    from vitscope.methods.api import get_method

    for name in method_names():
        if get_method(name).needs == "features":  # pictures of the features, not attribution maps: left out
            assert f"| {name} " not in md and name not in rep.localisation
            continue
        assert f"| {name}" in md
        row = rep.localisation[name]
        assert 0 <= row["pointing_game"] <= 1 and 0 <= row["mask_iou"] <= 1
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    with Image.open(out / "rollout.png") as im:
        assert im.width > 100 and im.height > 100


def test_report_pointing_game_matches_a_hand_count(shapes_model: Path, tmp_path: Path) -> None:
    """The table's cls pointing game equals a direct count over the same images."""
    import vitscope

    rep = model_report(shapes_model, tmp_path / "r", images=0, localisation_images=6, samples=2, seed=1,
                       methods=["cls"])
    vit = vitscope.load(shapes_model)
    data = shapes_batch(6, (16, 16), seed=1)
    attn = vitscope.capture(vit, data.pixels((0.5,) * 3, (0.5,) * 3), layers=[-1], queries="cls")
    maps = attn.weights[0, :, :, 0, 1:].mean(1).reshape(6, 4, 4)
    idx = maps.reshape(6, -1).argmax(-1)
    hits = [data.masks[b, int(i // 4) * 4 + 2, int(i % 4) * 4 + 2] for b, i in enumerate(idx)]
    assert rep.localisation["cls"]["pointing_game"] == pytest.approx(np.mean(hits))


def test_report_on_a_non_shapes_model_uses_sample_photos(tmp_path: Path) -> None:
    vit_path = save_vit(make_tiny_vit(), tmp_path / "m")
    rep = model_report(vit_path, tmp_path / "r", samples=2)
    assert rep.accuracy is None and rep.localisation == {}
    assert (tmp_path / "r" / "rollout.png").exists()
    assert "## Localisation" not in (tmp_path / "r" / "report.md").read_text()


def test_report_cli_and_bad_method(shapes_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitscope.cli import main

    main(["report", str(shapes_model), "-o", str(tmp_path / "c"), "--images", "8", "--localisation", "2",
          "--samples", "2", "--methods", "rollout,legrad"])
    assert (tmp_path / "c" / "report.md").exists() and "accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["report", str(shapes_model), "-o", str(tmp_path / "d"), "--methods", "gradcam"])
    assert exc.value.code == 2 and "methods" in capsys.readouterr().err


def test_report_numbers_equal_direct_calls_of_each_method(shapes_model: Path, tmp_path: Path) -> None:
    """Every row of the localisation table equals the registered method called directly on the same images
    (a report that computed another method, another layer or another target under a name would fail)."""
    import vitscope
    from vitscope import methods as M

    names = ["cls", "rollout", "chefer", "grad_rollout", "attn_gradcam"]
    rep = model_report(shapes_model, tmp_path / "r", images=0, localisation_images=8, samples=2, seed=3,
                       methods=names)
    vit = vitscope.load(shapes_model)
    data = shapes_batch(8, (16, 16), seed=3)
    px, masks, labels = data.pixels((0.5,) * 3, (0.5,) * 3), torch.from_numpy(data.masks), data.labels.tolist()
    for name in names:
        params = {"target": labels} if "target" in M.get_method(name).params else {}
        maps = vitscope.maps(vit, px, name, **params).map
        row = rep.localisation[name]
        assert row["pointing_game"] == pytest.approx(float(M.pointing_game(maps, masks).float().mean()))
        assert row["mask_iou"] == pytest.approx(float(M.mask_jaccard(maps.clamp_min(0), masks).best.mean()), abs=1e-6)
    # the methods really differ on these images, so a swap between any two of them changes a number
    rows = [(rep.localisation[n]["mask_iou"], rep.localisation[n]["pointing_game"]) for n in names]
    assert len(set(rows)) == len(rows)
