"""Datasets behind one interface: `get_dataset(name, root, split, image_size)`.

Every dataset is a ``torch.utils.data.Dataset`` of ``(image, label)`` where ``image`` is a ``(C, H, W)`` float
tensor in [0, 1] (resized to ``image_size`` when given) and ``label`` an int, with ``classes`` (names in label
order), ``channels`` and the usual normalisation ``mean``/``std``. Supported:

==================  =====================================================================================
``shapes``          procedural, no files (`vitscope.train.shapes`); masks via ``with_masks=True``
``cifar10``         the official python version: ``cifar-10-python.tar.gz`` or its extracted
                    ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
``cifar100``        ``cifar-100-python.tar.gz`` or ``cifar-100-python/`` (``train``, ``test``, ``meta``);
                    ``label_mode="fine"`` (100 classes, default) or ``"coarse"`` (20)
``tiny-imagenet``   ``tiny-imagenet-200/`` (``wnids.txt``, ``words.txt``, ``train/<wnid>/images/*``,
                    ``val/images/*`` + ``val/val_annotations.txt``)
``mnist``           IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (optionally ``.gz``)
``folder``          any image folder with one sub-folder per class (``root/<split>/<class>/*`` if the split
                    folders exist, else ``root/<class>/*`` with every 10th file held out for ``val``)
==================  =====================================================================================

CIFAR batches are Python pickles; they are read with a restricted unpickler that only rebuilds builtins and
numpy arrays and refuses anything else, so a malicious file cannot run code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitscope.errors import VitscopeError
from vitscope.train.labeled import LabeledDataset

DATASETS: tuple[str, ...] = ("shapes", "cifar10", "cifar100", "tiny-imagenet", "mnist", "folder")

#: Official archives: (url, file name, md5).
CIFAR_ARCHIVES: dict[str, tuple[str, str, str]] = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}
_CIFAR_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

#: Usual per-channel normalisation of each dataset (pixels in [0, 1]).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "shapes": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "mnist": ((0.1307,), (0.3081,)),
    "folder": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".JPEG")


def _resize(image: torch.Tensor, image_size: tuple[int, int] | None) -> torch.Tensor:
    """``(C, h, w)`` -> ``(C, H, W)`` bilinear (antialiased when shrinking); unchanged when sizes match."""
    if image_size is None or tuple(image.shape[-2:]) == tuple(image_size):
        return image
    return F.interpolate(image[None], size=tuple(image_size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0, 1)


class ArrayDataset(LabeledDataset):
    """Images held in memory as uint8 ``(N, H, W, C)`` with int labels ``(N,)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 image_size: tuple[int, int] | None = None) -> None:
        if images.ndim == 3:
            images = images[..., None]
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self.channels = int(images.shape[-1])
        self.image_size = image_size

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1).float().div_(255.0)
        assert self.labels is not None
        return _resize(image, self.image_size), int(self.labels[index])


class FileDataset(LabeledDataset):
    """Images read from files on access (decoded by PIL, converted to RGB)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], classes: Sequence[str],
                 image_size: tuple[int, int] | None = None) -> None:
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from vitscope.images import load_image

        arr = np.asarray(load_image(self.files[index], "dataset image"), dtype=np.uint8)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        assert self.labels is not None
        return _resize(image, self.image_size), int(self.labels[index])


# ------------------------------------------------------------------------------------------------- pickles
class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only builtin containers/scalars and numpy arrays; any other global is refused.

    CIFAR's python batches need ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``
    (and nothing else); a pickle naming ``os.system``, ``builtins.eval``, ... raises `pickle.UnpicklingError`.
    """

    ALLOWED: frozenset[tuple[str, str]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "str"), ("builtins", "int"),
        ("builtins", "float"),
        ("__builtin__", "list"), ("__builtin__", "dict"), ("__builtin__", "tuple"),
        ("copy_reg", "_reconstructor"),  # never allowed below unless the target is allowed too
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED and (module, name) != ("copy_reg", "_reconstructor"):
            if module.startswith("numpy"):
                import importlib

                # numpy 2 renamed numpy.core -> numpy._core; both spellings resolve to the real function
                mod_name = module
                try:
                    mod = importlib.import_module(mod_name)
                except ImportError:
                    mod = importlib.import_module(module.replace("numpy.core", "numpy._core"))
                return getattr(mod, name)
            return super().find_class("builtins" if module == "__builtin__" else module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not a numpy array or builtin)")


