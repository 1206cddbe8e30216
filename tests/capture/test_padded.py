"""Padded variable-resolution batches: SigLIP2 (NaFlex) and timm NaFlexViT, several images of different aspect
ratios in one forward pass, each on its own grid.

References are independent of vitscope's code: the family's own eager attention (transformers
``attn_implementation="eager"`` with ``output_attentions=True``; timm with ``fused_attn=False``, probabilities read
at ``attn.attn_drop``), fed inputs patchified and padded here by hand (transformers' own image-processor
patchifier for SigLIP2). q/k are sharpened (`tests.capture.families.sharpen`) so the reference's mean row maximum
over real tokens is above 0.2 (asserted), else a capture on the wrong grid would still look uniform.

Images: 4x4 (16 patches), 2x3 (6 patches + 10 padding tokens) and 3x5 (15 + 1) grids of 8 px patches.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

import vitscope
from tests.capture.families import PATCH, sharpen
from vitscope.errors import CaptureError, VitscopeError
from vitscope.methods import cls_map, rollout

SIZES = [(32, 32), (16, 24), (24, 40)]  # (H, W) px: 4x4, 2x3, 3x5 grids
GRIDS = [(h // PATCH, w // PATCH) for h, w in SIZES]
P = max(r * c for r, c in GRIDS)  # 16 patch slots
_TMP = tempfile.TemporaryDirectory(prefix="vitscope-padded-")  # removed at interpreter exit


def _pixels(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in SIZES]


def _by_hand(pixels: list[torch.Tensor], channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches ``(B, P, p*p*C)`` of each image row-major (each patch flattened (p, p, C) or (C, p, p)), zero
    padded to ``P``; and the validity ``(B, P)``."""
    out = torch.zeros(len(pixels), P, PATCH * PATCH * 3)
    valid = torch.zeros(len(pixels), P, dtype=torch.bool)
    for b, x in enumerate(pixels):
        C, H, W = x.shape
        r, c = H // PATCH, W // PATCH
        t = x.reshape(C, r, PATCH, c, PATCH)
        t = t.permute(1, 3, 2, 4, 0) if channels_last else t.permute(1, 3, 0, 2, 4)  # (r, c, p, p, C) / (r, c, C, p, p)
        out[b, : r * c] = t.reshape(r * c, -1)
        valid[b, : r * c] = True
    return out, valid


@dataclass
class Case:
    id: str
    prefix: int
    build: Callable[[], tuple[Any, Callable[[list[torch.Tensor]], torch.Tensor]]]  # -> (model, reference)


