"""Every gradient method x every target kind equals an independent autograd reference of the stated score.

One table (`CASES`, built in `tests.methods.targetcases`): a class name on a transformers ViT classifier
(``id2label``) and on a timm ViT (timm's ImageNet names: ``tabby``), a reference image and a patch on a DINOv2
backbone, a text prompt on transformers CLIP and SigLIP (folders saved with a tokenizer, loaded offline) and on an
open_clip CLIP. The reference differentiates the model's own score (``logits_per_image``, ``logits``,
``pooler_output`` cosine) w.r.t. the explicit attention; the maps are written out from that below.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hostile.harness import assert_one_line, check_contained, run_script, tree_state
from tests.methods import targetcases as tc
from vitscope.errors import VitscopeError

CASES: dict[str, Callable[[Path, Path], tc.Case]] = {
    "hf-vit-name": lambda tmp, img: tc.hf_vit_named(tmp),
    "timm-name": lambda tmp, img: tc.timm_named(),
    "dinov2-image": lambda tmp, img: tc.dinov2_ref(tmp, img, "image"),
    "dinov2-patch": lambda tmp, img: tc.dinov2_ref(tmp, img, "patch"),
    "hf-clip-text": lambda tmp, img: tc.hf_dual(tmp, "clip"),
    "hf-siglip-text": lambda tmp, img: tc.hf_dual(tmp, "siglip"),
    "hf-siglip2-text": lambda tmp, img: tc.hf_dual(tmp, "siglip2"),
    "open-clip-text": lambda tmp, img: tc.open_clip_text(),
}
METHODS = ["chefer", "grad_rollout", "attn_gradcam", "legrad"]
PARAMS = {"grad_rollout": {"discard_ratio": 0.0}}  # the discard's tie order is tested in test_grad_rollout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tc.Case]:
    root = tmp_path_factory.mktemp("targets")
    img = root / "ref.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    cache: dict[str, tc.Case] = {}

    def get(name: str) -> tc.Case:
        if name not in cache:
            cache[name] = CASES[name](root, img)
        return cache[name]

    return get


def _pixels(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, tc.SIZE, tc.SIZE, generator=torch.Generator().manual_seed(11))


def _row(r: torch.Tensor, cls: bool, P0: int) -> torch.Tensor:
    """The map's row of a token matrix ``(B, N, N)`` or ``(B, H, N, N)`` (last two dims), patch columns."""
    rows = r[..., :1, :] if cls else r[..., P0:, :]
    return rows.mean(dim=-2)[..., P0:]