def safe_unpickle(data: bytes, what: str) -> Any:
    """Unpickle ``data`` with `RestrictedUnpickler` (latin1 for Python-2 pickles, as CIFAR's are)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise VitscopeError(what, f"unsafe or corrupt pickle: {exc}", "use the official CIFAR python archive") from None
    except Exception as exc:  # truncated data, wrong format
        raise VitscopeError(what, f"cannot read it as a CIFAR batch ({type(exc).__name__}: {exc})",
                            "use the official CIFAR python archive") from None


# --------------------------------------------------------------------------------------------------- CIFAR
def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download_cifar(name: str, root: Path) -> Path:
    """Download the official archive of ``name`` into ``root`` and verify its md5; returns its path."""
    import urllib.error
    import urllib.request

    from vitscope._io import atomic_path

    url, filename, md5 = CIFAR_ARCHIVES[name]
    target = root / filename
    if target.exists() and md5sum(target) == md5:
        return target
    root.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(target) as tmp:
            with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as fh:
                while block := resp.read(1 << 20):
                    fh.write(block)
            got = md5sum(tmp)
            if got != md5:
                raise VitscopeError("download", f"{url} has md5 {got}, expected {md5}", "retry the download")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise VitscopeError(
            "download", f"cannot download {url} ({exc})",
            f"no network? download {filename} elsewhere and put it in {root}",
        ) from None
    return target


class _CifarSource:
    """Reads members of an official CIFAR archive (``.tar.gz``) or of its extracted folder."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        folder = _CIFAR_FOLDER[name]
        _, filename, _ = CIFAR_ARCHIVES[name]
        candidates = [root / folder, root] if root.is_dir() else []
        self.folder = next((c for c in candidates if (c / ("batches.meta" if name == "cifar10" else "meta")).exists()),
                           None)
        self.archive: Path | None = None
        if self.folder is None:
            archive = root if root.is_file() else root / filename
            if not archive.is_file():
                raise VitscopeError(
                    "root", f"no {name} data in {root}: expected {filename} or a {folder}/ folder",
                    f"download it (get_dataset(..., download=True) or {CIFAR_ARCHIVES[name][0]})",
                )
            self.archive = archive

    def read(self, member: str) -> bytes:
        if self.folder is not None:
            path = self.folder / member
            if not path.is_file():
                raise VitscopeError("root", f"{path} is missing", f"re-extract the official {self.name} archive")
            return path.read_bytes()
        assert self.archive is not None
        try:
            with tarfile.open(self.archive, "r:gz") as tar:
                try:
                    fh = tar.extractfile(f"{_CIFAR_FOLDER[self.name]}/{member}")
                except KeyError:
                    fh = None
                if fh is None:
                    raise VitscopeError("root", f"{self.archive} has no {_CIFAR_FOLDER[self.name]}/{member}",
                                        f"use the official {self.name} python archive")
                return fh.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise VitscopeError("root", f"{self.archive} is not a readable tar.gz ({exc})",
                                "download the archive again") from None


