"""Reading images of any mode, and the three size policies (resize, DINO's crop, native)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitscope.adapters.base import Preprocess
from vitscope.errors import ImageError
from vitscope.images import image_to_pixels, load_image, pixels_to_rgb, preprocess

PATCH = (8, 8)
PREP = Preprocess(image_size=(32, 32), mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25), policy="resize",
                  resample="bicubic")


def _rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)  # (H, W, 3)


# ------------------------------------------------------------------------------------------ modes
def test_grayscale_is_replicated() -> None:
    gray = np.array([[0, 17, 128], [200, 254, 255]], dtype=np.uint8)
    out = _rgb(load_image(Image.fromarray(gray, mode="L")))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_is_composited_over_white() -> None:
    rgba = np.array([[[255, 0, 0, 128], [0, 0, 255, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    out = _rgb(load_image(Image.fromarray(rgba, mode="RGBA")))
    alpha = rgba[..., 3:].astype(float) / 255.0
    expected = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)  # "over" a white background
    np.testing.assert_allclose(out, expected, atol=1.0)
    assert out[0, 1].tolist() == [255, 255, 255]  # fully transparent -> white, not black
    la = Image.fromarray(np.array([[[0, 0]]], dtype=np.uint8), mode="LA")
    assert _rgb(load_image(la))[0, 0].tolist() == [255, 255, 255]


def test_palette_image(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    path = tmp_path / "palette.png"
    img.save(path)
    out = _rgb(load_image(path))
    assert out[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    img.info["transparency"] = 1  # index 1 transparent -> white
    img.save(tmp_path / "palette_t.png", transparency=1)
    assert _rgb(load_image(tmp_path / "palette_t.png"))[0, 1].tolist() == [255, 255, 255]


def test_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 20000], [40000, 60000, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    expected = np.round(values / 65535.0 * 255.0)
    np.testing.assert_allclose(_rgb(load_image(path))[..., 0], expected, atol=1.0)
    np.testing.assert_allclose(_rgb(load_image(values))[..., 1], expected, atol=1.0)  # uint16 arrays too
    dark = np.array([[0, 100, 200]], dtype=np.uint16)  # a dark 16-bit image stays dark (clipping gives 255)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert _rgb(load_image(tmp_path / "dark.png"))[0, :, 0].max() <= 1


def test_float_and_chw_arrays() -> None:
    rng = np.random.default_rng(0)
    unit = rng.random((5, 7, 3)).astype(np.float32)
    out = _rgb(load_image(unit))
    np.testing.assert_allclose(out, unit * 255.0, atol=0.51)
    np.testing.assert_allclose(_rgb(load_image(unit * 255.0)), unit * 255.0, atol=0.51)  # [0, 255] floats
    chw = np.ascontiguousarray(unit.transpose(2, 0, 1))  # (3, H, W)
    np.testing.assert_array_equal(_rgb(load_image(chw)), out)
    gray_chw = (unit[None, ..., 0] * 255).astype(np.uint8)  # (1, H, W)
    np.testing.assert_array_equal(_rgb(load_image(gray_chw))[..., 2], gray_chw[0])
    with pytest.raises(ImageError, match=r"^image: float array contains NaN"):
        load_image(np.full((4, 4), np.nan, dtype=np.float32))
    with pytest.raises(ImageError, match=r"^image: array of shape \(6, 4, 5\) is not an image"):
        load_image(np.zeros((6, 4, 5), dtype=np.uint8))


# ----------------------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_argument(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is text, not a PNG")
    good = tmp_path / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # valid header, half the pixels
    cases = [
        (np.zeros((0, 5), dtype=np.uint8), r"^image: array has zero size \(shape \(0, 5\)\)"),
        (tmp_path / "empty.png", r"^image: .*empty\.png is empty \(0 bytes\)"),
        (tmp_path / "notes.png", r"^image: .*notes\.png is not an image PIL can read"),
        (tmp_path / "missing.jpg", r"^image: file not found: .*missing\.jpg"),
        (tmp_path, r"^image: .* is a folder"),
        (truncated, r"^image: cannot read .*truncated\.png"),
        (12, r"^image: unsupported type int"),
    ]
    for image, pattern in cases:
        with pytest.raises(ImageError, match=pattern) as err:
            preprocess(image, PREP, PATCH)
        assert "\n" not in str(err.value)
    with pytest.raises(ImageError, match=r"^images\[1\]: file not found"):
        preprocess([good, tmp_path / "missing.jpg"], PREP, PATCH)
    with pytest.raises(ImageError, match=r"^images: no images given"):
        preprocess([], PREP, PATCH)


def test_image_smaller_than_a_patch() -> None:
    tiny = Image.new("RGB", (5, 12))
    with pytest.raises(ImageError, match=r"^image: 5x12 image gives 0x8 input, smaller than one 8x8 patch"):
        preprocess(tiny, PREP, PATCH, policy="crop")
    with pytest.raises(ImageError, match=r"^images\[0\]: .*smaller than one"):
        preprocess([tiny, tiny], PREP, PATCH, policy="crop")
    assert preprocess(Image.new("RGB", (5, 3)), PREP, PATCH, policy="native").shape == (1, 3, 8, 8)  # >= 1 patch


# --------------------------------------------------------------------------------------- policies
def _normalise(arr: np.ndarray) -> np.ndarray:
    return (arr / 255.0 - np.array(PREP.mean)) / np.array(PREP.std)


def test_crop_policy_is_dinos_top_left_crop() -> None:
    arr = np.random.default_rng(1).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)  # (H, W, 3)
    pixels = preprocess(Image.fromarray(arr), PREP, PATCH, policy="crop")
    assert pixels.shape == (1, 3, 40, 64)  # each side down to a multiple of 8, no resampling
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), _normalise(arr[:40, :64]), atol=1e-5)
    wide = preprocess(Image.fromarray(arr), PREP, (5, 16), policy="crop")  # non-square patches
    assert wide.shape == (1, 3, 45, 64)


def test_resize_and_native_policies() -> None:
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(45, 70, 3), dtype=np.uint8))
    resized = preprocess(img, PREP, PATCH)  # the default: PREP.policy == "resize" to 32x32
    expected = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC)).astype(np.float64)
    np.testing.assert_allclose(resized[0].permute(1, 2, 0).numpy(), _normalise(expected), atol=1e-5)
    native = preprocess(img, PREP, PATCH, policy="native")
    assert native.shape == (1, 3, 48, 72)  # 45 -> 48, 70 -> 72: nearest multiples of 8, aspect kept
    expected = np.asarray(img.resize((72, 48), Image.Resampling.BICUBIC)).astype(np.float64)
    np.testing.assert_allclose(native[0].permute(1, 2, 0).numpy(), _normalise(expected), atol=1e-5)
    short = preprocess(img, PREP, PATCH, size=64)  # shorter side 64, the other rounded to the patch
    assert short.shape == (1, 3, 64, 96)
    assert preprocess(img, PREP, PATCH, size=(16, 40)).shape == (1, 3, 16, 40)
    with pytest.raises(ImageError, match=r"^policy: unknown size policy 'fit'"):
        preprocess(img, PREP, PATCH, policy="fit")  # type: ignore[arg-type]


def test_fixed_size_model_rejects_other_sizes() -> None:
    fixed = Preprocess(image_size=(32, 32), dynamic_size=False)
    img = Image.new("RGB", (48, 32))
    with pytest.raises(ImageError, match=r"^size: this model only accepts 32x32 inputs, not 32x48"):
        preprocess(img, fixed, PATCH, policy="crop")
    assert preprocess(img, fixed, PATCH).shape == (1, 3, 32, 32)


def test_one_channel_models_and_tensors() -> None:
    gray = Preprocess(image_size=(8, 8), mean=(0.1307,), std=(0.3081,), channels=1)  # type: ignore[arg-type]
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    pixels = preprocess(arr, gray, PATCH)
    assert pixels.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(pixels[0, 0].numpy(), (arr / 255.0 - 0.1307) / 0.3081, atol=1e-5)
    t = torch.randn(3, 8, 8)
    assert torch.equal(preprocess(t, PREP, PATCH)[0], t)  # tensors are pixel values already
    with pytest.raises(ImageError, match=r"^images: tensor of shape \(8, 8\)"):
        preprocess(torch.zeros(8, 8), PREP, PATCH)
    with pytest.raises(ImageError, match=r"^images: images preprocess to different sizes"):
        preprocess([Image.new("RGB", (16, 16)), Image.new("RGB", (24, 16))], PREP, PATCH, policy="crop")


def test_pixels_to_rgb_inverts_the_normalisation() -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    prep = Preprocess(image_size=(16, 24), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = image_to_pixels(Image.fromarray(arr), prep, (8, 8))[None]  # (1, 3, 16, 24)
    back = pixels_to_rgb(pixels, prep.mean, prep.std)
    assert back.shape == (1, 16, 24, 3) and back.dtype == np.uint8
    assert np.abs(back[0].astype(int) - arr.astype(int)).max() <= 1
    gray = pixels_to_rgb(torch.zeros(1, 1, 2, 2), (0.5,), (0.5,))  # normalised 0 = mid grey, repeated to RGB
    assert gray.shape == (1, 2, 2, 3) and (gray == 128).all()
