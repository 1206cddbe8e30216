"""The model description every adapter produces: `ModelInfo`, `Preprocess`, `AttentionSite` and `VitModel`.

An adapter's whole job is to say, for one model family, which module computes each layer's attention, how
many prefix tokens of which kinds the model has, and how it wants its pixels. Capture (`vitscope.capture`)
then works the same way for every family: it intercepts the attention computation inside those modules (after
RoPE, qk-norm and position biases) and recomputes ``softmax(q k^T * scale + bias)`` for only the rows it needs,
so fused/SDPA attention stays on and outputs are bit-identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from vitscope.errors import CaptureError, VitscopeError, VitscopeWarning
from vitscope.layout import Preprocess, SizePolicy

__all__ = [
    "AttentionSite", "ModelInfo", "PaddedRoute", "Preprocess", "SizePolicy", "Tap", "TextTower", "VitModel",
    "choose_weights", "import_optional", "refuse_compiled", "window_of", "with_weights",
]


@dataclass(frozen=True)
class ModelInfo:
    """What vitscope knows about a ViT, whatever it came from.

    ``prefix``/``suffix`` are the kinds of the tokens before and after the patches, as declared; capture measures
    the layout (`vitscope.capture.probe`) and refuses a declaration that disagrees. ``measured``: nothing was
    declared (`vitscope.wrap` without ``prefix``/``suffix``); the counts are taken from the first measurement.
    """

    name: str
    family: str
    num_layers: int
    num_heads: int
    embed_dim: int
    patch_size: tuple[int, int]
    prefix: tuple[str, ...]
    preprocess: Preprocess = field(default_factory=Preprocess)
    num_classes: int | None = None
    labels: tuple[str, ...] | None = None
    suffix: tuple[str, ...] = ()
    measured: bool = False
    #: per layer ``"global"`` or ``"windowed"`` (SAM, ViTDet: windowed blocks between global ones); empty when
    #: every layer attends globally. Windowed layers have no global map: capturing one is refused.
    layer_kinds: tuple[str, ...] = ()
    #: where the weights came from: ``"pretrained"`` (the library's or hub's published weights), ``"random"``
    #: (freshly initialised: attention not learned), ``"checkpoint <file>"``, or ``"as given"`` (a module passed in)
    weights: str = "as given"
    #: a video model's input frames ``T`` (0: an image model) and input frames per token along time; its tokens
    #: are ``T // tubelet`` frames of patches in order ``(T', rows, cols)`` (`vitscope.layout.TokenLayout`)
    frames: int = 0
    tubelet: int = 1

    @property
    def token_frames(self) -> int:
        """Frames of tokens ``T'`` (input frames / tubelet; 1 for an image model)."""
        return max(1, self.frames // self.tubelet) if self.frames else 1

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.prefix)

    @property
    def num_suffix_tokens(self) -> int:
        return len(self.suffix)

    @property
    def windowed_layers(self) -> tuple[int, ...]:
        """Indices of the layers that attend within local windows, or factorised (TimeSformer's divided
        space-time attention): no global attention map."""
        return tuple(i for i, kind in enumerate(self.layer_kinds) if kind in ("windowed", "factorised"))

    @property
    def global_layers(self) -> tuple[int, ...]:
        """Indices of the layers with a global attention map (every layer unless some are windowed)."""
        windowed = set(self.windowed_layers)
        return tuple(i for i in range(self.num_layers) if i not in windowed)

    def describe(self) -> str:
        ph, pw = self.patch_size
        kinds = ", ".join(self.prefix) or "none"
        if self.measured and not self.prefix:
            kinds = "measured on first use"
        h, w = self.preprocess.image_size
        after = f", suffix tokens [{len(self.suffix)} {self.suffix[0]}]" if self.suffix else ""
        text = (
            f"{self.name} ({self.family}): {self.num_layers} layers x {self.num_heads} heads, dim {self.embed_dim}, "
            f"patch {ph}x{pw}, prefix tokens [{kinds}]{after}, input {h}x{w}"
            + (f" x {self.frames} frames (tubelet {self.tubelet})" if self.frames else "") + self.weights_note()
        )
        if "factorised" in self.layer_kinds:
            text += (f"; factorised layers {list(self.windowed_layers)} (divided space-time attention: no "
                     "space-time map)")
        elif self.windowed_layers:
            text += (f"; global layers {list(self.global_layers)}, windowed layers {list(self.windowed_layers)} "
                     "(no global map)")
        return text

    def weights_note(self) -> str:
        """``", random weights"`` and the like for `describe` (nothing for a module passed in as given)."""
        if self.weights == "as given":
            return ""
        if self.weights.startswith("checkpoint "):
            return f", weights from {self.weights[len('checkpoint '):]}"
        return f", {self.weights} weights"


