"""AttnLRP through lxt: vitscope's map equals lxt's own Gradient x Input relevance on the same model (computed
here the way lxt's README and ``monkey_patch`` do it: each patch of the torchvision table applied to its class,
``(x * x.grad).sum(channels)``, summed per patch by reshaping), its rules conserve relevance as the paper states
(exactly with every bias zero; approximately with biases, which absorb some), the patched classes are put back,
and unsupported families / a missing lxt are one-line errors.

The torchvision ViT is sharpened (tests/capture/families.py `sharpen`: q/k x2, [CLS] and positions redrawn;
mean row max > 0.2 asserted) and its classifier redrawn (torchvision starts it at zero).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

import vitscope
import vitscope.models.vit
from tests.capture.families import sharpen
from vitscope.errors import VitscopeError

SIZE, PATCH = 32, 8


def _tv(bias: float | None = None) -> nn.Module:
    """The test model; ``bias``: every bias set to 0 (``0.0``) or redrawn N(0, bias^2) (torchvision starts most
    at zero or 1e-6, which would hide what they absorb)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=2, num_heads=2,
                                             hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    sharpen(m, 2.0)
    with torch.no_grad():
        m.heads.head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
        if bias is not None:
            g = torch.Generator().manual_seed(2)
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * bias)
    return m


def _row_max(m: nn.Module, pixels: torch.Tensor) -> float:
    attn = vitscope.capture(vitscope.load(m), pixels)
    return float(attn.weights.amax(dim=-1).mean())


def _lxt_reference(model: nn.Module, pixels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """lxt's own output: its torchvision table applied as ``monkey_patch`` does, Gradient x Input at the pixels."""
    from vitscope.methods.attnlrp import _efficient_modules

    table = _efficient_modules().cp_LRP
    saved = {c: dict(c.__dict__) for c in table}
    try:
        for cls, patch in table.items():
            assert patch(cls)
        x = pixels.clone().requires_grad_(True)
        y = model(x)
        y[torch.arange(len(classes)), torch.tensor(classes)].sum().backward()
        heat = (x * x.grad).sum(dim=1)  # (B, H, W)
    finally:
        for cls, attrs in saved.items():
            cls.forward = attrs["forward"]
            if "original_forward" in cls.__dict__ and "original_forward" not in attrs:
                del cls.original_forward
    B, H, W = heat.shape
    return heat.reshape(B, H // PATCH, PATCH, W // PATCH, PATCH).sum(dim=(2, 4)).detach()


def test_equals_lxts_own_output_and_restores_the_classes() -> None:
    pytest.importorskip("lxt")
    from vitscope.methods.attnlrp import attnlrp

    model = _tv()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    before = {c: c.__dict__.get("forward") for c in (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)}
    got = attnlrp(model, pixels, target=[1, 3])
    assert {c: c.__dict__.get("forward") for c in before} == before
    assert not any("original_forward" in c.__dict__ for c in before)
    ref = _lxt_reference(model, pixels, [1, 3])
    assert float(ref.abs().max()) > 1e-3
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
    # lxt's rules change the gradient: plain Gradient x Input differs (the test can tell them apart)
    x = pixels.clone().requires_grad_(True)
    model(x)[torch.arange(2), torch.tensor([1, 3])].sum().backward()
    plain = (x * x.grad).detach().sum(dim=1).reshape(2, 4, PATCH, 4, PATCH).sum(dim=(2, 4))
    assert float((plain - ref).abs().max()) > 1e-3 * float(ref.abs().max())


def _token_relevance(model: nn.Module, pixels: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of the tokens entering the encoder's first block (x ⊙ grad, summed) and the target logits,
    under vitscope's application of lxt's table."""
    from vitscope.methods.attnlrp import _efficient_modules, patched

    seen: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, args: Any) -> None:
        args[0].retain_grad()
        seen["x"] = args[0]

    h = model.encoder.layers[0].register_forward_pre_hook(keep)
    try:
        with patched(dict(_efficient_modules().cp_LRP)):
            y = model(pixels.clone().requires_grad_(True))
            logits = y[torch.arange(len(classes)), torch.tensor(classes)]
            logits.sum().backward()
    finally:
        h.remove()
    x = seen["x"]
    assert x.grad is not None
    return (x * x.grad).sum(dim=(1, 2)).detach(), logits.detach()


def test_conserves_relevance_as_the_paper_states() -> None:
    pytest.importorskip("lxt")
    pixels = torch.randn(2, 3, SIZE, SIZE)
    assert _row_max(_tv(), pixels) > 0.2
    # without biases every rule (identity, uniform, epsilon -> 0, CP attention) conserves: tokens sum to the logit
    total, logits = _token_relevance(_tv(bias=0.0), pixels, [1, 3])
    torch.testing.assert_close(total, logits, atol=1e-4, rtol=1e-4)
    # with biases the epsilon rule only approximately conserves: the biases keep a share
    total, logits = _token_relevance(_tv(bias=0.1), pixels, [1, 3])
    assert float((total - logits).abs().max()) > 1e-2


def test_a_family_lxt_does_not_patch_is_refused() -> None:
    pytest.importorskip("lxt")
    from vitscope.models.vit import ViT, ViTConfig

    vit = ViT(ViTConfig(image_size=SIZE, patch_size=PATCH, dim=32, depth=2, heads=2, num_classes=5))
    with pytest.raises(VitscopeError, match="only vision table is torchvision") as err:
        vitscope.maps(vit, torch.randn(1, 3, SIZE, SIZE), "attnlrp", target=0)
    assert "\n" not in str(err.value)


def test_without_lxt_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitscope.models.vit import ViT, ViTConfig

    monkeypatch.setitem(sys.modules, "lxt", None)  # import lxt -> ImportError
    vit = ViT(ViTConfig(image_size=SIZE, patch_size=PATCH, dim=32, depth=2, heads=2, num_classes=5))
    with pytest.raises(VitscopeError, match=r"pip install 'vitscope\[lrp\]'") as err:
        vitscope.maps(vit, torch.randn(1, 3, SIZE, SIZE), "attnlrp", target=0)
    assert "\n" not in str(err.value) and err.value.argument == "method"


def test_the_console_script_refuses_an_unsupported_family_in_one_line(tmp_path: Path) -> None:
    """``vitscope maps --method attnlrp`` on the bundled model: exit 2, one stderr line naming ``--method`` (with
    lxt: the family's reason; without: the install hint); nothing written."""
    from tests.test_cli_errors import cli, one_line

    Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp_path / "img.png")
    line = one_line(cli("maps", str(tmp_path / "img.png"), "--method", "attnlrp", "-o", str(tmp_path / "o.npz")))
    assert line.startswith("error: --method:")
    assert ("only vision table is torchvision" in line) or ("pip install 'vitscope[lrp]'" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_supported_methods_reads_each_methods_check() -> None:
    from vitscope.methods.api import method_names, supported_methods

    tv = vitscope.load(_tv())
    mine = vitscope.load(vitscope.models.vit.ViT(vitscope.models.vit.ViTConfig(
        image_size=SIZE, patch_size=PATCH, dim=32, depth=2, heads=2, num_classes=5)))
    assert "attnlrp" not in supported_methods(mine) and "transformer_attribution" in supported_methods(mine)
    assert set(supported_methods(mine)) == set(method_names()) - {"attnlrp"}
    if importlib.util.find_spec("lxt") is not None:
        assert "attnlrp" in supported_methods(tv)