def reference_map(method: str, ref: tc.Ref, case: tc.Case) -> torch.Tensor:
    """The method's formula on the explicit attention and autograd gradient of the stated score."""
    A = [a.detach().double() for a in ref.attns]
    B, _, N, _ = A[0].shape
    P0 = N - 16  # 4x4 patches after the prefix
    if method == "legrad":
        total = 0
        for a, s in zip(ref.attns, ref.layer_scores, strict=True):
            (g,) = torch.autograd.grad(s.sum(), a, retain_graph=True)
            total = total + g.double().clamp_min(0).mean(1).mean(1)[:, P0:]
        lo, hi = total.amin(1, keepdim=True), total.amax(1, keepdim=True)
        return ((total - lo) / (hi - lo)).reshape(B, 4, 4)
    G = [g.double() for g in torch.autograd.grad(ref.score.sum(), ref.attns)]
    eye = torch.eye(N, dtype=torch.float64).expand(B, N, N)
    if method == "attn_gradcam":
        a, g = _row(A[-1], case.query_cls, P0), _row(G[-1], case.query_cls, P0)  # (B, H, P)
        return (g.mean(-1, keepdim=True) * a).mean(1).clamp_min(0).reshape(B, 4, 4)
    R = eye.clone()
    for a, g in zip(A, G, strict=True):
        if method == "chefer":
            R = R + (g * a).clamp_min(0).mean(1) @ R
        else:  # grad_rollout, no discard: rownorm(0.5 relu(mean_h(A G)) + 0.5 I)
            M = 0.5 * (a * g).mean(1).clamp_min(0) + 0.5 * eye
            R = (M / M.sum(-1, keepdim=True)) @ R
    return _row(R, case.query_cls, P0).reshape(B, 4, 4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_map_equals_autograd_reference(name: str, method: str, built: Callable[[str], tc.Case]) -> None:
    import vitscope

    case = built(name)
    x = _pixels()
    ref = case.reference(x)
    assert float(torch.stack([a.detach().amax(-1).mean() for a in ref.attns]).mean()) > 0.2  # sharpened: peaked rows
    got = vitscope.maps(case.vit, x, method, target=case.target, **PARAMS.get(method, {}))
    want = reference_map(method, ref, case).float()
    assert got.map.shape == want.shape
    torch.testing.assert_close(got.map, want, rtol=2e-3, atol=1e-4 * float(want.abs().max()))
    assert got.meta["target"] is not None


@pytest.mark.parametrize("name", list(CASES))
def test_score_is_the_models_own(name: str, built: Callable[[str], tc.Case]) -> None:
    """The scored value itself: for text, the model's ``logits_per_image`` (SigLIP: with its bias)."""
    from vitscope.methods._gradients import resolve_classes, target_scores, trace
    from vitscope.methods.targets import TokenScore, resolve_target

    case = built(name)
    x = _pixels()
    target = resolve_target(case.vit, case.target)
    with torch.enable_grad():
        token = isinstance(target[0], TokenScore)
        t = trace(case.vit, x, [0], last_block=token)
        one = target[0] if token else target
        got = target_scores(t, one, resolve_classes(case.vit, t.output, one))
    torch.testing.assert_close(got, case.reference(x).score, rtol=1e-4, atol=1e-5)


def test_siglip_bias_and_several_prompts(built: Callable[[str], tc.Case]) -> None:
    """Two prompts: one map each (image-major), each equal to its prompt alone; the SigLIP scores equal
    ``logits_per_image`` for both prompts, bias included (a score without the bias would be off by 1.5)."""
    import vitscope
    from vitscope.methods._gradients import trace
    from vitscope.methods.targets import resolve_target

    case = built("hf-siglip-text")
    vit, x = case.vit, _pixels()
    prompts = ["a cat", "a photo of a dog"]
    both = vitscope.maps(vit, x, "chefer", target=[f"text:{p}" for p in prompts])
    assert both.map.shape == (4, 4, 4) and both.meta["target"] == [f"text:{p}" for p in prompts]
    for t, p in enumerate(prompts):
        one = vitscope.maps(vit, x, "chefer", target=f"text:{p}").map
        torch.testing.assert_close(both.map[t::2], one)
    with torch.enable_grad():
        tr = trace(vit, x, [0], last_block=True)
        scores = torch.stack([s.score(tr.last, tr.grid) for s in resolve_target(vit, [f"text:{p}" for p in prompts])], 1)
    with torch.no_grad():
        own = vit.module(pixel_values=x, **vit.text.tokenize(prompts)).logits_per_image
    torch.testing.assert_close(scores, own, rtol=1e-4, atol=1e-5)
    assert float(vit.module.logit_bias.detach()) == -1.5


def _official_legrad_open_clip(model: Any, pixels: torch.Tensor, prompt: str, start: int = -2) -> torch.Tensor:
    """LeGrad's published open_clip recipe (``compute_legrad_clip``), from its description: per layer from
    ``start`` on, the image feature ``ln_post(mean over all tokens) @ proj``, L2-normalised, dotted with the
    normalised text embedding; the ReLU of that score's gradient w.r.t. the layer's attention, averaged over
    heads and query rows, [CLS] column dropped; upsampled by the patch size (bilinear); summed; min-max."""
    import open_clip
    import torch.nn.functional as F

    with torch.no_grad():
        txt = F.normalize(model.encode_text(open_clip.tokenize([prompt])), dim=-1)  # (1, E)
    attns, blocks, m, _ = tc.explicit_open_clip(model, pixels)
    n = len(blocks)
    total = 0
    for layer in range(start % n, n):
        feat = F.normalize(m.visual.ln_post(blocks[layer].mean(dim=1)) @ m.visual.proj, dim=-1)  # (1, E)
        (g,) = torch.autograd.grad((txt @ feat.t()).sum(), attns[layer], retain_graph=True)
        rel = g.clamp_min(0).mean(1).mean(1)[:, 1:].reshape(1, 1, 4, 4)
        total = total + F.interpolate(rel, scale_factor=8, mode="bilinear")
    return (total - total.min()) / (total.max() - total.min())  # (1, 1, H, W)


def test_legrad_official_readout_equals_published_recipe() -> None:
    """``readout="official"``, ``start_layer=-2``, un-normalised, upsampled then min-maxed = the authors' code's
    output within 1e-4 (the model's own read-out, ``ln_post(x[CLS])``, would not be: checked below)."""
    import torch.nn.functional as F

    from vitscope.adapters import as_vit
    from vitscope.methods import legrad

    model = tc.open_clip_model()
    x = _pixels(1)
    want = _official_legrad_open_clip(model, x, "a cat")
    vit = as_vit(model)

    def ours(readout: str) -> torch.Tensor:
        raw = legrad(vit, x, "text:a cat", readout=readout, start_layer=-2, normalize=False)
        up = F.interpolate(raw[:, None].double(), scale_factor=8, mode="bilinear")
        return ((up - up.min()) / (up.max() - up.min())).float()

    torch.testing.assert_close(ours("official"), want.float(), rtol=0, atol=1e-4)
    assert float((ours("model") - want).abs().max()) > 1e-3  # the read-out matters: the test can fail


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("name", "target", "needles"), [
    ("dinov2-image", "tabby", ["has no class names", "'image:<path>'", "'patch:ROW,COL'"]),
    ("hf-vit-name", "text:a cat", ["text tower", "class index or name"]),
    ("hf-vit-name", "kitte", ["no class named 'kitte'", "did you mean 'kitten'"]),
    ("timm-name", "tabbby", ["did you mean 'tabby'"]),
    ("dinov2-patch", "patch:4,0", ["outside the 4x4 grid"]),
    ("dinov2-patch", "patch:1", ["cannot read patch"]),
    ("hf-clip-text", ["text:a cat", "kitten"], ["a mix of class and text"]),
    ("hf-clip-text", "text:", ["empty text prompt"]),
    ("dinov2-image", "image:", ["'image:' without a path"]),
])
def test_mismatched_target_is_one_line_naming_what_works(name: str, target: Any, needles: list[str],
                                                         built: Callable[[str], tc.Case]) -> None:
    import vitscope

    case = built(name)
    with pytest.raises(VitscopeError) as err:
        vitscope.maps(case.vit, _pixels(1), "chefer", target=target)
    line = str(err.value)
    assert err.value.argument == "target" and "\n" not in line
    for needle in needles:
        assert needle in line, (needle, line)