def _cifar_batch(data: bytes, what: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(data, what)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise VitscopeError(what, f"not a CIFAR batch (needs keys b'data' and {label_key!r})",
                            "use the official CIFAR python archive")
    x = np.asarray(d[b"data"], dtype=np.uint8)
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.shape[0]:
        raise VitscopeError(what, f"data of shape {x.shape} with {y.shape[0]} labels; expected (N, 3072) and N",
                            "use the official CIFAR python archive")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y  # (N, 32, 32, 3): rows of R, G, B planes


def load_cifar(name: str, root: Path, split: str, image_size: tuple[int, int] | None = None,
               download: bool = False, label_mode: str = "fine") -> ArrayDataset:
    if download:
        download_cifar(name, root)
    src = _CifarSource(name, root)
    split = {"val": "test"}.get(split, split)
    if split not in ("train", "test"):
        raise VitscopeError("split", f"{name} has splits train and test, not {split!r}", "use 'train' or 'test'")
    if name == "cifar10":
        meta = safe_unpickle(src.read("batches.meta"), "batches.meta")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(b"label_names", [])]
        members = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = b"labels"
    else:
        if label_mode not in ("fine", "coarse"):
            raise VitscopeError("label_mode", f"unknown value {label_mode!r}", "use 'fine' or 'coarse'")
        meta = safe_unpickle(src.read("meta"), "meta")
        names = meta.get(f"{label_mode}_label_names".encode(), [])
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
        members, key = [split], f"{label_mode}_labels".encode()
    batches = [_cifar_batch(src.read(m), m, key) for m in members]
    x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    if not classes or y.max(initial=0) >= len(classes) or y.min(initial=0) < 0:
        raise VitscopeError("root", f"{name} labels do not match its {len(classes)} class names",
                            "use the official CIFAR python archive")
    return ArrayDataset(x, y, classes, image_size)


# --------------------------------------------------------------------------------------------------- MNIST
MNIST_CLASSES = tuple(str(i) for i in range(10))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic ``0x0000 <dtype> <ndim>``, big-endian sizes, data."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise VitscopeError("root", f"cannot read {path} ({exc})", "use the original MNIST IDX files") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise VitscopeError("root", f"{path} is not an unsigned-byte IDX file", "use the original MNIST IDX files")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise VitscopeError("root", f"{path} is truncated", "download it again")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    n = int(np.prod(shape))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != n:
        raise VitscopeError("root", f"{path} holds {data.size} values, its header says {shape}", "download it again")
    return data.reshape(shape).copy()  # writable (frombuffer views are read-only)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise VitscopeError("root", f"{stem}[.gz] not found in {root}", "put the MNIST IDX files there")


def load_mnist(root: Path, split: str, image_size: tuple[int, int] | None = None) -> ArrayDataset:
    prefix = {"train": "train", "test": "t10k", "val": "t10k"}.get(split)
    if prefix is None:
        raise VitscopeError("split", f"mnist has splits train and test, not {split!r}", "use 'train' or 'test'")
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise VitscopeError("root", f"MNIST images {images.shape} and labels {labels.shape} do not match",
                            "use matching IDX files")
    return ArrayDataset(images, labels.astype(np.int64), MNIST_CLASSES, image_size)


# ------------------------------------------------------------------------------------------- tiny-imagenet
def load_tiny_imagenet(root: Path, split: str, image_size: tuple[int, int] | None = None) -> FileDataset:
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise VitscopeError("root", f"{wnids_file} not found", "pass the folder that holds tiny-imagenet-200/")
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    words: dict[str, str] = {}
    if (base / "words.txt").is_file():
        for line in (base / "words.txt").read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip().split(",")[0].strip()
    classes = [words.get(w, w) for w in wnids]
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            folder = base / "train" / w / "images"
            if not folder.is_dir():
                raise VitscopeError("root", f"{folder} not found", "re-extract tiny-imagenet-200.zip")
            found = sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES)
            files += found
            labels += [index[w]] * len(found)
    elif split == "val":
        ann = base / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise VitscopeError("root", f"{ann} not found", "re-extract tiny-imagenet-200.zip")
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2 or not parts[0].strip():
                if line.strip():
                    raise VitscopeError("root", f"{ann} line {n} is malformed: {line!r}",
                                        "expected 'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1'")
                continue
            if parts[1] not in index:
                raise VitscopeError("root", f"{ann} line {n}: unknown wnid {parts[1]!r}", "check wnids.txt")
            path = base / "val" / "images" / parts[0]
            if not path.is_file():
                raise VitscopeError("root", f"{path} (from {ann.name} line {n}) not found",
                                    "re-extract tiny-imagenet-200.zip")
            files.append(path)
            labels.append(index[parts[1]])
    else:
        raise VitscopeError("split", f"tiny-imagenet has labelled splits train and val, not {split!r}",
                            "use 'train' or 'val'")
    if not files:
        raise VitscopeError("root", f"no {split} images found under {base}", "re-extract tiny-imagenet-200.zip")
    return FileDataset(files, labels, classes, image_size)


