"""`vitscope maps`: the .npz it writes equals the library's maps; the PNG overlay matches the input size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import make_tiny_vit
from vitscope.cli import app, main
from vitscope.models.vit import save_vit

runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    # [CLS] + 4 registers, 24x40 input -> a 3x5 grid
    return save_vit(make_tiny_vit(num_registers=4, image_size=(24, 40), seed=21), tmp_path / "tiny")


def _run(model_dir: Path, image: Path, out: Path, *extra: str) -> tuple[dict[str, np.ndarray], dict]:
    res = runner.invoke(app, ["maps", str(image), "--model", str(model_dir), "-o", str(out), *extra])
    assert res.exit_code == 0, (res.output, res.exception)
    with np.load(out.with_suffix(".npz"), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta_json")))
    with Image.open(image) as src, Image.open(out.with_suffix(".png")) as png:
        assert png.size == src.size and png.mode == "RGB"  # the overlay is at the image's own size
    return arrays, meta


def test_cls_map_equals_library(model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    import vitscope
    from vitscope.methods import cls_map, upsample

    arrays, meta = _run(model_dir, image_path, tmp_path / "cls.npz", "--method", "cls", "--head", "max")
    attn = vitscope.capture(vitscope.load(model_dir), image_path, layers=[-1], queries="cls")
    ref = cls_map(attn, head="max")
    assert arrays["map"].dtype == np.float32 and arrays["map"].shape == (1, 3, 5)
    np.testing.assert_allclose(arrays["map"], ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(arrays["map_upsampled"], upsample(ref, (24, 40), "bilinear").numpy(), atol=1e-6)
    assert meta["method"] == "cls" and meta["layer"] == 1 and meta["head"] == "max"
    assert meta["grid"] == [3, 5] and meta["image_size"] == [24, 40] and meta["prefix"][0] == "cls"


def test_patch_query_head_index_and_folder_output(model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    import vitscope
    from vitscope.methods import cls_map

    out_dir = tmp_path / "maps"
    res = runner.invoke(app, ["maps", str(image_path), "--model", str(model_dir), "-o", str(out_dir),
                              "--query", "2,4", "--head", "3", "--layer", "0"])
    assert res.exit_code == 0, res.output
    with np.load(out_dir / "img.cls.npz") as data:  # a folder: <stem>.<method>.npz
        got = data["map"]
    attn = vitscope.capture(vitscope.load(model_dir), image_path, layers=[0], queries=[(2, 4)])
    np.testing.assert_allclose(got, cls_map(attn, layer=0, head=3, query=(2, 4)).numpy(), atol=1e-6)
    assert (out_dir / "img.cls.png").exists()


def test_rollout_and_dino_mask(model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    import vitscope
    from vitscope.methods import dino_mask, rollout

    attn = vitscope.capture(vitscope.load(model_dir), image_path)
    arrays, _ = _run(model_dir, image_path, tmp_path / "r.npz", "--method", "rollout")
    np.testing.assert_allclose(arrays["map"], rollout(attn).numpy(), atol=1e-6)
    arrays, meta = _run(model_dir, image_path, tmp_path / "d.png", "--method", "dino_mask", "--tau", "0.5")
    ref = dino_mask(attn, 0.5)
    assert arrays["mask"].dtype == np.uint8 and np.array_equal(arrays["mask"], ref.numpy().astype(np.uint8))
    np.testing.assert_allclose(arrays["map"], ref.float().mean(1).numpy())
    assert set(np.unique(arrays["map_upsampled"] * 4)) <= {0.0, 1.0, 2.0, 3.0, 4.0}  # nearest: shares of 4 heads
    assert meta["tau"] == 0.5


@pytest.mark.parametrize("method", ["flow", "grad_rollout", "chefer", "legrad"])
def test_other_methods_equal_library(method: str, model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    import vitscope
    from vitscope import methods as M

    target = ["--target", "2"] if method != "flow" else []  # flow takes no target: --target is refused there
    arrays, meta = _run(model_dir, image_path, tmp_path / f"{method}.npz", "--method", method, *target)
    vit = vitscope.load(model_dir)
    if method == "flow":
        ref = M.attention_flow(vitscope.capture(vit, image_path))
    else:
        fn = {"grad_rollout": M.grad_rollout, "chefer": M.chefer_relevance, "legrad": M.legrad}[method]
        ref = fn(vit, image_path, 2)
        assert meta["target"] == [2]
    np.testing.assert_allclose(arrays["map"], ref.numpy(), rtol=1e-4, atol=1e-6)


def test_bad_options_are_one_line_errors(model_dir: Path, image_path: Path, tmp_path: Path, capsys) -> None:
    for extra, needle in [(["--method", "magic"], "--method: unknown method"), (["--head", "x"], "--head"),
                          (["--query", "1;2"], "--query"), (["--layer", "9"], "layer")]:
        with pytest.raises(SystemExit) as exc:
            main(["maps", str(image_path), "--model", str(model_dir), "-o", str(tmp_path / "x.npz"), *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_png_is_an_overlay_of_the_input(model_dir: Path, tmp_path: Path) -> None:
    # a flat grey image: the overlay differs from the grey exactly by the colour map, so it is not blank
    img = tmp_path / "grey.png"
    Image.fromarray(np.full((24, 40, 3), 128, np.uint8)).save(img)
    _run(model_dir, img, tmp_path / "g.npz")
    with Image.open(tmp_path / "g.png") as im:
        png = np.asarray(im).astype(int)
    assert png.std() > 0 and not np.all(png == 128)