def _siglip2() -> tuple[Any, Callable[[list[torch.Tensor]], torch.Tensor]]:
    import transformers
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    cfg = transformers.Siglip2VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, patch_size=PATCH, num_patches=16)
    torch.manual_seed(0)
    model = sharpen(transformers.Siglip2VisionModel(cfg).eval(), 4.0)
    folder = Path(tempfile.mkdtemp(dir=_TMP.name))
    model.save_pretrained(folder)
    eager = transformers.Siglip2VisionModel.from_pretrained(folder, attn_implementation="eager").eval()

    def reference(pixels: list[torch.Tensor]) -> torch.Tensor:
        patches = torch.zeros(len(pixels), P, PATCH * PATCH * 3)
        mask = torch.zeros(len(pixels), P, dtype=torch.int32)
        for b, x in enumerate(pixels):
            p = torch.from_numpy(convert_image_to_patches(x.numpy(), PATCH))  # transformers' own patchifier
            patches[b, : p.shape[0]], mask[b, : p.shape[0]] = p, 1
        shapes = torch.tensor([[x.shape[1] // PATCH, x.shape[2] // PATCH] for x in pixels])
        with torch.no_grad():
            out = eager(pixel_values=patches, spatial_shapes=shapes, pixel_attention_mask=mask, output_attentions=True)
        return torch.stack([a.float() for a in out.attentions])  # (L, B, H, N, N)

    return vitscope.load(f"hf:{folder}"), reference


def _naflexvit() -> tuple[Any, Callable[[list[torch.Tensor]], torch.Tensor]]:
    import timm

    torch.manual_seed(0)
    model = sharpen(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, img_size=32, patch_size=PATCH,
                                      embed_dim=32, depth=2, num_heads=2, num_classes=5, class_token=True,
                                      reg_tokens=4).eval(), 16.0)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    probs: list[torch.Tensor] = []
    for blk in ref.blocks:
        blk.attn.attn_drop.register_forward_pre_hook(lambda _m, inp: probs.append(inp[0].detach().clone()))

    def reference(pixels: list[torch.Tensor]) -> torch.Tensor:
        patches, valid = _by_hand(pixels)
        coord = torch.zeros(len(pixels), P, 2, dtype=torch.long)
        for b, x in enumerate(pixels):
            r, c = x.shape[1] // PATCH, x.shape[2] // PATCH
            coord[b, : r * c] = torch.tensor([(i, j) for i in range(r) for j in range(c)])
        probs.clear()
        with torch.no_grad():
            ref({"patches": patches, "patch_coord": coord, "patch_valid": valid})
        return torch.stack(probs).float()

    return model, reference


CASES = [Case("siglip2", 0, _siglip2), Case("naflexvit", 5, _naflexvit)]


@cache
def _built(cid: str) -> tuple[Any, Callable[[list[torch.Tensor]], torch.Tensor]]:
    return next(c for c in CASES if c.id == cid).build()


def _counts(prefix: int) -> list[int]:
    return [prefix + r * c for r, c in GRIDS]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_padded_batch_is_exact_on_each_images_grid(case: Case) -> None:
    """Every row of every layer and head equals the family's eager attention on each image's real tokens; padding
    keys get 0 and padding rows are 0; the grids are each image's own (the old route read all three on one)."""
    model, reference = _built(case.id)
    pixels = _pixels()
    attn = vitscope.capture(model, pixels)
    ref = reference(pixels)  # (L, B, H, N, N)
    N = case.prefix + P
    assert attn.weights.shape == ref.shape == (2, 3, 2, N, N)
    assert attn.grids == tuple(GRIDS) and attn.grid == (1, P)
    assert attn.valid is not None and attn.valid.sum(1).tolist() == _counts(case.prefix)
    for b, n in enumerate(_counts(case.prefix)):
        real = ref[:, b, :, :n, :n]
        assert float(real.amax(-1).mean()) > 0.2  # peaked (sharpened q/k)
        torch.testing.assert_close(attn.weights[:, b, :, :n, :n], real, atol=1e-5, rtol=0)
        assert float(attn.weights[:, b, :, :n, n:].abs().sum()) == 0.0  # padding keys
        assert float(attn.weights[:, b, :, n:].abs().sum()) == 0.0  # padding query rows
        alone = attn.image(b)  # image b on its own grid, padding dropped
        assert alone.grid == GRIDS[b] and alone.grids is None and alone.weights.shape == (2, 1, 2, n, n)
        torch.testing.assert_close(alone.weights[:, 0], real, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_padded_batch_default_query_and_head_mean(case: Case) -> None:
    """The [CLS] row with heads averaged as captured (NaFlexViT), or the mean over patch rows (SigLIP2, no [CLS]),
    as each image's map on its own grid, equal the eager attention's by hand."""
    model, reference = _built(case.id)
    pixels = _pixels(1)
    ref = reference(pixels).double().mean(2)  # (L, B, N, N) head mean
    attn = vitscope.capture(model, pixels, layers=[-1], queries="cls" if case.prefix else None, heads="mean")
    maps = cls_map(attn)  # (B, max rows, max cols), NaN outside each image's grid
    for b, ((r, c), n) in enumerate(zip(GRIDS, _counts(case.prefix), strict=True)):
        rows = ref[-1, b, :1] if case.prefix else ref[-1, b, case.prefix:n]
        want = rows[:, case.prefix:n].mean(0).reshape(r, c)
        torch.testing.assert_close(maps[b, :r, :c].double(), want, atol=1e-5, rtol=0)
        assert bool(maps[b, r:].isnan().all()) and bool(maps[b, :, c:].isnan().all())


def _four_by_four_beside_four_by_six() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 48, generator=g)]  # 4x4 (+8 padding), 4x6


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize(("batch", "b"), [("three", 1), ("4x4+4x6", 0)])
def test_image_in_padded_batch_equals_the_image_alone(case: Case, batch: str, b: int) -> None:
    """A padded image (the 2x3 one with 10 padding tokens; a 4x4 one with 8 beside a 4x6 one) gives the same
    attention and maps in the batch as run alone: cls/mean map, rollout (padding dropped before the product) and
    `vitscope.maps`."""
    model, _ = _built(case.id)
    pixels = _pixels(2) if batch == "three" else _four_by_four_beside_four_by_six()
    r, c = pixels[b].shape[1] // PATCH, pixels[b].shape[2] // PATCH
    padded, alone = vitscope.capture(model, pixels), vitscope.capture(model, pixels[b].unsqueeze(0))
    assert alone.grids is None and alone.grid == (r, c) and padded.grids is not None and padded.grids[b] == (r, c)
    assert padded.num_tokens > alone.num_tokens  # really padded
    torch.testing.assert_close(padded.image(b).weights, alone.weights, atol=1e-5, rtol=0)
    for fn in (cls_map, rollout):
        torch.testing.assert_close(fn(padded)[b, :r, :c], fn(alone)[0], atol=1e-5, rtol=0)
    for method in ("cls", "rollout"):
        res = vitscope.maps(model, pixels, method)
        assert res.grids == list(padded.grids) and res.images is not None
        torch.testing.assert_close(res.images[b].map, vitscope.maps(model, pixels[b].unsqueeze(0), method).map,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(res.map[b, :r, :c], res.images[b].map[0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_padded_batch_read_on_one_grid_is_refused(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old behaviour (every image on the batch's one grid): a 4x4 image beside a 4x6 one is 16 patches plus 8
    padding tokens, never 4x6. The measured grid (perturb that image's pixels) disagrees with the declared one: a
    one-line CaptureError naming the image."""
    model, _ = _built(case.id)
    vit = vitscope.load(model)
    pixels = _four_by_four_beside_four_by_six()
    attn = vitscope.capture(vit, pixels)
    assert attn.grids == ((4, 4), (4, 6)) and attn.valid is not None
    assert attn.valid.sum(1).tolist() == [case.prefix + 16, case.prefix + 24]
    monkeypatch.setattr(vit, "grid_for", lambda _hw: (4, 6))  # one grid for every image
    with pytest.raises(CaptureError, match=rf"image 0 .*measured {case.prefix} prefix \+ 4x4 patches \+ 8 padding "
                       rf"tokens, but it is read as {case.prefix} prefix \+ 4x6 patches \+ 0 padding") as info:
        vitscope.capture(vit, pixels)
    assert "\n" not in str(info.value)


#: where each family's route builds its padded inputs, and its padding mask
_MASKS = {"siglip2": ("hf", "siglip2_padded_inputs", "pixel_attention_mask"),
          "naflexvit": ("timm", "naflex_inputs", "patch_valid")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_unmasked_padding_is_refused(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """vitscope's old route sent an all-ones mask: the padding is then attended to and no image has its own map.
    Capture proves every real row gives the padding keys probability 0."""
    import importlib

    module_name, fn_name, key = _MASKS[case.id]
    module = importlib.import_module(f"vitscope.adapters.{module_name}")
    real = getattr(module, fn_name)

    def all_ones(*args: Any) -> dict[str, torch.Tensor]:
        inputs = real(*args)
        inputs[key] = torch.ones_like(inputs[key])
        return inputs

    model, _ = _built(case.id)
    monkeypatch.setattr(module, fn_name, all_ones)
    with pytest.raises(CaptureError, match="attend to its padding"):
        vitscope.capture(model, _pixels())


def test_reading_a_padded_batch_on_one_grid_is_refused() -> None:
    """`to_grid`, a patch query and the ``"mean"`` query name tokens of one grid: refused on a padded batch."""
    model, _ = _built("siglip2")
    attn = vitscope.capture(model, _pixels())
    with pytest.raises(VitscopeError, match="different grids"):
        attn.to_grid(attn.weights[0, :, 0, 0])
    with pytest.raises(VitscopeError, match="different grids"):
        attn.patch_index(0, 1)
    with pytest.raises(VitscopeError, match="names different tokens"):
        vitscope.capture(model, _pixels(), queries=(0, 1))
    with pytest.raises(VitscopeError, match="gradients"):
        vitscope.maps(model, _pixels(), "chefer")


def test_padded_attentions_save_and_load(tmp_path: Path) -> None:
    model, _ = _built("naflexvit")
    attn = vitscope.capture(model, _pixels(), token_norms=True)
    back = vitscope.Attentions.load(attn.save(tmp_path / "a.npz"))
    assert back.grids == attn.grids and torch.equal(back.weights, attn.weights)
    assert back.valid is not None and torch.equal(back.valid, attn.valid)
    assert back.image(1).token_norms is not None and back.image(1).token_norms.shape == (2, 1, 5 + 6)


def test_native_grid_is_the_processors_rule() -> None:
    """`native_grid` equals transformers' SigLIP2 processor (its binary search) on sizes, patches and budgets."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    from vitscope.layout import native_grid

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        h, w = (int(v) for v in torch.randint(1, 1500, (2,), generator=g))
        p = (8, 14, 16)[int(torch.randint(3, (1,), generator=g))]
        m = (4, 16, 64, 256)[int(torch.randint(4, (1,), generator=g))]
        th, tw = get_image_size_for_max_num_patches(h, w, p, m)
        assert native_grid(h, w, (p, p), m) == (th // p, tw // p), (h, w, p, m)


def test_images_run_at_their_own_aspect_ratio() -> None:
    """PIL images of different shapes, default policy ("native" for NaFlex models): each on the grid the
    processor's rule gives within the model's patch budget (16 here), in one padded batch."""
    from PIL import Image

    from vitscope.layout import native_grid

    model, _ = _built("siglip2")
    sizes = [(300, 100), (120, 120), (90, 200)]  # (W, H)
    images = [Image.new("RGB", s, (i * 60, 100, 200)) for i, s in enumerate(sizes)]
    attn = vitscope.capture(model, images)
    assert attn.grids == tuple(native_grid(h, w, (PATCH, PATCH), 16) for w, h in sizes)
    assert len({r * c for r, c in attn.grids or ()}) > 1  # really padded
    one = vitscope.capture(model, images[0])  # one image: its native grid, no padding
    assert one.grids is None and one.grid == native_grid(100, 300, (PATCH, PATCH), 16)


def test_batch_figure_shows_each_image_on_its_own_grid() -> None:
    """`figures.batch_maps` takes maps on different grids (one per image)."""
    import numpy as np

    from vitscope.viz import figures

    imgs = [np.zeros((32, 32, 3), np.uint8), np.zeros((16, 24, 3), np.uint8)]
    fig = figures.batch_maps(imgs, [np.random.rand(4, 4), np.random.rand(2, 3)])
    assert len(fig.axes) >= 4
    with pytest.raises(VitscopeError, match=r"one .* map per image"):
        figures.batch_maps(imgs, [np.random.rand(4, 4), np.random.rand(2, 3, 1)])


def test_viewer_packs_each_image_of_a_padded_batch_on_its_own_grid() -> None:
    import numpy as np

    from vitscope.viewer.pack import pack

    model, _ = _built("siglip2")
    attn = vitscope.capture(model, _pixels())
    page = pack(attn, np.zeros((16, 24, 3), np.uint8), batch=1)
    assert page["grid"] == [2, 3] and page["tokens"] == 6 and page["input_size"] == [16, 24]


def test_cli_maps_writes_each_image_on_its_own_grid(tmp_path: Path) -> None:
    """``vitscope maps wide.png square.png -m hf:<SigLIP2>`` (the installed console script): one .npz per image, each
    at its own aspect ratio (2x6 and 4x4 within the 16-patch budget), equal to `vitscope.maps`; nothing outside
    -o changes; -o naming one file for two images is a one-line error naming --output (in process)."""
    import numpy as np
    from PIL import Image

    from tests.hostile.harness import assert_one_line, check_contained, run_inprocess, run_script, tree_state

    model, _ = _built("siglip2")
    model.module.save_pretrained(tmp_path / "sig")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (300, 100), (200, 30, 30)).save(tmp_path / "in" / "wide.png")
    Image.new("RGB", (100, 100), (30, 200, 30)).save(tmp_path / "in" / "square.png")
    before = tree_state(tmp_path)
    res = run_script(["maps", "in/wide.png", "in/square.png", "-m", "hf:sig", "-o", "out"], cwd=tmp_path)
    assert res.code == 0, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, [tmp_path / "out"])
    want = vitscope.maps(model, [str(tmp_path / "in" / "wide.png"), str(tmp_path / "in" / "square.png")], "cls")
    assert want.grids == [(2, 6), (4, 4)] and want.images is not None
    for name, mine in zip(("wide", "square"), want.images, strict=True):
        with np.load(tmp_path / "out" / f"{name}.cls.npz") as f:
            np.testing.assert_allclose(f["map"], mine.map.numpy(), atol=1e-5)
    assert_one_line(run_inprocess(["maps", "in/wide.png", "in/square.png", "-m", "hf:sig", "-o", "x.npz"],
                                  cwd=tmp_path), needle="--output")