TapLayout = Literal["flat", "heads", "qkv"]


@dataclass(frozen=True)
class Tap:
    """Where one of q, k, v (or the attention output) can be read during the forward pass.

    Attributes:
        module: the submodule to hook.
        where: read the module's ``"output"`` or its first positional ``"input"``.
        layout: ``"flat"``: ``(B, N, H*d)`` (a q/k/v Linear, or the heads-concatenated attention output);
            ``"heads"``: ``(B, H, N, d)`` (e.g. timm's ``q_norm``/``k_norm``);
            ``"qkv"``: a fused projection ``(B, N, 3*H*d)`` laid out as ``(3, H, d)``, ``index`` picks q/k/v.
        index: which of q (0), k (1), v (2) in a ``"qkv"`` tap.
    """

    module: nn.Module
    where: Literal["output", "input"] = "output"
    layout: TapLayout = "flat"
    index: int = 0

    def extract(self, value: torch.Tensor, num_heads: int) -> torch.Tensor:
        """The tapped tensor as ``(B, H, N, d)``."""
        if self.layout == "heads":
            return value
        B, N, C = value.shape
        if self.layout == "qkv":
            d = C // (3 * num_heads)
            return value.reshape(B, N, 3, num_heads, d)[:, :, self.index].transpose(1, 2)
        d = C // num_heads
        return value.reshape(B, N, num_heads, d).transpose(1, 2)


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer: the block and the module inside which its attention is computed.

    Capture intercepts the attention computation made while ``attn`` runs (`vitscope.capture.intercept`), so
    an adapter only names the module. ``q``/``k``/``v``/``out`` taps and ``scale`` are optional declarations
    (`vitscope.wrap`): when given, capture checks that they agree with what the attention kernel sees.
    """

    layer: int
    block: nn.Module
    attn: nn.Module
    num_heads: int
    q: Tap | None = None
    k: Tap | None = None
    scale: float | None = None
    v: Tap | None = None
    out: Tap | None = None


@dataclass(frozen=True)
class TextTower:
    """The text side of a dual encoder (CLIP, SigLIP, open_clip), loaded with the model.

    Attributes:
        tokenize: prompts -> the model's own text inputs (a dict of tensors for transformers, token ids for
            open_clip), exactly as its tokenizer makes them.
        encode: those inputs -> text embeddings ``(T, E)``, the model's own (its projection, not normalised).
        logits: image embeddings ``(B, E)`` and text embeddings ``(T, E)`` -> the model's image-text logits
            ``(B, T)``: ``logit_scale.exp() * cos`` (plus SigLIP's ``logit_bias``).
    """

    tokenize: Callable[[Sequence[str]], Any]
    encode: Callable[[Any], torch.Tensor]
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def scaled_cosine(scale: torch.Tensor, bias: torch.Tensor | None = None,
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``logits(img (B, E), txt (T, E)) = exp(scale) * cos(img, txt) (+ bias)`` ``(B, T)``, as CLIP and SigLIP
    compute them (``scale`` is the log of the logit scale, a parameter of the model)."""

    def logits(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt.to(img.dtype) / txt.norm(dim=-1, keepdim=True).to(img.dtype)
        out = scale.exp().to(img.dtype) * (img @ txt.t())  # (B, T)
        return out if bias is None else out + bias.to(img.dtype)

    return logits


@dataclass(frozen=True)
class PaddedRoute:
    """How a variable-resolution model (SigLIP2 NaFlex, timm NaFlexViT) runs images of different sizes in one
    padded batch: ``forward(module, pixels)`` takes one pixel tensor ``(C, H_b, W_b)`` per image (each side a
    multiple of the patch), patchifies each on its own grid, pads them to the longest image's patch count, and
    passes the model its own grid declaration (SigLIP2's ``spatial_shapes``, NaFlexViT's ``patch_coord``) and
    padding mask (``pixel_attention_mask``, ``patch_valid``). Capture measures the per-image grids and padding
    (`vitscope.capture.probe.probe_padded`) and proves the padding masked."""

    forward: Callable[[nn.Module, list[torch.Tensor]], Any]


class VitModel:
    """A ViT with its description: what `vitscope.load` returns and `vitscope.capture` reads.

    Attributes:
        module: the underlying ``nn.Module`` (left as the user gave it: capture changes no flag for good).
        info: layers, heads, patch size, prefix tokens, preprocessing.
        sites: one `AttentionSite` per layer, in depth order.
        readout: the model's head after the blocks (final norm, pooling, classifier) as a function of block-output
            tokens ``(B, N, D)`` -> logits ``(B, classes)``, or ``None`` when unknown; LeGrad reads every
            layer's tokens out through it.
        embed: block-output tokens of the last layer ``(B, N, D)`` -> the model's image embedding ``(B, E)``
            (its final norm, pooling and, for dual encoders, projection; no classifier), or ``None`` when unknown.
            Reference and text targets score through it (`vitscope.methods.targets`).
        final_norm: block-output tokens -> the model's final norm of every token ``(B, N, D)`` (patch features),
            or ``None`` when unknown.
        text: the text tower of a dual encoder (`TextTower`), or ``None``.
    """

    def __init__(
        self,
        module: nn.Module,
        info: ModelInfo,
        sites: Sequence[AttentionSite],
        forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
        logits: Callable[[Any], torch.Tensor | None] | None = None,
        readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_batch: int | None = None,
        embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
        final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
        text: TextTower | None = None,
        padded: PaddedRoute | None = None,
    ) -> None:
        if len(sites) != info.num_layers:
            raise ValueError(f"sites: {len(sites)} attention sites but info says {info.num_layers} layers")
        self.module = module
        self.info = info
        self.sites = list(sites)
        self._forward = forward
        self._logits = logits
        self.readout = readout
        #: the most images one forward pass takes (Pixtral packs a batch into one sequence: 1); None = any
        self.max_batch = max_batch
        self.embed = embed
        self.final_norm = final_norm
        self.text = text
        #: how a variable-resolution model runs a padded batch of images of different sizes (else None)
        self.padded = padded

    def __call__(self, pixel_values: torch.Tensor) -> Any:
        """Run the model on preprocessed pixels ``(B, C, H, W)`` the way its family needs."""
        if self._forward is not None:
            return self._forward(self.module, pixel_values)
        return self.module(pixel_values)

    def logits(self, output: Any) -> torch.Tensor | None:
        """Class logits ``(B, classes)`` from a forward output, or ``None`` when the model has no classifier."""
        if self._logits is not None:
            return self._logits(output)
        return output if isinstance(output, torch.Tensor) and output.dim() == 2 else None

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def preprocess(self, images: Any, policy: SizePolicy | None = None, size: int | tuple[int, int] | None = None,
                   ) -> torch.Tensor:
        """Turn paths, PIL images, arrays (or a list of them) into pixel values ``(B, C, H, W)``; for a video model
        (``info.frames``) a video file, a frames folder, a list of frames or a ``(B, T, C, H, W)`` tensor into
        ``(B, T, C, H, W)`` (`vitscope.video.preprocess_video`, frames sampled with the family's rate).

        A tensor is taken as already-preprocessed pixel values and returned as is.
        """
        from vitscope.errors import ImageError
        from vitscope.images import preprocess

        if self.info.frames:
            from vitscope.video import family_sample_rate, preprocess_video

            pixels = preprocess_video(images, self.info.preprocess, self.info.patch_size, self.info.frames,
                                      policy=policy, size=size, sample_rate=family_sample_rate(self.module))
        else:
            pixels = preprocess(images, self.info.preprocess, self.info.patch_size, policy=policy, size=size)
        (H, W), (ph, pw) = pixels.shape[-2:], self.info.patch_size
        if H % ph or W % pw:  # a tensor given as is: the model would crop, pad or assert on its own
            raise ImageError(
                "images", f"pixel values of {H}x{W} are not a multiple of the {ph}x{pw} patch",
                f"crop them to {H // ph * ph}x{W // pw * pw}, or pass the images themselves (paths, PIL, arrays) "
                "with policy='crop' or 'resize'",
            )
        return pixels

    def grid_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` for an input of ``(height, width)`` pixels; a video model's is the stacked
        grid ``(T' * rows, cols)`` of its ``T'`` token frames (`vitscope.layout.TokenLayout`)."""
        (h, w), (ph, pw) = image_size, self.info.patch_size
        return (self.info.token_frames * (h // ph), w // pw)

    def __repr__(self) -> str:
        return f"VitModel({self.info.describe()})"


def window_of(block: nn.Module) -> int:
    """A block's attention window side as it declares it (0: global): SAM's image encoder (transformers and
    timm) and ViTDet set ``window_size`` on their windowed blocks and 0 on their global ones; a tuple is read as
    its largest side. A declaration only: capture measures each layer's attention call (its key count and batch)."""
    w = getattr(block, "window_size", 0) or 0
    if isinstance(w, (tuple, list)):
        return max((int(v) for v in w), default=0)
    return int(w) if isinstance(w, (int, float)) else 0


def refuse_compiled(module: nn.Module) -> None:
    """A ``torch.compile``'d module runs graphs vitscope cannot see into: say so."""
    if hasattr(module, "_orig_mod") or type(module).__name__ == "OptimizedModule":
        raise CaptureError(
            "model", "the model is torch.compile'd: its attention runs inside a compiled graph vitscope cannot see",
            "pass the original module (compiled_model._orig_mod)",
        )


WeightsChoice = Literal["pretrained", "checkpoint", "random"]


def choose_weights(checkpoint: object = None, random_weights: bool = False, pretrained: object = None,
                   ) -> WeightsChoice:
    """The one rule for an architecture named by its library (``timm:``, ``torchvision:``, ``open_clip:``): the
    library's pretrained weights, unless a ``checkpoint`` is given or ``random_weights=True`` opts out.

    ``pretrained`` is the loader's own keyword as the caller gave it (``None``: not given); an explicit false
    value (``pretrained=False``) asks for random weights too, and is announced the same way.
    """
    if random_weights and checkpoint is not None:
        raise VitscopeError("random_weights", "given together with a checkpoint",
                            "pass `checkpoint='path/to/weights'` or `random_weights=True`, not both")
    if random_weights and pretrained:
        raise VitscopeError("random_weights", f"given together with pretrained={pretrained!r}", "pass one of them")
    if checkpoint is not None:
        if pretrained:
            raise VitscopeError("checkpoint", f"given together with pretrained={pretrained!r}", "pass one of them")
        return "checkpoint"
    if random_weights or (pretrained is not None and not pretrained):
        return "random"
    return "pretrained"


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside vitscope, so a warning points at the caller's line."""
    import os
    import sys

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def with_weights(vit: VitModel, weights: str) -> VitModel:
    """``vit`` with ``info.weights`` set; random weights are announced with a `VitscopeWarning` (their attention is
    not learned, so maps of it show no real structure)."""
    vit.info = replace(vit.info, weights=weights)
    if weights == "random":
        warnings.warn(f"{vit.info.name} has random weights: its attention is not learned, so its maps show no "
                      "real structure", VitscopeWarning, stacklevel=_caller_level())
    return vit


def import_optional(module: str, install: str) -> Any:
    """Import an optional dependency, or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise VitscopeError("model", f"this model family needs the {module} package", f"pip install {install}") from None
