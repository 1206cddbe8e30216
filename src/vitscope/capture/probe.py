"""The token layout, measured: which tokens are patches, where each sits on the grid, and what is around them.

Adapters and `vitscope.wrap` *declare* a layout (prefix kinds, patch size, hence the grid); `probe_layout`
*measures* it, and capture compares the two before it reads a single attention row.

How: one batched forward pass of a few images at the real input geometry, stopped at the input of the first
block's attention module (a private exception, caught here; the hook is removed in a context manager even
then), so the probe costs the stem (patch embedding, position table, first norm) and nothing more. The images:

- a base image (seeded uniform pixels, normalised the model's way) and the same base again;
- the base with every pixel replaced (``other``): tokens that it does not move depend on no pixel;
- for the rows: the base with the pixel rows of some patch rows replaced, the patch rows chosen by the digits
  of their index in base 4 (image ``(p, j)`` replaces the patch rows whose ``p``-th digit is ``j``), and the
  same for the columns: ``4 * ceil(log4(rows))`` images instead of one per row. A token's row is read digit by
  digit, as the movement-weighted circular mean of ``j`` (its own patch moves it most, and the spill into
  its neighbours is symmetric, so this holds for overlapping convolutional stems such as XCiT's), or, when that
  gives no grid, as the image that moves it most (ResNet hybrid stems, whose receptive field spans the image).
  The grid is the column count for which the tokens, read row-major, lie on strictly separated rows and
  strictly separated columns.

Tokens that no pixel moves are prefix tokens (before the patches) or suffix tokens (after them, e.g. YOLOS's
detection tokens); such tokens between patches are padding, refused. The moved tokens must be the patches in
row-major order; any other order (a permutation: ViTMAE's random shuffle, a model that reverses its patches)
is a one-line `CaptureError`, and so is a model whose two identical base images give different tokens (random
masking, dropout left on in eval).

`check_token_axis` proves that every selected layer's softmax runs over tokens: the key axis has the token
count at the real geometry *and* follows the image size at a second geometry (2x3 patches, else one patch row
fewer or more, with another token count), so channel attention (XCiT's cross-covariance softmax over ``head_dim x head_dim``) is refused even at sizes
where ``head_dim`` equals the token count. Both results are cached per model (weakly): the layout per input geometry, the axis check
once per set of layers.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from vitscope.adapters.base import AttentionSite, VitModel
from vitscope.capture.hooks import eval_mode, this_thread_only
from vitscope.capture.intercept import AttentionCall, attention_module, observe_attention
from vitscope.errors import CaptureError

__all__ = ["MeasuredLayout", "check_layout", "check_token_axis", "probe_layout", "probe_padded"]

_BASE = 4  # digits of the patch-row / patch-column index, in this base
_CHUNK = 8  # images per stopped forward pass (bounds the probe's memory at large sizes)
_CHUNK_BYTES = 8 * 2**20  # input bytes per stopped forward pass (one 1024 px image is 12 MiB in float32)
_MOVED = 1e-4  # a token moved by less than this fraction of the largest movement did not move
_SAME = 1e-2  # two identical images: tokens within this fraction of the largest movement (half-precision kernels)
_SEED = 1234


@dataclass(frozen=True)
class MeasuredLayout:
    """What the probe measured at one input geometry: ``[prefix, patches (rows x cols, row-major), suffix]``."""

    num_prefix: int
    grid: tuple[int, int]
    num_suffix: int
    image_size: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1] + self.num_suffix

    def describe(self) -> str:
        """``"1 prefix + 14x14 patches + 0 suffix tokens"``."""
        return f"{self.num_prefix} prefix + {self.grid[0]}x{self.grid[1]} patches + {self.num_suffix} suffix tokens"


class UnmeasurableError(CaptureError):
    """No token of the first block's input depends on the pixels: there is no layout to measure."""


class _Stop(Exception):
    """Raised by the probe's hook to end the forward pass at the first attention module (caught here)."""


