"""The training loop: one visible function, `train`, in the spirit of nanoGPT's ``train.py``.

AdamW with linear warm-up and cosine decay (Loshchilov & Hutter 2019), standard augmentation (random resized
crop + flip, `vitscope.train.augment`), validation every ``val_every`` steps, early stopping that restores the
best checkpoint, metrics to ``metrics.csv`` (and TensorBoard when installed), tqdm progress, optional
[CLS]-attention snapshots of fixed validation images, and exact resume.

Reproducibility: every random draw of step ``s`` (batch order, augmentation, dropout) is a function of
``(seed, s)`` only: the batch order of epoch ``e`` is ``randperm`` from a generator seeded with ``(seed, e)``,
and the augmentation/dropout generators are re-seeded from ``(seed, s)`` before each step. So a run that is
killed and resumed from its last checkpoint (weights + optimizer + scheduler + counters) reaches bit-identical
weights to an uninterrupted one on the same machine (tested).

Output folder::

    model.safetensors, config.json   the final model (the best validation checkpoint), `vitscope.load`-able
    metrics.csv                      one row per validation
    train_config.json                the `TrainConfig` of the run
    checkpoints/last/                weights + trainer_state.pt (optimizer, scheduler, RNG, counters)
    checkpoints/best/                weights of the best validation so far
    attention/step_XXXXXXX.npz       [CLS] attention snapshots (when ``snapshots > 0``)
    tensorboard/                     TensorBoard events (when installed)
    .vitscope.json                   the marker of a folder vitscope wrote (`vitscope._io.MARKER`)

A new run goes into a new or empty folder only: a folder holding files vitscope did not write (another model's
``config.json`` and weights, say) is refused unless ``overwrite``, and even then none of them is replaced.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from vitscope.errors import VitscopeError
from vitscope.models.vit import ViT, ViTConfig, load_vit, save_vit
from vitscope.train.augment import normalize, random_resized_crop_flip
from vitscope.train.datasets import LabeledDataset, get_dataset


@dataclass
class TrainConfig:
    """Everything that determines a training run. Defaults are seed 004's (CIFAR-10, 64 px, patch 4, ...)."""

    # data
    dataset: str = "cifar10"
    data: str | None = None  # folder (or archive) with the dataset's files; unused for shapes
    image_size: tuple[int, int] = (64, 64)
    train_size: int | None = None  # shapes: images per epoch; other datasets: use only the first N
    val_size: int | None = None
    augment: bool = True  # random resized crop (+ flip) of each training batch
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of the random crops
    flip: bool = True
    # model
    patch_size: int = 4
    depth: int = 4
    dim: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    num_registers: int = 0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    pos_init: str = "random"  # "random" (trunc normal 0.02) or "sincos" (2-D sin-cos, still learned)
    # optimisation
    batch_size: int = 16
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 500
    epochs: int = 100
    max_steps: int | None = None
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    # validation, stopping, checkpoints
    val_every: int | None = None  # steps between validations; None = once per epoch
    patience: int = 10  # validations without a better validation accuracy before stopping
    checkpoint_every: int = 500  # steps between 'last' checkpoints (there is one at every validation too)
    snapshots: int = 0  # fixed validation images whose [CLS] attention is saved at every validation
    max_minutes: float | None = None  # wall-clock budget (stops like early stopping; not reproducible)
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise VitscopeError("crop_scale", f"{self.crop_scale} is not within (0, 1]", "e.g. (0.35, 1.0)")
        for name in ("batch_size", "epochs", "patch_size", "depth", "dim", "heads", "patience",
                     "checkpoint_every"):
            if int(getattr(self, name)) <= 0:
                raise VitscopeError(name, f"must be positive, got {getattr(self, name)}", f"pass {name} >= 1")
        if self.dim % self.heads:
            raise VitscopeError("dim", f"{self.dim} is not divisible by the {self.heads} heads", "pick dim = k * heads")
        if self.image_size[0] % self.patch_size or self.image_size[1] % self.patch_size:
            raise VitscopeError("image_size", f"{self.image_size} is not a multiple of patch {self.patch_size}",
                                "pick an image size divisible by the patch size")
        if self.pos_init not in ("random", "sincos"):
            raise VitscopeError("pos_init", f"unknown value {self.pos_init!r}", "use 'random' or 'sincos'")
        for name in ("lr", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise VitscopeError(name, f"must be positive, got {getattr(self, name)}", f"e.g. `{name}=5e-4`"
                                    if name == "lr" else "e.g. `mlp_ratio=4`")
        for name in ("min_lr", "weight_decay", "warmup_steps", "num_registers", "snapshots", "seed", "num_workers"):
            if getattr(self, name) < 0:
                raise VitscopeError(name, f"must be >= 0, got {getattr(self, name)}", f"pass {name} >= 0")
        for name in ("dropout", "attn_dropout", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise VitscopeError(name, f"{getattr(self, name)} is outside [0, 1)", f"e.g. `{name}=0.1`")
        for name in ("train_size", "val_size", "val_every", "max_steps", "grad_clip", "max_minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise VitscopeError(name, f"must be positive, got {getattr(self, name)}",
                                    f"pass {name} > 0, or leave it out")
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, ValueError):
                kind = None
            if kind not in ("cpu", "cuda", "mps"):
                raise VitscopeError("device", f"unknown device {self.device!r}", "use cpu, cuda, cuda:N, mps or auto")

    def _check_types(self) -> None:
        """Every field has its type (an int where an int is meant, a finite number, two numbers for a pair)
        before anything is computed from it: ``depth="abc"`` or ``lr=nan`` is an error naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("tuple"):  # image_size may also be one int (a square)
                items = [value, value] if f.name == "image_size" and _is_int(value) else value
                ok = isinstance(items, (list, tuple)) and len(items) == 2
                ok = ok and all(_is_int(v) if "int" in kind else _is_number(v) for v in items)
                what = "two integers, e.g. [32, 32]" if "int" in kind else "two numbers, e.g. [0.35, 1.0]"
            elif kind.startswith("int"):
                ok, what = _is_int(value), "an integer"
            elif kind.startswith("float"):
                ok, what = _is_number(value), "a finite number"
            elif kind.startswith("bool"):
                ok, what = isinstance(value, bool), "true or false"
            else:
                ok, what = isinstance(value, (str, os.PathLike)), "a string"
            if not ok:
                problem = f"{value} is too large" if isinstance(value, int) and not isinstance(value, bool) \
                    and abs(value) >= 2**62 else f"{value!r} is not {what}"
                raise VitscopeError(f.name, problem, f"set {f.name} to {what}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VitscopeError("config", f"unknown training options {unknown}", f"known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["crop_scale"] = list(self.crop_scale)
        return d


def _is_int(value: Any) -> bool:
    """An integer that fits the 64-bit counters and generators it feeds (not a bool, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**62


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


#: Named presets: overrides of `TrainConfig`'s defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # seed 004: CIFAR-10 at 64 px, patch 4, depth 4, width 128, 4 heads, MLP 128, dropout 0.1, batch 16,
    # lr 5e-4, 100 epochs, early-stopping patience 10, validation every 10,000 steps
    "seed004": dict(dataset="cifar10", image_size=(64, 64), patch_size=4, depth=4, dim=128, heads=4, mlp_ratio=1.0,
                    dropout=0.1, batch_size=16, lr=5e-4, epochs=100, patience=10, val_every=10_000,
                    checkpoint_every=2_000),
    "cifar10": dict(dataset="cifar10", image_size=(64, 64), patch_size=4, depth=4, dim=128, heads=4,
                    mlp_ratio=1.0, dropout=0.1, batch_size=16, lr=5e-4, epochs=100, patience=10,
                    val_every=10_000, checkpoint_every=2_000),
    "cifar100": dict(dataset="cifar100", image_size=(64, 64), patch_size=4, depth=4, dim=128, heads=4,
                     mlp_ratio=1.0, dropout=0.1, batch_size=16, lr=5e-4, epochs=100, patience=10,
                     val_every=10_000, checkpoint_every=2_000),
    "tiny-imagenet": dict(dataset="tiny-imagenet", image_size=(64, 64), patch_size=4, depth=4, dim=128, heads=4,
                          mlp_ratio=1.0, dropout=0.1, batch_size=16, lr=5e-4, epochs=100, patience=10,
                          val_every=10_000, checkpoint_every=2_000),
    # MNIST at its native 28 px, patch 4 (7x7 grid); no flips (digits are not mirror-symmetric)
    "mnist": dict(dataset="mnist", image_size=(28, 28), patch_size=4, depth=4, dim=64, heads=4, mlp_ratio=2.0,
                  batch_size=64, lr=1e-3, weight_decay=0.05, warmup_steps=100, epochs=15, patience=5,
                  augment=True, crop_scale=(0.6, 1.0), flip=False, checkpoint_every=200),
    # the bundled model (vitscope:shapes): fresh procedural images, trains in ~30 min on 2 CPU cores
    "shapes": dict(dataset="shapes", image_size=(32, 32), patch_size=4, depth=4, dim=64, heads=4, mlp_ratio=2.0,
                   batch_size=64, lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup_steps=200, epochs=1,
                   train_size=64 * 6000, val_size=1000, val_every=500, patience=8, augment=False, pos_init="sincos",
                   checkpoint_every=500, snapshots=8, num_workers=1),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The `TrainConfig` of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise VitscopeError("preset", f"unknown preset {name!r}", f"choose one of {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**PRESETS[name], **overrides})


#: What a run writes into its folder (a folder covers what is under it).
RUN_FILES = ("model.safetensors", "config.json", "metrics.csv", "train_config.json", "checkpoints", "attention",
             "tensorboard")


@dataclass
class TrainResult:
    """What `train` returns: the final (best) model and how the run ended."""

    model: ViT
    output: Path
    step: int
    best_step: int
    best_val_accuracy: float
    stopped: str  # "finished", "early-stopped", "time-limit", "interrupted"


# ----------------------------------------------------------------------------------------------- helpers
def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(n)`` drawn from a generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(_seed_for(seed, 1, epoch))
    return torch.randperm(n, generator=g)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sincos_2d(rows: int, cols: int, dim: int, temperature: float = 10_000.0) -> torch.Tensor:
    """2-D sin-cos position embeddings ``(rows * cols, dim)`` (Beyer et al. 2022, "Better plain ViT baselines").

    A quarter of the channels each hold ``sin(y w_k)``, ``cos(y w_k)``, ``sin(x w_k)``, ``cos(x w_k)`` with
    ``w_k = temperature^(-k / (dim/4))``, for patch row ``y`` and column ``x`` (row-major patch order).
    """
    if dim % 4:
        raise VitscopeError("dim", f"{dim} is not a multiple of 4", "sincos position embeddings need dim = 4k")
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    yw, xw = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega  # (rows*cols, dim/4)
    return torch.cat([yw.sin(), yw.cos(), xw.sin(), xw.cos()], dim=1).float()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases, norms, [CLS]/register tokens or position embeddings)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in ("cls_token", "pos_embed", "reg_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def model_config(cfg: TrainConfig, classes: tuple[str, ...], channels: int, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> ViTConfig:
    return ViTConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=channels, num_classes=len(classes),
        dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, num_registers=cfg.num_registers,
        dropout=cfg.dropout, attn_dropout=cfg.attn_dropout, mean=mean, std=std, labels=classes,
    )


def build_datasets(cfg: TrainConfig) -> tuple[LabeledDataset, LabeledDataset]:
    """The training and validation datasets of ``cfg`` (subsets when train_size/val_size are set)."""
    if cfg.dataset == "shapes":
        train_ds = get_dataset("shapes", split="train", image_size=cfg.image_size, size=cfg.train_size,
                               seed=cfg.seed)
        val_ds = get_dataset("shapes", split="val", image_size=cfg.image_size, size=cfg.val_size, seed=cfg.seed)
        return train_ds, val_ds
    train_ds = get_dataset(cfg.dataset, cfg.data, "train", cfg.image_size)
    val_ds = get_dataset(cfg.dataset, cfg.data, "val", cfg.image_size)
    return _head(train_ds, cfg.train_size), _head(val_ds, cfg.val_size)


def _head(ds: LabeledDataset, n: int | None) -> LabeledDataset:
    if n is None or n >= len(ds):
        return ds
    sub = Subset(ds, range(n))
    for attr in ("classes", "channels", "mean", "std"):
        setattr(sub, attr, getattr(ds, attr))
    return sub  # type: ignore[return-value]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, mean: tuple[float, ...], std: tuple[float, ...],
             batch_size: int = 256, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset`` (items ``(image in [0, 1], label, ...)``)."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = batch[0].to(device), batch[1].to(device)
            logits = model(normalize(x, mean, std))
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            n += int(y.numel())
    finally:
        model.train(was_training)
    return total_loss / max(n, 1), correct / max(n, 1)


@contextlib.contextmanager
def _graceful_interrupt() -> Iterator[dict[str, bool]]:
    """First Ctrl-C sets a flag (the loop checkpoints and stops after the current step); a second one aborts."""
    flag = {"stop": False}
    try:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield flag
            return
    except Exception:  # pragma: no cover
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from vitscope._io import atomic_write_text

    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _save_checkpoint(folder: Path, model: ViT, trainer: dict[str, Any]) -> None:
    """Write ``folder`` (weights, config, trainer_state.pt) as a whole: a new folder swapped in by renames."""
    from vitscope._io import replace_dir

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.new")
    shutil.rmtree(tmp, ignore_errors=True)
    save_vit(model, tmp)
    torch.save(trainer, tmp / "trainer_state.pt")
    replace_dir(tmp, folder)


def _find_checkpoint(folder: Path) -> Path | None:
    """``folder`` if complete, else the previous one left by an interrupted swap."""
    for cand in (folder, folder.with_name(f".{folder.name}.old")):
        if (cand / "trainer_state.pt").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


# ------------------------------------------------------------------------------------------------- train
def train(
    cfg: TrainConfig | None,
    output: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    datasets: tuple[Any, Any] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a vitscope `ViT` as ``cfg`` says and write it (and its run) into ``output``.

    Args:
        cfg: the run's configuration (see `TrainConfig`, `preset`); ``None`` with ``resume=True`` reuses the
            one saved in ``output``.
        output: run folder (created). Refused if it already holds a run, unless ``resume``.
        resume: continue the run in ``output`` from its last checkpoint (same final weights as uninterrupted).
        progress: show a tqdm progress bar.
        log: where one-line progress messages go (default: ``tqdm.write``).
        on_step: called with the global step after every optimisation step (and its checkpoint/validation);
            raising from it aborts the run like a crash (tests use it to simulate a kill).
        datasets: ``(train, val)`` datasets to use instead of the ones ``cfg`` names (items
            ``(image in [0, 1], label)``, with ``classes``, ``channels``, ``mean``, ``std`` attributes);
            pass the same ones again when resuming.
        overwrite: start a new run in a folder that holds files vitscope did not write (they are kept; none may
            have the name of a file the run writes, `RUN_FILES`). Without it such a folder is refused.

    Returns:
        `TrainResult` whose ``model`` is the best validation checkpoint, also saved as ``output``.
    """
    from tqdm.auto import tqdm

    from vitscope._io import atomic_write_text, claim_output

    out = Path(output)
    ckpt_dir = out / "checkpoints"
    saved_cfg_file = out / "train_config.json"
    last = _find_checkpoint(ckpt_dir / "last")
    if resume:
        if not saved_cfg_file.is_file():
            raise VitscopeError("output", f"{out} holds no training run to resume", "train into it without --resume")
        saved = TrainConfig.from_dict(json.loads(saved_cfg_file.read_text()))
        if cfg is None:
            cfg = saved
        else:
            volatile = {"num_workers", "device", "max_minutes"}
            diff = [f.name for f in fields(TrainConfig) if f.name not in volatile
                    and getattr(cfg, f.name) != getattr(saved, f.name)]
            if diff:
                raise VitscopeError("config", f"differs from the saved run in {diff}",
                                    "resume without changing options, or train into a new folder")
    else:
        if cfg is None:
            raise VitscopeError("cfg", "no training configuration given", "pass a TrainConfig or preset(...)")
        if last is not None or saved_cfg_file.is_file():
            raise VitscopeError("output", f"{out} already holds a training run",
                                "pass --resume to continue it, or choose a new folder")
        folder = claim_output(out, "train", overwrite=overwrite)
        folder.check_writes(RUN_FILES)
    assert cfg is not None
    # the data first: a missing or broken dataset is refused before anything is written
    train_ds, val_ds = datasets if datasets is not None else build_datasets(cfg)
    if not resume:
        folder.record([])  # the marker: this folder is a vitscope training run
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_cfg_file, json.dumps(cfg.to_dict(), indent=2))

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    classes, channels = tuple(train_ds.classes), int(train_ds.channels)
    mean, std = tuple(train_ds.mean), tuple(train_ds.std)
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise VitscopeError("batch_size", f"{cfg.batch_size} is larger than the {len(train_ds)} training images",
                            "use a smaller batch")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    val_every = cfg.val_every or steps_per_epoch

    torch.manual_seed(_seed_for(cfg.seed, 0))
    model = ViT(model_config(cfg, classes, channels, mean, std))
    if cfg.pos_init == "sincos":
        with torch.no_grad():
            model.pos_embed[0, 1:] = sincos_2d(*model.cfg.grid, cfg.dim)  # [CLS] keeps its random init
    model = model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    min_ratio = cfg.min_lr / cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, min_ratio)  # type: ignore[arg-type]
    )
    state: dict[str, Any] = {
        "step": 0, "best_acc": -1.0, "best_loss": math.inf, "best_step": 0, "bad": 0, "rows": [],
        "elapsed": 0.0, "run_loss": 0.0, "run_correct": 0, "run_seen": 0, "stopped": "",
    }
    if resume and last is not None:
        trainer = torch.load(last / "trainer_state.pt", map_location=device, weights_only=True)
        model.load_state_dict(load_vit(last, map_location=device).state_dict())
        opt.load_state_dict(trainer["optimizer"])
        sched.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["torch_rng"])
        state.update(trainer["state"])
    if state["stopped"]:  # the run had already ended: nothing to do
        (log or tqdm.write)(f"already {state['stopped']} at step {state['step']}: best val_acc {state['best_acc']:.4f} at step "
            f"{state['best_step']}; model in {out}")
        return TrainResult(load_vit(out, map_location=device), out, state["step"], state["best_step"],
                           state["best_acc"], state["stopped"])

    say = log or tqdm.write
    writer = _tensorboard(out, state["step"])
    snapshot_x = _snapshot_images(val_ds, cfg.snapshots)
    model.train()
    t_start = time.monotonic() - state["elapsed"]

    def checkpoint() -> None:
        state["elapsed"] = time.monotonic() - t_start
        _save_checkpoint(ckpt_dir / "last", model, {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
            "state": dict(state),
        })

    def validate(step: int) -> None:
        val_loss, val_acc = evaluate(model, val_ds, mean, std, device=device)
        seen = max(state["run_seen"], 1)
        row = {
            "step": step, "epoch": round(step / steps_per_epoch, 4), "lr": sched.get_last_lr()[0],
            "train_loss": state["run_loss"] / seen, "train_acc": state["run_correct"] / seen,
            "val_loss": val_loss, "val_acc": val_acc, "time_s": round(time.monotonic() - t_start, 2),
        }
        state["rows"].append(row)
        state["run_loss"], state["run_correct"], state["run_seen"] = 0.0, 0, 0
        _write_csv(out / "metrics.csv", state["rows"])
        if writer is not None:
            for k in ("lr", "train_loss", "train_acc", "val_loss", "val_acc"):
                writer.add_scalar(k, row[k], step)
            writer.flush()
        better = val_acc > state["best_acc"] or (val_acc == state["best_acc"] and val_loss < state["best_loss"])
        if better:
            state["best_acc"], state["best_loss"], state["best_step"], state["bad"] = val_acc, val_loss, step, 0
            save_vit(model, ckpt_dir / "best")
        else:
            state["bad"] += 1
        if snapshot_x is not None:
            _save_snapshot(model, snapshot_x, mean, std, out / "attention" / f"step_{step:07d}.npz")
        say(f"step {step}/{total_steps}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.4f}  "
            f"val_loss {val_loss:.4f}  val_acc {val_acc:.4f}" + ("  *" if better else ""))

    bar = tqdm(total=total_steps, initial=state["step"], disable=not progress, desc="train", unit="step",
               dynamic_ncols=True)
    stopped = ""
    try:
        with _graceful_interrupt() as interrupt:
            while state["step"] < total_steps and not stopped:
                epoch, pos = divmod(state["step"], steps_per_epoch)
                order = epoch_order(len(train_ds), cfg.seed, epoch)
                batches = [order[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()
                           for i in range(pos, steps_per_epoch)]
                loader = DataLoader(train_ds, batch_sampler=batches, num_workers=cfg.num_workers)
                for batch in loader:
                    step = state["step"]
                    x, y = batch[0].to(device), batch[1].to(device)
                    torch.manual_seed(_seed_for(cfg.seed, 2, step))  # dropout of this step
                    if cfg.augment:
                        g = torch.Generator().manual_seed(_seed_for(cfg.seed, 3, step))
                        x = random_resized_crop_flip(x, g, scale=cfg.crop_scale, flip=cfg.flip)
                    logits = model(normalize(x, mean, std))
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                    sched.step()
                    state["step"] = step = step + 1
                    state["run_loss"] += float(loss.detach()) * y.numel()
                    state["run_correct"] += int((logits.argmax(-1) == y).sum())
                    state["run_seen"] += int(y.numel())
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                    validated = step % val_every == 0 or step == total_steps
                    if validated:
                        validate(step)
                        if state["bad"] >= cfg.patience:
                            stopped = "early-stopped"
                    if cfg.max_minutes is not None and time.monotonic() - t_start > 60 * cfg.max_minutes:
                        stopped = stopped or "time-limit"
                        if not validated:
                            validate(step)
                    if interrupt["stop"]:
                        stopped = stopped or "interrupted"
                    if validated or stopped or step % cfg.checkpoint_every == 0:
                        checkpoint()
                    if on_step is not None:
                        on_step(step)
                    if stopped or step >= total_steps:
                        break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if stopped == "interrupted":
        say(f"interrupted at step {state['step']}: checkpoint saved in {ckpt_dir / 'last'}, no final model yet "
            f"(continue with: vitscope train -o {out} --resume)")
        return TrainResult(model, out, state["step"], state["best_step"], state["best_acc"], "interrupted")

    # restore the best validation checkpoint and publish it as the run's model
    best = load_vit(ckpt_dir / "best", map_location=device)
    state["stopped"] = stopped or "finished"
    save_vit(best, out, extra={"trained": {
        "dataset": cfg.dataset, "step": state["best_step"], "val_accuracy": state["best_acc"],
        "val_loss": state["best_loss"], "stopped": state["stopped"], "total_steps": state["step"],
        "seed": cfg.seed,
    }})
    checkpoint()
    say(f"{state['stopped']} at step {state['step']}: best val_acc {state['best_acc']:.4f} at step "
        f"{state['best_step']}; model in {out}")
    return TrainResult(best, out, state["step"], state["best_step"], state["best_acc"], state["stopped"])


def _tensorboard(out: Path, step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=step or None)


def _snapshot_images(val_ds: Any, n: int) -> torch.Tensor | None:
    if n <= 0:
        return None
    n = min(n, len(val_ds))
    return torch.stack([val_ds[i][0] for i in range(n)])  # (n, C, H, W) in [0, 1]


def _save_snapshot(model: ViT, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                   path: Path) -> None:
    """[CLS] attention rows of every layer and head for the fixed snapshot images, as an Attentions .npz."""
    from vitscope.capture import capture

    pixels = normalize(images.to(next(model.parameters()).device), mean, std)
    attn = capture(model, pixels, queries="cls")
    attn.save(path)