# -------------------------------------------------------------------------------------------- image folder
def load_image_folder(root: Path, split: str, image_size: tuple[int, int] | None = None,
                      holdout_every: int = 10) -> FileDataset:
    if not root.is_dir():
        raise VitscopeError("root", f"{root} is not a folder", "pass a folder with one sub-folder per class")
    split_dir = root / split
    if split == "test" and not split_dir.is_dir():
        split_dir = root / "val"
    presplit = split_dir.is_dir()
    base = split_dir if presplit else root
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if presplit is False:
        class_dirs = [d for d in class_dirs if d.name not in ("train", "val", "test")]
    if not class_dirs:
        raise VitscopeError("root", f"{base} has no class sub-folders", "lay it out as root/<class>/<image>")
    classes = [d.name for d in class_dirs]
    files: list[Path] = []
    labels: list[int] = []
    for label, d in enumerate(class_dirs):
        found = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in IMAGE_SUFFIXES)
        if not presplit:  # deterministic holdout: every `holdout_every`-th file of each class is validation
            keep = (lambda i: i % holdout_every != holdout_every - 1) if split == "train" else (
                lambda i: i % holdout_every == holdout_every - 1)
            found = [p for i, p in enumerate(found) if keep(i)]
        files += found
        labels += [label] * len(found)
    if not files:
        raise VitscopeError("root", f"no images for split {split!r} under {base}",
                            f"add image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...) to the class folders")
    return FileDataset(files, labels, classes, image_size)


# ------------------------------------------------------------------------------------------------ dispatch
def get_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int | tuple[int, int] | None = None,
    *,
    download: bool = False,
    size: int | None = None,
    seed: int = 0,
    with_masks: bool = False,
    label_mode: str = "fine",
) -> LabeledDataset:
    """One split of dataset ``name`` as ``(image (C, H, W) in [0, 1], label)`` items with ``.classes``.

    Args:
        name: one of `DATASETS`.
        root: where its files are (ignored for ``shapes``).
        split: ``"train"``, ``"val"`` or ``"test"`` (``val`` is the official test split for CIFAR/MNIST).
        image_size: resize every image to this ``(height, width)`` (an int for a square); default native.
        download: CIFAR only: fetch the official archive (md5-checked) into ``root`` if it is missing.
        size, seed, with_masks: ``shapes`` only: number of images, generator seed, also return masks.
        label_mode: CIFAR-100 only: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    """
    size_hw: tuple[int, int] | None = None
    if isinstance(image_size, int):
        size_hw = (image_size, image_size)
    elif image_size is not None:
        size_hw = (int(image_size[0]), int(image_size[1]))
    ds: LabeledDataset
    if name == "shapes":
        from vitscope.train.shapes import ShapesDataset

        default = {"train": 50_000}.get(split, 2_000)
        ds = ShapesDataset(size=size or default, seed=seed, split=split, image_size=size_hw or (48, 48),
                           with_masks=with_masks)
    else:
        if name not in DATASETS:
            raise VitscopeError("dataset", f"unknown dataset {name!r}", f"choose one of {', '.join(DATASETS)}")
        if root is None:
            raise VitscopeError("root", f"dataset {name!r} needs a data folder", "pass root= / --data PATH")
        path = Path(root).expanduser()
        if not path.exists() and not (download and name in CIFAR_ARCHIVES):
            raise VitscopeError("root", f"{path} does not exist", f"pass the folder that holds the {name} files")
        if name in CIFAR_ARCHIVES:
            ds = load_cifar(name, path, split, size_hw, download=download, label_mode=label_mode)
        elif name == "mnist":
            ds = load_mnist(path, split, size_hw)
        elif name == "tiny-imagenet":
            ds = load_tiny_imagenet(path, split, size_hw)
        else:
            ds = load_image_folder(path, split, size_hw)
    mean, std = NORMALIZATION[name]
    if name == "folder" or len(mean) != ds.channels:
        mean, std = (0.5,) * ds.channels, (0.5,) * ds.channels
    ds.mean, ds.std = mean, std
    return ds