_layouts: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], MeasuredLayout]] = weakref.WeakKeyDictionary()
_axis_checked: weakref.WeakKeyDictionary[nn.Module, set[tuple[int, ...]]] = weakref.WeakKeyDictionary()


def _token_tensor(args: Sequence[Any], kwargs: dict[str, Any], batch: int, seq_first: bool,
                  grid_ok: bool = False) -> torch.Tensor:
    """The token tensor an attention module gets, as ``(B, N, C)``: its first 3-d tensor argument. ``grid_ok``:
    a global SAM/ViTDet block's ``(B, h, w, C)`` token grid is read as ``(B, h*w, C)`` too (token counts only)."""
    if grid_ok and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and args[0].shape[0] == batch:
        return args[0].flatten(1, 2)  # (B, h, w, C) -> (B, h*w, C)
    found = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 3]
    if not found:
        raise CaptureError(
            "model", "the first attention module got no (batch, tokens, channels) tensor: vitscope cannot find "
            "its tokens", "vitscope reads ViTs whose blocks take a (B, N, C) token tensor",
        )
    x = found[0]
    if seq_first or (x.shape[0] != batch and x.shape[1] == batch):  # (N, B, C): nn.MultiheadAttention's default
        x = x.transpose(0, 1)
    if x.shape[0] != batch:
        raise CaptureError(
            "model", f"the first attention module's input {tuple(x.shape)} has no batch axis of {batch}",
            "vitscope reads ViTs whose blocks take a (B, N, C) token tensor",
        )
    return x


