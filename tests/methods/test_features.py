"""The DINO feature views: `patch_features` equals the model's own hidden states (transformers
``output_hidden_states``, timm ``forward_intermediates``), `pca` equals a numpy SVD, `similarity` a hand cosine;
hooks and flags are restored after an exception; the guards fire; ``vitscope maps`` / ``batch`` write pca's colours.

Features do not depend on peaked attention (they are the residual stream, not attention weights), so the models
here are not sharpened; the numpy references are written independently of `vitscope.methods.pca`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vitscope
from tests.capture.families import SIZES, built
from tests.conftest import make_tiny_vit
from tests.hostile.harness import check_contained, tree_state
from tests.test_cli_errors import ENV, SCRIPT, one_line
from vitscope.capture.prepare import prepare
from vitscope.errors import VitscopeError
from vitscope.methods.features import final_norm, patch_features
from vitscope.methods.pca import pca_rgb
from vitscope.models.vit import save_vit

WIDE = SIZES["wide"]  # 32 x 48 -> a 4 x 6 grid: rows and columns cannot be swapped unnoticed


def _pixels(batch: int = 2, size: tuple[int, int] = WIDE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------- features = the model's hidden states
def _hf_hidden(module: Any, x: torch.Tensor, layer: int, norm: bool, prefix: int) -> torch.Tensor:
    with torch.no_grad():
        out = module(pixel_values=x, output_hidden_states=True)
        h = out.hidden_states[layer + 1]  # hidden_states[0] is the embeddings: block l's output is l + 1
        if norm:
            h = out.last_hidden_state if layer == len(out.hidden_states) - 2 else module.layernorm(h)
    return h[:, prefix:]


def _timm_hidden(module: Any, x: torch.Tensor, layer: int, norm: bool, prefix: int) -> torch.Tensor:
    with torch.no_grad():
        (h,) = module.forward_intermediates(x, indices=[layer], norm=norm, output_fmt="NCHW", intermediates_only=True)
    return h.permute(0, 2, 3, 1).flatten(1, 2)  # (B, D, rows, cols) -> (B, rows * cols, D): patches only


#: family id -> (the family's own hidden states, prefix tokens, the final norm's name)
HIDDEN = {
    "hf-dinov2": (_hf_hidden, 1, "layernorm"),
    "hf-dinov2-registers": (_hf_hidden, 5, "layernorm"),
    "timm-vit-reg4": (_timm_hidden, 5, "norm"),
}


@pytest.mark.parametrize("fid", sorted(HIDDEN))
@pytest.mark.parametrize(("layer", "norm"), [(0, False), (1, False), (1, True), (0, True)])
def test_features_equal_the_models_hidden_states(fid: str, layer: int, norm: bool) -> None:
    hidden, prefix, norm_name = HIDDEN[fid]
    b = built(fid, WIDE)
    vit, x = prepare(b.model, _pixels())
    feats = patch_features(vit, x, layer=layer, norm=norm)
    ref = hidden(b.module, x, layer, norm, prefix)  # (B, patches, D)
    assert feats.patches.shape == (2, 4, 6, ref.shape[-1])
    torch.testing.assert_close(feats.patches.reshape(2, 24, -1), ref.float(), atol=1e-5, rtol=1e-5)
    assert feats.norm == (norm_name if norm else None) and feats.layer == layer
    assert float(ref.std()) > 0.1


#: family id -> the name of its norm after the last block (the module the family's own forward applies there)
FINAL_NORMS = {
    "hf-vit": "layernorm", "hf-dinov3": "norm", "hf-clip": "post_layernorm", "hf-siglip": "post_layernorm",
    "hf-aimv2": "rms_norm", "timm-eva-dinov3": "norm", "torchvision-vit": "encoder.ln", "open-clip-vit": "ln_post",
    "vitscope-vit-reg4": "norm",
}


@pytest.mark.parametrize("fid", sorted(FINAL_NORMS))
def test_final_norm_by_family(fid: str) -> None:
    vit, x = prepare(built(fid, (32, 32)).model, _pixels(1, (32, 32)))
    found = final_norm(vit)
    assert found is not None and found[0] == FINAL_NORMS[fid]
    normed, raw = patch_features(vit, x, norm=True), patch_features(vit, x, norm=False)
    assert normed.norm == FINAL_NORMS[fid] and raw.norm is None
    torch.testing.assert_close(normed.tokens, found[1](raw.tokens).float())  # the norm applied to the raw tokens


def test_final_norm_is_none_where_there_is_none() -> None:
    import timm

    torch.manual_seed(0)
    gap = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2, num_classes=5, global_pool="avg").eval()  # norm is an identity, fc_norm pools
    vit, x = prepare(gap, _pixels(size=(32, 32)))
    assert final_norm(vit) is None
    feats = patch_features(vit, x, layer=-1, norm=True)
    ref = _timm_hidden(gap, x, 1, False, 1)
    assert feats.norm is None
    torch.testing.assert_close(feats.patches.reshape(2, 16, -1), ref, atol=1e-6, rtol=1e-6)


def test_a_block_output_on_the_grid_is_read_as_patches() -> None:
    """timm's SAM encoder: blocks output ``(B, rows, cols, D)`` (no prefix token), windowed layer 0 included."""
    import timm

    torch.manual_seed(0)
    sam = timm.create_model("samvit_base_patch16", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2, window_size=2, global_attn_indexes=(1,), neck_chans=16).eval()
    vit, x = prepare(sam, _pixels(size=(32, 32)))
    for layer in (0, 1):
        with torch.no_grad():
            (ref,) = sam.forward_intermediates(x, indices=[layer], norm=False, intermediates_only=True)
        got = patch_features(vit, x, layer=layer)
        assert got.norm is None  # SAM's neck is no token norm
        torch.testing.assert_close(got.patches, ref.permute(0, 2, 3, 1), atol=1e-6, rtol=1e-6)


