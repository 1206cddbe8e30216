"""Custom modules: a real trained MNIST ViT declared with `vitscope.wrap`, and modules that are not ViTs."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitscope
from vitscope.capture import capture_full
from vitscope.capture.intercept import CaptureError
from vitscope.errors import NotAViTError, VitscopeError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ------------------------------------------------------------------------------- the vit4mnist model
class MnistBlock(nn.Module):
    """Pre-norm block of vit4mnist: ln1 -> qkv -> softmax(q k^T * 0.125) -> out; ln2 -> ff1 -> GELU -> ff2."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(64)
        self.qkv = nn.Linear(64, 192)
        self.out = nn.Linear(64, 64)
        self.ln2 = nn.LayerNorm(64)
        self.ff1 = nn.Linear(64, 128)
        self.ff2 = nn.Linear(128, 64)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, N, 3, 8, 8).permute(2, 0, 3, 1, 4)  # each (B, 8, N, 8)
        probs = (q @ k.transpose(-2, -1) * 0.125).softmax(dim=-1)  # 0.125 = 64**-0.5, as trained
        return probs, probs @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        _, heads_out = self.attention(x)  # (B, 8, N, 8)
        x = x + self.out(heads_out.transpose(1, 2).reshape(B, N, C))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class MnistViT(nn.Module):
    """1x28x28 -> 16 row-major 7x7 patches (flattened) -> 64-d tokens, [CLS] first, 6 blocks, MLP head on [CLS]."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(49, 64)
        self.cls = nn.Parameter(torch.zeros(1, 1, 64))
        self.pos = nn.Parameter(torch.zeros(1, 17, 64))
        self.blocks = nn.ModuleList([MnistBlock() for _ in range(6)])
        self.head1 = nn.Linear(64, 128)
        self.head2 = nn.Linear(128, 10)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        patches = x.reshape(B, 4, 7, 4, 7).permute(0, 1, 3, 2, 4).reshape(B, 16, 49)  # (B, rows*cols, 7*7)
        return torch.cat([self.cls.expand(B, -1, -1), self.patch(patches)], dim=1) + self.pos  # (B, 17, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for blk in self.blocks:
            t = blk(t)
        return self.head2(F.gelu(self.head1(t[:, 0])))


def _load_mnist_vit(shared: Path) -> MnistViT:
    raw = torch.load(shared / "vit4mnist" / "vit4mnist_float_state_dict.pt", weights_only=True, map_location="cpu")

    def rename(key: str) -> str:  # "3.qkv.w" -> "blocks.3.qkv.weight", "patch.b" -> "patch.bias"
        parts = key.split(".")
        parts[-1] = {"w": "weight", "b": "bias"}.get(parts[-1], parts[-1])
        return ".".join((["blocks"] if parts[0].isdigit() else []) + parts)

    model = MnistViT()
    model.load_state_dict({rename(k): v for k, v in raw.items()})
    return model.eval()


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header).copy()


def _mnist(shared: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(shared / "mnist" / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(shared / "mnist" / "t10k-labels-idx1-ubyte.gz", 8)
    return images[:n], labels[:n]


def _wrap_mnist(model: nn.Module) -> vitscope.VitModel:
    return vitscope.wrap(
        model, blocks="blocks.*", qkv="qkv", out="out", num_heads=8, scale=0.125, patch_size=7, prefix=("cls",),
        image_size=28, mean=(MNIST_MEAN,), std=(MNIST_STD,), channels=1, name="vit4mnist",
    )


def test_mnist_vit_accuracy_and_exact_attention(shared_data: Path) -> None:
    model = _load_mnist_vit(shared_data)
    vit = _wrap_mnist(model)
    assert (vit.info.num_layers, vit.info.num_heads, vit.info.patch_size) == (6, 8, (7, 7))
    images, labels = _mnist(shared_data, 500)

    res = capture_full(vit, list(images))  # uint8 28x28 arrays through vitscope's own image pipeline
    expected_pixels = (torch.from_numpy(images).float()[:, None] / 255.0 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(res.pixel_values, expected_pixels, atol=1e-5, rtol=0)
    accuracy = (res.output.argmax(dim=1).numpy() == labels).mean()
    assert accuracy >= 0.95, accuracy

    # Hand-written reference: run the blocks one by one and take each one's own softmax(q k^T * 0.125).
    with torch.no_grad():
        t = model.tokens(expected_pixels)
        ref = []
        for blk in model.blocks:
            ref.append(blk.attention(t)[0])
            t = blk(t)
    attn = res.attentions
    assert attn.grid == (4, 4) and attn.prefix == ("cls",)
    torch.testing.assert_close(attn.weights, torch.stack(ref), atol=1e-5, rtol=0)
    # A declaration that disagrees with the model (the default 8**-0.5 scale) is refused, not used.
    wrong = vitscope.wrap(model, blocks="blocks.*", qkv="qkv", num_heads=8, patch_size=7, image_size=28,
                          mean=(MNIST_MEAN,), std=(MNIST_STD,), channels=1)
    assert wrong.sites[0].scale == pytest.approx(8**-0.5)
    with pytest.raises(CaptureError, match="declared q/k differs") as err:
        vitscope.capture(wrong, expected_pixels[:4])
    assert "\n" not in str(err.value)
    # Without q/k declarations the attention comes from the model's own softmax: the same rows.
    plain = vitscope.wrap(model, blocks="blocks.*", num_heads=8, patch_size=7, image_size=28,
                          mean=(MNIST_MEAN,), std=(MNIST_STD,), channels=1)
    torch.testing.assert_close(vitscope.capture(plain, expected_pixels[:4]).weights, attn.weights[:, :4],
                               atol=1e-5, rtol=0)


def test_mnist_out_tap_is_heads_output(shared_data: Path) -> None:
    from vitscope.capture import record_sites

    model = _load_mnist_vit(shared_data)
    vit = _wrap_mnist(model)
    images, _ = _mnist(shared_data, 3)
    pixels = vit.preprocess(list(images))
    got: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad(), record_sites(vit.sites, ("v", "out"), lambda i, t: got.__setitem__(i, t)):
        vit(pixels)
        t = model.tokens(pixels)
        for i, blk in enumerate(model.blocks):
            torch.testing.assert_close(got[i]["out"], blk.attention(t)[1], atol=1e-5, rtol=0)
            t = blk(t)


class _QKVLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        nn.init.normal_(self.to_q.weight, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = (m(x).reshape(B, N, 2, 4).transpose(1, 2) for m in (self.to_q, self.to_k, self.to_v))
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 8)


class SeparateQKV(nn.Module):
    """Two layers of 2 heads with separate q, k, v Linears and a forward that returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.layers = nn.ModuleList([_QKVLayer() for _ in range(2)])

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(pixels).flatten(2).transpose(1, 2)  # (B, N, 8), no prefix tokens
        for layer in self.layers:
            x = layer(x)
        return {"features": x}