def test_legrad_readout_callable_with_a_token_target_is_refused(built: Callable[[str], tc.Case]) -> None:
    """A text/reference target reads out through the model's own embedding: a read-out callable cannot apply."""
    from vitscope.methods import legrad

    with pytest.raises(VitscopeError) as err:
        legrad(built("open-clip-text").vit, _pixels(1), "text:a cat", readout=lambda x: x)
    assert err.value.argument == "readout" and "model' or 'official'" in str(err.value)


def test_class_names_from_a_users_list_and_by_synonym(built: Callable[[str], tc.Case]) -> None:
    import vitscope
    from vitscope.methods.targets import ClassName, class_index

    case = built("hf-vit-name")
    x = _pixels()
    by_index = vitscope.maps(case.vit, x, "chefer", target=[1, 2]).map
    torch.testing.assert_close(vitscope.maps(case.vit, x, "chefer", target=["kitten", "tench"]).map, by_index)
    mine = ClassName("b", labels=["a", "b", "c"])
    torch.testing.assert_close(vitscope.maps(case.vit, x, "chefer", target=mine).map[:1], by_index[:1])
    assert class_index("Tabby Cat", ["tench, Tinca tinca", "tabby, tabby cat"]) == 1


def test_text_tower_needs_a_tokenizer(tmp_path: Path) -> None:
    """A CLIP folder saved without its tokenizer: one line saying to save it (the guard fires only then)."""
    import transformers

    import vitscope

    cfg = transformers.CLIPConfig(text_config=tc._text_cfg(), vision_config=tc._vision_cfg(), projection_dim=16)
    transformers.CLIPModel(cfg).eval().save_pretrained(tmp_path / "bare")
    vit = vitscope.load(f"hf:{tmp_path / 'bare'}")
    with pytest.raises(VitscopeError, match=r"no tokenizer in .*save the processor"):
        vitscope.maps(vit, _pixels(1), "legrad", target="text:a cat")
    tc.save_tokenizer(tmp_path / "bare")
    vit = vitscope.load(f"hf:{tmp_path / 'bare'}")
    assert vitscope.maps(vit, _pixels(1), "legrad", target="text:a cat").map.shape == (1, 4, 4)