def test_patch_features_guards() -> None:
    vit, x = prepare(vitscope.wrap(make_tiny_vit(image_size=(32, 32))), _pixels(1, (32, 32)))
    with pytest.raises(VitscopeError, match=r"^norm: expected True or False, got 'yes'"):
        patch_features(vit, x, norm="yes")  # type: ignore[arg-type]
    skipping = vitscope.VitModel(vit.module, vit.info, vit.sites, forward=lambda _m, _x: None)
    with pytest.raises(VitscopeError, match=r"^layer: block 1 did not run in the forward pass"):
        patch_features(skipping, x)  # a forward that never reaches the blocks


# ---------------------------------------------------------------------------------------- pca vs numpy SVD
def _np_pca(x: np.ndarray) -> np.ndarray:
    """Scores of the first three components of ``x`` (n, D) by numpy's SVD, signs: largest |score| positive."""
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    s = xc @ vt[:3].T
    return s * np.sign(s[np.argmax(np.abs(s), axis=0), np.arange(3)])


def _np_minmax(s: np.ndarray) -> np.ndarray:
    return (s - s.min(axis=0)) / (s.max(axis=0) - s.min(axis=0))


def _np_figure(f: np.ndarray, foreground: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The DINOv2 figure by hand: rgb (B, rows, cols, 3) and the kept patches, from features (B, rows, cols, D)."""
    B, rows, cols, D = f.shape
    x = f.reshape(-1, D)
    keep = np.ones(len(x), dtype=bool)
    if foreground is not None:
        keep = _np_minmax(_np_pca(x)[:, :1])[:, 0] >= foreground
    rgb = np.zeros((len(x), 3))
    rgb[keep] = _np_minmax(_np_pca(x[keep]))
    return rgb.reshape(B, rows, cols, 3), keep.reshape(B, rows, cols)


def _block_output(model: Any, x: torch.Tensor) -> np.ndarray:
    """The last block's patch tokens after ``model.norm``, read with a plain hook here: (B, rows, cols, D)."""
    got: list[torch.Tensor] = []
    h = model.blocks[-1].register_forward_hook(lambda _m, _i, out: got.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    with torch.no_grad():
        tokens = model.norm(got[0])
    B = x.shape[0]
    rows, cols = x.shape[-2] // 8, x.shape[-1] // 8
    return tokens[:, -rows * cols:].double().numpy().reshape(B, rows, cols, -1)


@pytest.mark.parametrize("foreground", [None, 0.4])
def test_pca_equals_a_numpy_svd_fitted_jointly(foreground: float | None) -> None:
    model = make_tiny_vit(num_registers=2, image_size=WIDE, seed=4)
    x = _pixels(3)
    r = vitscope.maps(model, x, "pca", foreground=foreground)
    rgb, keep = _np_figure(_block_output(model, x), foreground)
    assert r.extras["rgb"].shape == (3, 4, 6, 3)
    np.testing.assert_allclose(r.extras["rgb"].numpy(), rgb, atol=1e-5)
    np.testing.assert_array_equal(r.extras["foreground"].numpy(), keep)
    assert rgb[keep].min(axis=0).tolist() == [0, 0, 0] and rgb[keep].max(axis=0).tolist() == [1, 1, 1]
    if foreground is not None:
        assert 0 < keep.sum() < keep.size and (rgb[~keep] == 0).all()  # a real split, background black
    assert r.meta["norm"] == "norm" and r.meta["layer"] == 1


def test_pca_per_image_fits_each_image_alone() -> None:
    model = make_tiny_vit(image_size=WIDE, seed=4)
    x = _pixels(2)
    joint = vitscope.maps(model, x, "pca").extras["rgb"]
    alone = vitscope.maps(model, x, "pca", joint=False).extras["rgb"]
    f = _block_output(model, x)
    for b in range(2):
        np.testing.assert_allclose(alone[b].numpy(), _np_figure(f[b:b + 1], None)[0][0], atol=1e-5)
    assert float((joint - alone).abs().max()) > 0.05  # the joint fit is a different fit


def test_pca_guards() -> None:
    patches = torch.randn(1, 2, 2, 8, dtype=torch.float64)
    with pytest.raises(VitscopeError, match=r"^foreground: only 1 patch passes threshold 1.0"):
        pca_rgb(patches, foreground=1.0)  # the top patch alone (min-max puts it at exactly 1)
    with pytest.raises(VitscopeError, match=r"^images: 1 patch cannot be fitted"):
        pca_rgb(torch.randn(1, 1, 1, 8))
    rgb, _, _ = pca_rgb(torch.randn(1, 1, 2, 8))  # 2 patches: one direction; the others are zero, not NaN
    assert torch.isfinite(rgb).all() and (rgb[..., 1:] == 0).all()


# ----------------------------------------------------------------------------- similarity vs a hand cosine
def _cos(q: np.ndarray, f: np.ndarray) -> np.ndarray:
    out = np.zeros(f.shape[:2])
    for r in range(f.shape[0]):
        for c in range(f.shape[1]):
            out[r, c] = float(q @ f[r, c]) / (np.linalg.norm(q) * np.linalg.norm(f[r, c]))
    return out


def test_similarity_equals_a_hand_cosine_for_every_kind_of_query() -> None:
    model = make_tiny_vit(num_registers=2, image_size=WIDE, seed=6)
    x = _pixels(2)
    f = _block_output(model, x)  # (B, 4, 6, D)
    got = vitscope.maps(model, x, "similarity", query=(3, 1)).map  # each image's own patch (3, 1)
    for b in range(2):
        np.testing.assert_allclose(got[b].numpy(), _cos(f[b, 3, 1], f[b]), atol=1e-5)
    assert got[0, 3, 1] == pytest.approx(1.0, abs=1e-6) and float(got.std()) > 0.05
    centre = vitscope.maps(model, x, "similarity")  # default: the centre patch (2, 3)
    np.testing.assert_allclose(centre.map[1].numpy(), _cos(f[1, 2, 3], f[1]), atol=1e-5)
    assert centre.meta["query"] == [2, 3]
    mean = vitscope.maps(model, x, "similarity", query="mean").map
    np.testing.assert_allclose(mean[0].numpy(), _cos(f[0].reshape(-1, f.shape[-1]).mean(0), f[0]), atol=1e-5)
    other = vitscope.maps(model, x, "similarity", query=(0, 5), reference=1).map  # image 1's patch in both
    for b in range(2):
        np.testing.assert_allclose(other[b].numpy(), _cos(f[1, 0, 5], f[b]), atol=1e-5)


def test_similarity_to_a_patch_of_another_image(rgb_image: Image.Image) -> None:
    model = make_tiny_vit(image_size=(32, 32), seed=6)
    vit, x = prepare(vitscope.wrap(model), _pixels(1, (32, 32)))
    _, ref_x = prepare(vit, rgb_image)  # the reference prepared the model's way
    got = vitscope.maps(vit, x, "similarity", query=(1, 2), reference=rgb_image)
    q = _block_output(model, ref_x)[0, 1, 2]
    np.testing.assert_allclose(got.map[0].numpy(), _cos(q, _block_output(model, x)[0]), atol=1e-5)
    assert got.meta["reference"] == "Image" and got.meta["query"] == [1, 2]


# ------------------------------------------------------------------------------ hooks, flags and guards
def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_and_flags_restored_after_success_and_exception() -> None:
    model = make_tiny_vit(image_size=(32, 32)).train()
    vit, x = prepare(vitscope.wrap(model), _pixels(1, (32, 32)))
    patch_features(vit, x)
    assert _hooks(model) == 0 and all(m.training for m in model.modules())

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    handle = model.blocks[-1].mlp.register_forward_pre_hook(boom)  # inside the hooked block
    try:
        with pytest.raises(RuntimeError, match="boom"):
            patch_features(vit, x, layer=-1)
        assert _hooks(model) == 1  # only the test's own
    finally:
        handle.remove()
    assert all(m.training for m in model.modules())


def test_a_block_output_that_is_not_every_token_is_refused() -> None:
    model = make_tiny_vit(image_size=(32, 32))
    vit, x = prepare(vitscope.wrap(model), _pixels(1, (32, 32)))
    # the last block returns one token too many (the head reads [CLS] only, so the forward pass still runs)
    handle = model.blocks[-1].register_forward_hook(lambda _m, _i, out: torch.cat([out, out[:, :1]], dim=1))
    try:
        with pytest.raises(VitscopeError, match=r"^layer: block 1 returned shape \(1, 18, 32\), not \(batch 1, tokens 17"):
            patch_features(vit, x, layer=1)
        patch_features(vit, x, layer=0)  # the block before is whole: no error
    finally:
        handle.remove()
    with pytest.raises(VitscopeError, match=r"^layer: 2 out of range for a model with 2 layers"):
        patch_features(vit, x, layer=2)


# --------------------------------------------------------------------------- the console script and batch
def test_console_script_writes_pca_colours_and_similarity(tmp_path: Path) -> None:
    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(img)
    model = save_vit(make_tiny_vit(image_size=(32, 32), seed=2), tmp_path / "tiny")
    before = tree_state(tmp_path)
    res = subprocess.run([str(SCRIPT), "maps", str(img), "-m", str(model), "--method", "pca", "-o",
                          str(tmp_path / "out" / "p.npz")], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    with np.load(tmp_path / "out" / "p.npz") as data:
        rgb, meta = data["rgb"], json.loads(str(data["meta_json"]))
    lib = vitscope.maps(str(model), str(img), "pca")
    np.testing.assert_allclose(rgb, lib.extras["rgb"].numpy(), atol=1e-6)
    with Image.open(tmp_path / "out" / "p.png") as png:
        assert png.size == (56, 40) and png.mode == "RGB"
        shown = np.asarray(png)
    rows, cols = rgb.shape[1:3]
    for r in range(rows):  # each patch one colour: the centre pixel of its block is its colour
        for c in range(cols):
            y, x = int((r + 0.5) * 40 / rows), int((c + 0.5) * 56 / cols)
            np.testing.assert_array_equal(shown[y, x], (rgb[0, r, c] * 255 + 0.5).astype(np.uint8))
    assert meta["method"] == "pca" and meta["norm"] == "norm"
    from typer.testing import CliRunner

    from vitscope.cli import app

    res2 = CliRunner().invoke(app, ["maps", str(img), "-m", str(model), "--method", "similarity", "--query", "1,3",
                                    "-o", str(tmp_path / "out" / "s.npz")])  # in process: one start-up less
    assert res2.exit_code == 0, res2.output
    with np.load(tmp_path / "out" / "s.npz") as data:
        np.testing.assert_allclose(data["map"], vitscope.maps(str(model), str(img), "similarity", query=(1, 3)).map,
                                   atol=1e-6)
    bad = subprocess.run([str(SCRIPT), "maps", str(img), "-m", str(model), "--method", "similarity", "--query", "9,9",
                          "-o", str(tmp_path / "out" / "bad.npz")], capture_output=True, text=True, env=ENV, timeout=120)
    assert one_line(bad).startswith("error: --query: patch at row 9, column 9 is outside the 4x4 grid")
    check_contained(before, tree_state(tmp_path), tmp_path, [tmp_path / "out"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.npz", "p.png", "s.npz", "s.png"]


def test_batch_writes_each_images_own_pca_colours(tmp_path: Path) -> None:
    from vitscope.batch.local import run_local

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    model = save_vit(make_tiny_vit(image_size=(32, 32), seed=2), tmp_path / "tiny")
    before = tree_state(tmp_path)
    run_local(folder, tmp_path / "out", method="pca", model=str(model), batch_size=2, summary=False)
    check_contained(before, tree_state(tmp_path), tmp_path, [tmp_path / "out"])
    for i in range(3):
        with np.load(tmp_path / "out" / f"{i}.pca.npz") as data:
            rgb = data["rgb"]
        alone = vitscope.maps(str(model), str(folder / f"{i}.png"), "pca").extras["rgb"][0]
        np.testing.assert_allclose(rgb, alone.numpy(), atol=1e-5)  # fitted alone, whatever batch it fell in
        with Image.open(tmp_path / "out" / f"{i}.pca.png") as png:
            assert png.mode == "RGB" and png.size == (32, 32)