def test_separate_q_k_v_and_custom_forward() -> None:
    model = SeparateQKV().eval()
    vit = vitscope.wrap(
        model, blocks="layers.*", q="to_q", k="to_k", v="to_v", num_heads=2, patch_size=4, prefix=(),
        image_size=(8, 12), forward=lambda m, px: m(px)["features"],
    )
    pixels = torch.randn(2, 3, 8, 12)
    attn = vitscope.capture(vit, pixels)
    assert attn.grid == (2, 3) and attn.cls_index is None
    with torch.no_grad():  # reference from the layer's own Linears, written out
        x = model.embed(pixels).flatten(2).transpose(1, 2)
        B, N, _ = x.shape
        q = model.layers[0].to_q(x).reshape(B, N, 2, 4).transpose(1, 2)
        k = model.layers[0].to_k(x).reshape(B, N, 2, 4).transpose(1, 2)
        ref0 = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)  # scale = 4**-0.5
    torch.testing.assert_close(attn.weights[0], ref0, atol=1e-5, rtol=0)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def test_cnn_is_not_a_vit() -> None:
    cnn = SmallCNN()
    for call in (lambda: vitscope.load(cnn), lambda: vitscope.capture(cnn, torch.randn(1, 3, 16, 16))):
        with pytest.raises(NotAViTError, match=r"^model: SmallCNN is not a ViT .*vitscope\.wrap\(") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(NotAViTError, match=r"^blocks: pattern 'blocks\.\*' matches no submodule of SmallCNN"):
        vitscope.wrap(cnn, blocks="blocks.*", qkv="attn.qkv", num_heads=2, patch_size=4)


def test_declaration_errors_name_the_argument(shared_data: Path) -> None:
    model = _load_mnist_vit(shared_data)
    kw = {"blocks": "blocks.*", "patch_size": 7, "image_size": 28, "channels": 1}
    with pytest.raises(VitscopeError, match=r"^qkv: no submodule 'attn.qkv' in block MnistBlock"):
        vitscope.wrap(model, qkv="attn.qkv", num_heads=8, **kw)
    with pytest.raises(VitscopeError, match=r"^num_heads: 5 does not divide the projection width 64"):
        vitscope.wrap(model, qkv="qkv", num_heads=5, **kw)
    with pytest.raises(VitscopeError, match=r"^qkv: only one of q and k was given"):
        vitscope.wrap(model, q="qkv", num_heads=8, **kw)
    with pytest.raises(VitscopeError, match=r"^prefix: unknown token kind 'class'"):
        vitscope.wrap(model, qkv="qkv", num_heads=8, prefix=("class",), **kw)
    with pytest.raises(VitscopeError, match=r"^mean: 1 values for 3 channels"):
        vitscope.wrap(model, qkv="qkv", num_heads=8, mean=(0.5,), **{**kw, "channels": 3})
    with pytest.raises(VitscopeError, match=r"^policy: unknown size policy 'stretch'"):
        vitscope.wrap(model, qkv="qkv", num_heads=8, policy="stretch", **kw)


def test_scalar_mean_std(shared_data: Path) -> None:
    vit = vitscope.wrap(_load_mnist_vit(shared_data), blocks="blocks.*", qkv="qkv", num_heads=8, scale=0.125,
                        patch_size=7, image_size=28, channels=1, mean=MNIST_MEAN, std=MNIST_STD)
    assert vit.info.preprocess.mean[:1] == (MNIST_MEAN,) and vit.info.preprocess.std[:1] == (MNIST_STD,)
