"""What a gradient method explains: one target vocabulary for ``chefer``, ``legrad``, ``grad_rollout`` and
``attn_gradcam`` (Python ``target=`` and the CLI's ``--target``).

=================================  ===============================================================================
target                             score (one scalar per image, differentiated w.r.t. the attention)
=================================  ===============================================================================
``None``                           the logit of the predicted class (classifiers)
``281`` / ``[281, 5]``             the logit of that class (one class, or one per image)
``"tabby"`` / ``ClassName(...)``   the class of that name: the model's ``id2label`` (transformers), timm's
                                   ImageNet names (``timm.data.ImageNetInfo``), or a list of your own
``"text:a cat"``                   dual encoders (transformers ``CLIPModel``/``SiglipModel``/``Siglip2Model``,
                                   open_clip): the model's own image-text logit ``logit_scale.exp() * cos(img,
                                   txt)`` (+ SigLIP's ``logit_bias``); a list of prompts gives one map each
``"image:ref.png"``                backbones (and any model with an image embedding): ``cos(embed(image),
                                   embed(ref))``, the reference embedding fixed
``"patch:R,C"``                    ``mean_{j != p} cos(f_p, f_j)``: the final-norm feature ``f_p`` of patch
                                   (R, C) of the same image (fixed) against every other patch's ``f_j``
a callable                         ``target(output) -> (batch,)`` on the model's output, as before
=================================  ===============================================================================

Text, image and patch targets are `TokenScore`\\ s: they score the tokens of the model's last block through
the adapter's own read-out (`VitModel.embed`: final norm, pooling, projection; `VitModel.final_norm`), so for
the last layer the text score *is* the model's ``logits_per_image`` entry. A target the model cannot take (a
prompt without a text tower, a class name on a backbone) is a one-line error naming what would work.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitscope.errors import VitscopeError

KINDS = ("text", "image", "patch", "class")


@dataclass(frozen=True)
class ClassName:
    """A class given by name, looked up in ``labels`` (default: the model's own class names)."""

    name: str
    labels: Sequence[str] | None = None


@dataclass(frozen=True)
class TokenScore:
    """A target scored from the last block's tokens: a text prompt, a reference image or a patch.

    Attributes:
        kind: ``"text"``, ``"image"`` or ``"patch"``.
        label: what was asked (the prompt, the reference path, ``"R,C"``).
        fn: ``fn(tokens (B, N, D), grid (rows, cols)) -> (B,)`` scores.
        embedding: text and image targets: the embedding ``(E,)`` the image embedding is compared with (the
            prompt's text embedding, the reference's image embedding), else ``None``.
        of_embedding: text and image targets: the score as a function of image embeddings ``(B, E) -> (B,)``
            (``fn`` is ``of_embedding(vit.embed(tokens))``), else ``None``. LRP methods start from these two.
    """

    kind: str
    label: str
    fn: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
    embedding: torch.Tensor | None = field(default=None, compare=False)
    of_embedding: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    def score(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One score per image ``(B,)`` from block-output tokens ``(B, N, D)`` of a ``grid`` of patches."""
        return self.fn(tokens, grid)

    def describe(self) -> str:
        return f"{self.kind}:{self.label}"


def _works(vit: Any) -> str:
    """What targets this model takes, for the fix of an error."""
    kinds = []
    if vit.info.labels:
        kinds.append("a class index or name (e.g. 'tabby')")
    elif vit.info.num_classes:
        kinds.append("a class index")
    if vit.text is not None:
        kinds.append("'text:<prompt>'")
    if vit.embed is not None:
        kinds.append("'image:<path>'")
    if vit.final_norm is not None:
        kinds.append("'patch:ROW,COL'")
    kinds.append("or, in Python, a callable scoring each image")
    return f"{vit.info.name} takes " + ", ".join(kinds)


def class_index(name: str, labels: Sequence[str], model: str = "the model") -> int:
    """The index of class ``name`` in ``labels`` (case-insensitive; each comma-separated synonym of a label such
    as timm's ``"tabby, tabby cat"`` counts); unknown names are a one-line error listing close matches."""
    table: dict[str, int] = {}
    for i, label in enumerate(labels):
        for alias in (label, *label.split(",")):
            table.setdefault(alias.strip().lower(), i)
    key = name.strip().lower()
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else \
        "pass a class index, or one of the model's class names"
    raise VitscopeError("target", f"{model} has no class named {name!r} ({len(labels)} classes)", hint)


def _split(target: str) -> tuple[str, str]:
    """``"text:a cat"`` -> ``("text", "a cat")``; a string without a known kind is a class name."""
    kind, sep, rest = target.partition(":")
    if sep and kind.strip().lower() in KINDS:
        return kind.strip().lower(), rest.strip()
    return "class", target.strip()


def _named_class(vit: Any, name: str, labels: Sequence[str] | None = None) -> int:
    if name.lstrip("-").isdigit():
        return int(name)
    labels = labels if labels is not None else vit.info.labels
    if not labels:
        raise VitscopeError("target", f"{name!r} is a class name, but {vit.info.name} has no class names"
                            + ("" if vit.info.num_classes else " (no classifier)"), _works(vit))
    return class_index(name, labels, vit.info.name)


def resolve_target(vit: Any, target: Any) -> Any:
    """``target`` in the form the gradient methods compute with: ``None``, class indices (list of ints), a
    callable, or a list of `TokenScore` (one map each). Names are looked up, prompts encoded, a reference image
    embedded; what the model cannot take is a one-line error."""
    if target is None or isinstance(target, torch.Tensor) or (callable(target) and not isinstance(target, type)):
        return target
    if isinstance(target, TokenScore):
        return [target]
    if isinstance(target, ClassName):
        return [_named_class(vit, target.name, target.labels)]
    if isinstance(target, str):
        items: list[Any] = [target]
    elif isinstance(target, (list, tuple)) and any(isinstance(t, (str, ClassName, TokenScore)) for t in target):
        items = list(target)
    else:
        return target  # ints: checked by the methods (check_target)
    parsed: list[tuple[str, Any]] = [
        _split(t) if isinstance(t, str) else ("token", t) if isinstance(t, TokenScore) else ("class", t)
        for t in items]
    kinds = {k for k, _ in parsed}
    if kinds == {"class"}:
        return [_named_class(vit, v.name, v.labels) if isinstance(v, ClassName) else
                (v if isinstance(v, int) else _named_class(vit, str(v))) for _, v in parsed]
    if "class" in kinds:
        raise VitscopeError("target", f"a mix of class and {'/'.join(sorted(kinds - {'class'}))} targets",
                            "pass class names or indices (one per image), or prompts/references (one map each)")
    out: list[TokenScore] = []
    prompts = [v for k, v in parsed if k == "text"]
    if prompts:
        out.extend(text_scores(vit, prompts))
    for kind, value in parsed:
        if kind == "image":
            out.append(image_score(vit, value))
        elif kind == "patch":
            out.append(patch_score(vit, value))
        elif kind == "token":
            out.append(value)
    return out


def text_scores(vit: Any, prompts: Sequence[str]) -> list[TokenScore]:
    """One `TokenScore` per prompt: the model's own image-text logit (see the module docstring)."""
    tower, embed = vit.text, vit.embed
    if tower is None or embed is None:
        raise VitscopeError("target", f"a text prompt needs a dual encoder with its text tower; {vit.info.name} "
                            "has none", "load the whole CLIP/SigLIP (hf:<folder of CLIPModel.save_pretrained>, "
                            f"open_clip:<name>); {_works(vit)}")
    if any(not p for p in prompts):
        raise VitscopeError("target", "an empty text prompt", "write it after the colon: 'text:a cat'")
    from vitscope.capture.hooks import eval_mode

    with torch.no_grad(), eval_mode(vit.module):
        txt = tower.encode(tower.tokenize(list(prompts))).detach()  # (T, E)
    logits = tower.logits

    def make(t: int) -> tuple[Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
                              Callable[[torch.Tensor], torch.Tensor]]:
        def of_embedding(e: torch.Tensor) -> torch.Tensor:
            return logits(e, txt[t:t + 1].to(e.device))[:, 0]  # (B,)

        def score(tokens: torch.Tensor, _grid: tuple[int, int]) -> torch.Tensor:
            return of_embedding(embed(tokens))

        return score, of_embedding

    out = []
    for t, p in enumerate(prompts):
        score, of_embedding = make(t)
        out.append(TokenScore("text", p, score, embedding=txt[t], of_embedding=of_embedding))
    return out


def last_block_tokens(vit: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The last block's output tokens ``(B, N, D)`` of one forward pass (hook removed on exit)."""
    from vitscope.capture.hooks import _first_tensor, eval_mode, hooks_removed_on_exit, this_thread_only

    got: list[torch.Tensor] = []

    def grab(_m: Any, _inp: Any, out: Any) -> None:
        got.append(_first_tensor(out))

    with hooks_removed_on_exit() as handles, eval_mode(vit.module):
        handles.append(vit.sites[-1].block.register_forward_hook(this_thread_only(grab)))
        vit(pixels)
    return got[-1]


def image_score(vit: Any, path: str) -> TokenScore:
    """``cos(embed(image), embed(reference))``, the reference image's embedding computed once, fixed."""
    embed = vit.embed
    if embed is None:
        raise VitscopeError("target", f"'image:' needs the model's image embedding, unknown for {vit.info.name}",
                            _works(vit))
    if not path:
        raise VitscopeError("target", "'image:' without a path", "pass 'image:path/to/reference.png'")
    from vitscope.capture.prepare import prepare

    _, pixels = prepare(vit, path)
    with torch.no_grad():
        ref = embed(last_block_tokens(vit, pixels)).detach()  # (1, E)

    def of_embedding(e: torch.Tensor) -> torch.Tensor:  # (B, E) -> (B,)
        return torch.nn.functional.cosine_similarity(e, ref.to(e.device, e.dtype), dim=-1)

    def score(tokens: torch.Tensor, _grid: tuple[int, int]) -> torch.Tensor:
        return of_embedding(embed(tokens))

    return TokenScore("image", path, score, embedding=ref[0], of_embedding=of_embedding)


def parse_patch(text: str) -> tuple[int, int]:
    """``"R,C"`` -> ``(R, C)`` or a one-line error."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise VitscopeError("target", f"cannot read patch {text!r}", "pass 'patch:ROW,COL' (patch indices >= 0)")
    return int(parts[0]), int(parts[1])


def patch_score(vit: Any, text: str) -> TokenScore:
    """``mean_{j != p} cos(f_p, f_j)`` with ``f = final_norm(tokens)`` over the patches, ``f_p`` fixed."""
    norm = vit.final_norm
    if norm is None:
        raise VitscopeError("target", f"'patch:' needs the model's final norm, unknown for {vit.info.name}",
                            _works(vit))
    row, col = parse_patch(text)
    P0 = vit.info.num_prefix_tokens

    def score(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        rows, cols = grid
        if not (row < rows and col < cols):
            raise VitscopeError("target", f"patch {row},{col} is outside the {rows}x{cols} grid",
                                f"pass 'patch:ROW,COL' with ROW < {rows} and COL < {cols}")
        f = torch.nn.functional.normalize(norm(tokens)[:, P0:P0 + rows * cols], dim=-1)  # (B, P, D)
        p = row * cols + col
        sims = (f * f[:, p:p + 1].detach()).sum(dim=-1)  # (B, P)
        keep = torch.ones(rows * cols, dtype=torch.bool, device=sims.device)
        keep[p] = False
        return sims[:, keep].mean(dim=1)

    return TokenScore("patch", f"{row},{col}", score)


def target_meta(target: Any) -> Any:
    """What a method's ``meta["target"]`` records: class indices, or ``"text:a cat"``-style labels."""
    if isinstance(target, list) and target and all(isinstance(t, TokenScore) for t in target):
        return [t.describe() for t in target]
    if isinstance(target, TokenScore):
        return [target.describe()]
    return target if isinstance(target, list) else None