# ---------------------------------------------------------------------------------------------- CLI
def test_console_script_text_name_and_bad_target(built: Callable[[str], tc.Case], tmp_path: Path) -> None:
    """The installed script: a text prompt on a CLIP folder writes the map (equal to the library's); ``--target
    tabby`` on a timm model with ImageNet names works; a bad target is one line naming --target, exit 2."""
    import vitscope

    clip = built("hf-clip-text").vit
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    out = tmp_path
    before = tree_state(tmp_path)
    res = run_script(["maps", str(img), "-m", f"hf:{clip.info.name}", "--method", "legrad", "--target", "text:a cat",
                      "-o", str(out / "cat.npz")], cwd=tmp_path, timeout=300)
    assert res.code == 0, res.stderr
    check_contained(before, tree_state(tmp_path), tmp_path, outputs=[out / "cat.npz", out / "cat.png"])
    with np.load(out / "cat.npz") as data:
        got = data["map"]
    want = vitscope.maps(clip, str(img), "legrad", target="text:a cat").map
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-6)
    timm_args = ["-m", "timm:vit_tiny_patch16_224", "--random-weights", "--method", "attn_gradcam"]
    res = run_script(["maps", str(img), *timm_args, "--target", "tabby", "-o", str(out / "tabby.npz")],
                     cwd=tmp_path, timeout=300)
    assert res.code == 0, res.stderr
    with np.load(out / "tabby.npz") as data:
        assert '"target": [281]' in str(data["meta_json"])
    before = tree_state(tmp_path)
    bad = run_script(["maps", str(img), *timm_args, "--target", "tabbby", "-o", str(out / "bad.npz")],
                     cwd=tmp_path, timeout=300)
    lines = [ln for ln in bad.lines() if not ln.startswith("note: ")]  # the random-weights note comes first
    assert bad.code == 2 and "Traceback" not in bad.stderr and len(lines) == 1, bad.stderr
    assert lines[0].startswith("error: --target: ") and "did you mean 'tabby'" in lines[0], lines
    check_contained(before, tree_state(tmp_path), tmp_path, outputs=[])


def test_cli_target_on_a_method_without_one_is_refused(tmp_path: Path) -> None:
    from tests.conftest import make_tiny_vit
    from tests.hostile.harness import run_inprocess
    from vitscope.models.vit import save_vit

    model = save_vit(make_tiny_vit(), tmp_path / "tiny")
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(img)
    res = run_inprocess(["maps", str(img), "-m", str(model), "--method", "rollout", "--target", "1"], cwd=tmp_path)
    assert_one_line(res, 2, needle="--target: method 'rollout' takes no target")


def test_docs_offline_targets_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runnable block of docs/methods.md's "Targets" section (one example per offline kind) runs as written."""
    text = (Path(__file__).parents[2] / "docs" / "methods.md").read_text()
    section = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "target=\"star\"" in block and "image:ref.png" in block and "patch:2,3" in block
    monkeypatch.chdir(tmp_path)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        exec(compile(block, "docs/methods.md#targets", "exec"), {})