@contextmanager
def _stop_at(module: nn.Module, batch: int, sink: list[torch.Tensor]) -> Iterator[None]:
    """While active, ``module``'s forward pass records its token input ``(B, N, C)`` into ``sink`` and stops."""
    seq_first = isinstance(module, nn.MultiheadAttention) and not module.batch_first

    def pre(_m: nn.Module, args: Any, kwargs: Any) -> None:
        sink.append(_token_tensor(args, kwargs, batch, seq_first).detach().float())
        raise _Stop

    handle = module.register_forward_pre_hook(this_thread_only(pre), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _tokens(vit: VitModel, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The first attention module's input tokens ``(B, N, C)`` for ``images``, running only the stem (a list of
    ``(C, H_b, W_b)`` images runs as one padded batch: ``vit.padded``)."""
    module = attention_module(vit.sites[0])
    sink: list[torch.Tensor] = []
    with _stop_at(module, len(images), sink), suppress(_Stop):
        if isinstance(images, list):
            assert vit.padded is not None
            vit.padded.forward(vit.module, images)
        else:
            vit(images)
    if not sink:
        raise CaptureError(
            "model", "layer 0's attention module did not run during the forward pass",
            "the adapter's attention sites are not the modules the model runs",
        )
    return sink[0]


def probe_step(vit: VitModel, inputs: Any) -> int:
    """Inputs per stopped forward pass: at most `_CHUNK`, ``vit.max_batch`` and `_CHUNK_BYTES` of input (the
    stem's activations grow with the input, so a 1024 px probe runs one image at a time: the probe must not
    cost more memory than the capture it serves)."""
    one = inputs.image_bytes() if isinstance(inputs, _ProbeImages) else inputs[0].numel() * inputs.element_size()
    return max(1, min(_CHUNK, vit.max_batch or _CHUNK, _CHUNK_BYTES // max(1, one)))


def _movement(vit: VitModel, inputs: Any) -> torch.Tensor:
    """How far each first-block input token moves under each probe input, relative to the first ``(M, N)``
    (on the CPU), a few inputs per stopped forward pass (`probe_step`), keeping only the distances."""
    step = probe_step(vit, inputs)
    base: torch.Tensor | None = None
    out = []
    for i in range(0, inputs.shape[0], step):
        tok = _tokens(vit, inputs[i:i + step])  # (b, N, D)
        base = tok[0] if base is None else base
        out.append((tok - base).norm(dim=-1).cpu())
    return torch.cat(out)


def _digits(n: int) -> int:
    """Base-4 digits needed for indices ``0 .. n-1``."""
    d = 0
    while _BASE**d < n:
        d += 1
    return d


class _ProbeImages:
    """The probe images of `_images`, made a few at a time (27 images of 1024 px would be 340 MB at once): each
    is the base with some bands of rows or columns taken from the other image."""

    def __init__(self, base: torch.Tensor, other: torch.Tensor, bands: list[tuple[int, slice] | None],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.base, self.other, self.bands, self.dtype, self.device = base, other, bands, dtype, device

    def __len__(self) -> int:
        return len(self.bands) + 3

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.base.shape)

    def image_bytes(self) -> int:
        return self.base.numel() * torch.empty((), dtype=self.dtype).element_size()

    def one(self, i: int) -> torch.Tensor:
        """Image ``i`` ``(C, H, W)`` (float32, CPU): base, base again, all replaced, then the codes."""
        if i < 2:
            return self.base
        if i == 2:
            return self.other
        img = self.base.clone()
        for axis, sl in self.bands[i - 3] or ():  # type: ignore[misc]
            if axis == 1:
                img[:, sl] = self.other[:, sl]
            else:
                img[:, :, sl] = self.other[:, :, sl]
        return img

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        """Image ``index`` ``(C, H, W)``, or images ``index`` (a slice) stacked ``(b, C, H, W)``, on the probe's
        device and dtype."""
        if isinstance(index, int):
            return self.one(index).to(device=self.device, dtype=self.dtype)
        return torch.stack([self.one(i) for i in range(len(self))[index]]).to(device=self.device, dtype=self.dtype)


def _images(vit: VitModel, geometry: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
            ) -> tuple[_ProbeImages, int, int, int, int]:
    """The probe images ``(M, C, H, W)`` (made on demand): base, base again, all replaced, then the row and
    column codes."""
    C, H, W = geometry
    ph, pw = vit.info.patch_size
    rows, cols = max(1, H // ph), max(1, W // pw)
    g = torch.Generator().manual_seed(_SEED)
    pre = vit.info.preprocess
    mean = torch.tensor(pre.mean[:C] if len(pre.mean) >= C else pre.mean[:1] * C).view(C, 1, 1)
    std = torch.tensor(pre.std[:C] if len(pre.std) >= C else pre.std[:1] * C).view(C, 1, 1)
    base = (torch.rand(C, H, W, generator=g) - mean) / std  # in the model's normalised range
    other = (torch.rand(C, H, W, generator=g) - mean) / std
    codes: list[Any] = []
    dr, dc = _digits(rows), _digits(cols)
    for n, size, axis in ((rows, ph, 1), (cols, pw, 2)):
        for p in range(_digits(n)):
            for j in range(_BASE):
                codes.append([(axis, slice(band * size, (band + 1) * size if band < n - 1 else None))  # last: to the edge
                              for band in range(n) if band // _BASE**p % _BASE == j])
    return _ProbeImages(base, other, codes, dtype, device), rows, cols, dr, dc


def _position(moves: torch.Tensor, levels: int, argmax: bool = False) -> torch.Tensor:
    """Continuous band position per token (in bands, ``(T,)``) from its movement ``(levels * BASE, T)``.

    Level ``p``'s four images perturb the bands whose ``p``-th base-4 digit is ``j``; the movement-weighted
    circular mean of ``j`` (the phase) is the token's digit, smoothed where its receptive field spills into a
    neighbouring band (a symmetric spill leaves it exact). Coarse levels fix the integer part, the finest the
    rest (phase unwrapping, coarse to fine), so an overlapping stem still gives each token its own band.
    ``argmax``: each digit is the image that moves the token most instead (for stems whose receptive field is
    so wide, e.g. a ResNet's, that the far side's spill biases the phase of tokens near the border).
    """
    T = moves.shape[1]
    if levels == 0:
        return torch.zeros(T, dtype=torch.float64)
    angle = torch.arange(_BASE, dtype=torch.float64) * (2 * math.pi / _BASE)
    est: torch.Tensor | None = None
    for p in range(levels - 1, -1, -1):
        m = moves[p * _BASE:(p + 1) * _BASE].double()  # (BASE, T)
        phase = torch.atan2((m * angle.sin()[:, None]).sum(0), (m * angle.cos()[:, None]).sum(0))
        digit = torch.remainder(phase / (2 * math.pi / _BASE), _BASE)  # in [0, BASE)
        if argmax:
            digit = m.argmax(dim=0).double()
        width = _BASE**p
        if est is None:
            u = digit
        else:  # the unwrapped value nearest to the coarser estimate
            coarse = (est - (width - 1) / 2) / width
            u = digit + _BASE * torch.round((coarse - digit) / _BASE)
        est = u * width + (width - 1) / 2  # the centre of the token's block, in bands
    assert est is not None
    return est


def _separated(pos: torch.Tensor) -> bool:
    """Rows of ``pos`` ``(rows, cols)`` strictly ordered: every value of row ``i`` below every value of ``i+1``."""
    return bool((pos[:-1].amax(dim=1) < pos[1:].amin(dim=1)).all())


def _grid(row_est: torch.Tensor, col_est: torch.Tensor, prefer: int) -> tuple[int, int] | None:
    """``(rows, cols)`` such that the tokens, read row-major, lie on separated rows and separated columns;
    ``prefer`` (the declared column count) first, else the first that fits; ``None`` when none does."""
    M = row_est.numel()
    cands = [c for c in range(1, M + 1) if M % c == 0]
    cands.sort(key=lambda c: c != prefer)
    for c in cands:
        r = M // c
        if _separated(row_est.view(r, c)) and _separated(col_est.view(r, c).T):
            return (r, c)
    return None


def probe_layout(vit: VitModel, geometry: tuple[int, int, int] | torch.Size | Sequence[int],
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> MeasuredLayout:
    """Measure ``vit``'s token layout at input ``geometry`` ``(C, H, W)`` (or a pixel tensor's shape).

    Cached per model object, geometry, dtype and device. Raises `CaptureError` (one line, naming ``model``)
    when the tokens are not ``[prefix, patches row-major, suffix]``: padding tokens between patches, patches
    in another order, tokens that change between two identical images, or tokens that are not a patch grid.
    """
    shape = tuple(int(s) for s in geometry)[-3:]
    C, H, W = shape
    dtype = dtype or vit.dtype
    device = device or vit.device
    key = (shape, dtype, str(device), id(vit.sites[0].attn), vit.info.patch_size)
    cache = _layouts.setdefault(vit.module, {})
    if key in cache:
        return cache[key]
    images, n_rows, n_cols, dr, dc = _images(vit, (C, H, W), dtype, device)
    with torch.no_grad(), eval_mode(vit.module):
        move = _movement(vit, images)  # (M, N)
    layout = _measure(vit, move, (n_rows, n_cols), (dr, dc), (H, W))
    cache[key] = layout
    return layout


def _measure(vit: VitModel, move: torch.Tensor, declared: tuple[int, int], levels: tuple[int, int],
             image_size: tuple[int, int]) -> MeasuredLayout:
    """The layout from each token's movement ``(M, N)`` under the probe images of `_images` (base, base again,
    all replaced, row codes, column codes); ``declared``: the grid the patch size gives, ``levels``: the base-4
    digits of the row and column codes. In a padded batch the tokens after an image's patches that none of its
    pixels move are its suffix tokens and its padding (`MeasuredLayout.num_suffix` counts them all)."""
    (H, W), (n_rows, n_cols), (dr, dc) = image_size, declared, levels
    scale = float(move[2].max())
    N = int(move.shape[1])
    if not math.isfinite(scale) or scale <= 0:
        raise UnmeasurableError("model", "no token of the first block's input depends on the pixels",
                                "vitscope reads ViTs whose tokens are computed from the image")
    if float(move[1].max()) > _SAME * scale:  # the same image twice, different tokens (a shuffle moves ~scale)
        raise CaptureError(
            "model", f"{vit.info.name}: two identical images give different tokens (moved by {float(move[1].max()):.3g}):"
            " the model shuffles or masks its tokens at random in eval mode (ViTMAE's random masking: "
            "config.mask_ratio=0 still shuffles)",
            "load it with vitscope.load(model) (transformers' ViTMAE runs unmasked there), or set "
            "config.mask_ratio=0.0 and pass forward=lambda m, x: m(pixel_values=x, noise=torch.arange(P, "
            "dtype=torch.float32).expand(len(x), P)) to wrap (P patches: argsort keeps their order)",
        )
    moved = (move[2] > _MOVED * scale).nonzero().flatten().tolist()
    first, last = moved[0], moved[-1]
    inside = last - first + 1
    if inside != len(moved):
        gaps = [i for i in range(first, last + 1) if i not in set(moved)]
        raise CaptureError(
            "model", f"{vit.info.name}: tokens {gaps[:4]}{'...' if len(gaps) > 4 else ''} between the patches depend "
            "on no pixel (padding of a variable-resolution batch?): reading them on one grid would be wrong",
            "pass one image at a time at its own size, or a batch without padding",
        )
    ids = torch.tensor(moved)
    for argmax in (False, True):  # the phase first; the strongest image per digit when that gives no grid
        row_est = _position(move[3:3 + dr * _BASE][:, ids], dr, argmax)
        col_est = _position(move[3 + dr * _BASE:3 + (dr + dc) * _BASE][:, ids], dc, argmax)
        found = _grid(row_est, col_est, n_cols)
        if found is not None:
            break
    if found is None:
        # diagnose: each token rounded to its nearest band; a full grid in another order is a permutation
        rb, cb = torch.round(row_est).long(), torch.round(col_est).long()
        _, row_of = torch.unique(rb, return_inverse=True)
        col_vals, col_of = torch.unique(cb, return_inverse=True)
        pos = row_of * col_vals.numel() + col_of
        if torch.unique(pos).numel() == len(moved) and int(pos.max()) + 1 == len(moved):
            at = int((pos != torch.arange(len(moved))).nonzero()[0])
            raise CaptureError(
                "model", f"{vit.info.name}: tokens are permuted: token {first + at} holds patch "
                f"(row={int(row_of[at])}, col={int(col_of[at])}), not patch {at} in row-major order (random "
                "masking or a shuffle before the blocks, e.g. ViTMAE)",
                "run the model without the permutation (ViTMAE: vitscope.load(model) runs it unmasked)",
            )
        raise CaptureError(
            "model", f"{vit.info.name}: the {len(moved)} pixel-dependent tokens do not form a row-major patch grid "
            f"at {H}x{W} px (declared patch {vit.info.patch_size[0]}x{vit.info.patch_size[1]}: {n_rows}x{n_cols})",
            "check the declared patch_size, or pass one image at a time",
        )
    rows, cols = found
    return MeasuredLayout(num_prefix=first, grid=(rows, cols), num_suffix=N - 1 - last, image_size=(H, W))


def probe_padded(vit: VitModel, pixels: Sequence[torch.Tensor]) -> list[MeasuredLayout]:
    """Measure each image's layout inside one padded batch of images ``(C, H_b, W_b)`` of different sizes
    (`vitscope.adapters.base.PaddedRoute`): which tokens of image ``b`` its own pixels move, where each sits on
    its grid, and how many tokens after its patches depend on none of its pixels (its padding: `num_suffix`).

    The probe images of `probe_layout` are made for every image at its own geometry; forward pass ``k`` runs
    image ``b``'s ``k``-th probe image in slot ``b`` (its base once it has none left), so every image is
    measured where it sits in the batch, stopped at the first block's attention input. Cached per model and
    list of geometries.
    """
    shapes = tuple(tuple(int(v) for v in p.shape) for p in pixels)
    dtype, device = pixels[0].dtype, pixels[0].device
    key = ("padded", shapes, dtype, str(device), id(vit.sites[0].attn), vit.info.patch_size)
    cache = _layouts.setdefault(vit.module, {})
    if key in cache:
        return cache[key]  # type: ignore[return-value]
    made = [_images(vit, (C, H, W), dtype, device) for C, H, W in shapes]
    count = max(int(m[0].shape[0]) for m in made)
    with torch.no_grad(), eval_mode(vit.module):
        tok = torch.stack([  # (M, B, N, D): probe image k of every image, in one padded batch each
            _tokens(vit, [m[0][k] if k < m[0].shape[0] else m[0][0] for m in made])
            for k in range(count)
        ])
    out = []
    for b, (images, n_rows, n_cols, dr, dc) in enumerate(made):
        move = (tok[: images.shape[0], b] - tok[0, b]).norm(dim=-1).cpu()  # (M_b, N)
        out.append(_measure(vit, move, (n_rows, n_cols), (dr, dc), (shapes[b][1], shapes[b][2])))
    cache[key] = out  # type: ignore[assignment]
    return out


def check_token_axis(vit: VitModel, sites: Sequence[AttentionSite], geometry: tuple[int, int, int],
                     dtype: torch.dtype | None = None, device: torch.device | None = None,
                     num_tokens: int | None = None) -> None:
    """Prove, once per model and layer set, that each of ``sites`` attends over tokens: at a second input
    geometry its softmax's query and key axes have *that* geometry's token count.

    A shape check at one size cannot tell tokens from channels when they happen to be equally many (XCiT's
    ``head_dim x head_dim`` softmax at a size with ``head_dim`` tokens). Capture checks ``Nq == Nk == N`` at the
    real size; here one image at a second size with a different token count ``N2`` (a 2x3-patch image, the
    cheapest; else one patch row fewer or more than ``geometry``) must give ``Nq == Nk == N2``: a token axis
    follows the image, a channel axis does not. The forward pass stops after the deepest selected layer. A model
    that runs at one input size only cannot be checked this way (its shape checks at that size stand).
    ``num_tokens``: the token count at ``geometry``, so the second size is known to differ. Raises
    `CaptureError` naming the layer.
    """
    layers = tuple(s.layer for s in sites)
    done = _axis_checked.setdefault(vit.module, set())
    if layers in done:
        return
    C, H, W = geometry
    ph, pw = vit.info.patch_size
    dtype = dtype or vit.dtype
    device = device or vit.device
    candidates = [(2 * ph, 3 * pw)] + ([(H - ph, W)] if 2 * ph <= H else []) + [(H + ph, W)]
    for H2, W2 in candidates:
        if (H2, W2) == (H, W):
            continue
        shapes = _call_shapes(vit, sites, (C, H2, W2), dtype, device)
        if shapes is None or shapes[0] == num_tokens:
            continue  # the model refuses this size (or has as many tokens there): try the next
        n_tokens, calls = shapes
        for layer, (Nq, Nk) in calls.items():
            if Nq != n_tokens or Nk != n_tokens:
                raise CaptureError(
                    "model", f"layer {layer}: its softmax is not over the tokens: at {H2}x{W2} px the model has "
                    f"{n_tokens} tokens but the softmax is {Nq}x{Nk} (channel or cross-covariance attention, "
                    "e.g. XCiT)", "vitscope reads token softmax attention only (softmax over the tokens)",
                )
        break
    done.add(layers)


def _call_shapes(vit: VitModel, sites: Sequence[AttentionSite], geometry: tuple[int, int, int],
                 dtype: torch.dtype, device: torch.device) -> tuple[int, dict[int, tuple[int, int]]] | None:
    """Token count and each site's softmax ``(Nq, Nk)`` for one image of ``geometry``; ``None`` when the model
    does not run at that size. The forward pass stops after the deepest selected attention module."""
    C, H, W = geometry
    image = torch.zeros(1, C, H, W, dtype=dtype, device=device)
    calls: dict[int, tuple[int, int]] = {}
    first: list[torch.Tensor] = []
    windowed = bool(vit.info.windowed_layers)  # (SAM, ViTDet: count the tokens at the first selected layer,
    m0 = attention_module(min(sites, key=lambda s: s.layer) if windowed else vit.sites[0])  # a global one)
    seq_first = isinstance(m0, nn.MultiheadAttention) and not m0.batch_first

    def on_call(call: AttentionCall) -> None:
        _, _, Nq, Nk = call.shape
        calls[call.layer] = (Nq, Nk)

    def record(_m: nn.Module, args: Any, kwargs: Any) -> None:
        if not first:
            first.append(_token_tensor(args, kwargs, 1, seq_first, grid_ok=windowed))

    def stop(*_: Any) -> None:
        raise _Stop

    last = attention_module(max(sites, key=lambda s: s.layer))
    rows, cols = vit.grid_for((H, W))
    declared = vit.info.num_prefix_tokens + rows * cols + vit.info.num_suffix_tokens  # (windowed calls: one line)
    handles: list[Any] = []
    try:
        with torch.no_grad(), eval_mode(vit.module), observe_attention(sites, on_call, batch=int(image.shape[0]),
                                                                        tokens=declared):
            handles.append(m0.register_forward_pre_hook(this_thread_only(record), with_kwargs=True))
            handles.append(last.register_forward_hook(this_thread_only(stop)))
            with suppress(_Stop):
                vit(image)
    except CaptureError:  # what the attention interception refuses, it refuses at every size
        raise
    except Exception:  # the model's (or its adapter's) refusal of this size: a fixed position table
        return None
    finally:
        for h in handles:
            h.remove()
    if not first:
        return None
    return int(first[0].shape[1]), calls


def measured_prefix_kinds(num_prefix: int) -> tuple[str, ...]:
    """Kinds for a measured prefix nobody declared: ``"cls"`` first, ``"register"`` for the rest."""
    return ("cls",) + ("register",) * (num_prefix - 1) if num_prefix else ()



def check_layout(vit: VitModel, pixels: torch.Tensor) -> MeasuredLayout | None:
    """Measure ``vit``'s layout for ``pixels`` ``(B, C, H, W)`` and compare it with the description.

    A model described without a layout (`vitscope.wrap` with no ``prefix``/``suffix``: ``info.measured``) takes
    the measured counts, its prefix named ``"cls"`` then ``"register"`` and its suffix ``"suffix"`` (token
    kinds cannot be measured from pixels); any other description must agree with the measurement in prefix
    count, grid (``vit.grid_for``) and suffix count, else a one-line `CaptureError` says what was measured and
    what was declared.
    """
    H, W = int(pixels.shape[-2]), int(pixels.shape[-1])
    info = vit.info
    try:
        m = probe_layout(vit, tuple(pixels.shape[1:]), pixels.dtype, pixels.device)
    except UnmeasurableError:
        if info.measured:
            raise
        return None  # a model that ignores its pixels (a hand-made test module): the declaration stands
    if info.measured:
        kinds, suffix = measured_prefix_kinds(m.num_prefix), ("suffix",) * m.num_suffix
        if (info.prefix, info.suffix) != (kinds, suffix):
            vit.info = replace(info, prefix=kinds, suffix=suffix)
            info = vit.info
    grid = vit.grid_for((H, W))
    declared = (len(info.prefix), grid, len(info.suffix))
    if (m.num_prefix, m.grid, m.num_suffix) != declared:
        described = f"{declared[0]} prefix + {grid[0]}x{grid[1]} patches + {declared[2]} suffix tokens"
        raise CaptureError(
            "model", f"{info.name}: measured {m.describe()} at {H}x{W} px, but it is described with {described} "
            f"(prefix {list(info.prefix)}, patch {info.patch_size[0]}x{info.patch_size[1]})",
            "fix prefix=/suffix=/patch_size= in vitscope.wrap(...), or leave prefix and suffix out to use the "
            "measured layout" if info.family == "custom" else "the adapter does not describe this model: describe it with "
            "vitscope.wrap(model, blocks=..., num_heads=..., patch_size=...), which measures the layout itself",
        )
    return m
