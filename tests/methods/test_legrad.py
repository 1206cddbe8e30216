import pytest
import torch

from tests.conftest import make_tiny_vit
from tests.methods.gradref import assert_unchanged, reference_forward, snapshot
from vitscope._ops import minmax
from vitscope.errors import VitscopeError
from vitscope.methods import legrad


def _reference(model, x, classes, start=0, normalize=True):
    """Per layer: read out the block output with the model's norm + head, grad of the class logit w.r.t. the
    same layer's explicit attention, ReLU, mean over heads and rows, patch columns; sum; min-max."""
    _, attns, blocks = reference_forward(model, x)
    n_prefix = model.num_prefix_tokens
    total = 0
    for layer in range(start, len(attns)):
        logits = model.head(model.norm(blocks[layer])[:, 0])
        s = logits.gather(1, classes[:, None]).sum()
        (g,) = torch.autograd.grad(s, attns[layer], retain_graph=True)
        total = total + g.clamp_min(0).mean(1).mean(1)[:, n_prefix:]
    total = total.reshape(x.shape[0], *model.cfg.grid)
    if not normalize:
        return total
    flat = total.reshape(total.shape[0], -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo)).reshape(total.shape)


def test_matches_reference_with_registers_non_square():
    model = make_tiny_vit(num_registers=4, image_size=(24, 40), seed=10, depth=3)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    before = snapshot(model)
    classes = torch.tensor([1, 2])
    got = legrad(model, x, target=classes)
    ref = _reference(model, x, classes).detach()
    torch.testing.assert_close(got, ref.float(), rtol=2e-3, atol=1e-5)
    assert float(got.amin()) == 0.0 and float(got.amax()) == 1.0
    raw = legrad(model, x, target=classes, normalize=False, start_layer=1)
    torch.testing.assert_close(raw, _reference(model, x, classes, 1, False).detach().float(), rtol=2e-3, atol=1e-7)
    assert_unchanged(model, before)


def test_minmax_hand_example():
    x = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    torch.testing.assert_close(minmax(x), torch.tensor([[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]))


def test_unknown_model_needs_a_readout():
    from vitscope.adapters.base import ModelInfo, VitModel

    model = make_tiny_vit(seed=11)
    from vitscope.adapters import as_vit

    vit = as_vit(model)
    opaque = VitModel(torch.nn.Sequential(model), ModelInfo(**{**vit.info.__dict__}), vit.sites,
                      forward=lambda m, x: m[0](x))
    with pytest.raises(VitscopeError, match="readout"):
        legrad(opaque, torch.randn(1, 3, 32, 32))
    got = legrad(opaque, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                 readout=lambda tok: model.head(model.norm(tok)[:, 0]))
    ref = legrad(model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(got, ref)


def test_timm_model_with_registers_matches_its_unfused_path():
    """A second family: timm's VisionTransformer (its adapter's taps, `forward_head` readout)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(24, 40), patch_size=8, depth=2,
                              num_classes=5, reg_tokens=2).eval()
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(7))
    before = snapshot(model)
    got = legrad(model, x, target=3)
    # reference: unfused timm attention, explicit attention tensors kept in the graph
    import copy

    ref_model = copy.deepcopy(model)
    attns, blocks, handles = [], [], []
    for blk in ref_model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: attns.append(out)))
        handles.append(blk.register_forward_hook(lambda _m, _i, out: blocks.append(out)))
    ref_model(x)
    for h in handles:
        h.remove()
    total = 0
    for layer in range(2):
        s = ref_model.forward_head(ref_model.norm(blocks[layer]))[:, 3].sum()
        (g,) = torch.autograd.grad(s, attns[layer], retain_graph=True)
        total = total + g.clamp_min(0).mean(1).mean(1)[:, 3:]
    torch.testing.assert_close(got, minmax(total.reshape(2, 3, 5)).detach(), rtol=2e-3, atol=1e-5)
    assert_unchanged(model, before)


def test_official_readout_is_the_mean_token_through_norm_and_head():
    """readout='official' (the authors' CLIP code) reads each layer out through the mean of all its tokens."""
    model = make_tiny_vit(num_registers=4, image_size=(24, 40), seed=10, depth=3)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([1, 2])
    got = legrad(model, x, target=classes, readout="official")
    _, attns, blocks = reference_forward(model, x)
    total = 0
    for layer in range(len(attns)):
        logits = model.head(model.norm(blocks[layer].mean(dim=1)))  # ln(mean of all tokens) -> head
        s = logits.gather(1, classes[:, None]).sum()
        (g,) = torch.autograd.grad(s, attns[layer], retain_graph=True)
        total = total + g.clamp_min(0).mean(1).mean(1)[:, model.num_prefix_tokens:]
    ref = minmax(total.reshape(2, *model.cfg.grid).detach())
    torch.testing.assert_close(got, ref.float(), rtol=2e-3, atol=1e-5)
    assert not torch.allclose(got, legrad(model, x, target=classes), atol=1e-3)  # it is a different read-out
    with pytest.raises(VitscopeError, match=r"^readout: unknown read-out 'cls'"):
        legrad(model, x, readout="cls")
